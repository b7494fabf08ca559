/* C tests of the engine: a tiny in-process virtio driver puts requests on a
 * split ring in a memfd "guest RAM", kicks, and checks statuses, used-ring
 * entries and the backing file.  Run plain and under ASan/UBSan (make asan). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../internal.h"
#include "util.h"

#define MEM_SIZE (4u << 20)
#define QSZ 64
#define UVA_BASE 0x7f0000000000ULL
#define CAP (1u << 20)

static int failures;
static int sync_io;     /* run the tests again with the sync engine */
#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

struct drv {
    int memfd;
    uint8_t *ram;
    bs_mem *mem;
    bs_target *tgt;
    bs_queue *q;
    struct bs_vring vr;     /* driver's view, same layout */
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint64_t bump;
    uint16_t next_desc, avail_idx, used_seen;
    int kick, call;
    int backing;
    struct bs_target_cfg cfg;
};

static uint64_t alloc(struct drv *d, uint64_t size, uint64_t align)
{
    d->bump = (d->bump + align - 1) & ~(align - 1);
    uint64_t g = d->bump;
    d->bump += size;
    if (d->bump > MEM_SIZE) {
        fprintf(stderr, "test guest RAM exhausted\n");
        exit(2);
    }
    return g;
}

static void *gp(struct drv *d, uint64_t gpa) { return d->ram + gpa; }

static void drv_init(struct drv *d, int read_only)
{
    char path[] = "/tmp/bs-test-XXXXXX";
    memset(d, 0, sizeof(*d));
    d->memfd = memfd_create("guest", MFD_CLOEXEC);
    if (ftruncate(d->memfd, MEM_SIZE))
        exit(2);
    d->ram = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, d->memfd, 0);
    d->backing = mkstemp(path);
    unlink(path);
    if (ftruncate(d->backing, CAP))
        exit(2);
    CHECK(bs_mem_new(&d->mem) == 0);
    CHECK(bs_mem_add(d->mem, d->memfd, 0, MEM_SIZE, UVA_BASE, 0) == 0);
    d->cfg.fd = d->backing;
    d->cfg.fd_buffered = d->backing;
    d->cfg.capacity = CAP;
    d->cfg.read_only = read_only;
    d->cfg.sync_io = sync_io;
    memcpy(d->cfg.serial, "test-serial-0123", 16);
    CHECK(bs_target_new(&d->cfg, &d->tgt) == 0);
    CHECK(bs_queue_new(d->tgt, 0, &d->q) == 0);
    d->bump = 4096;
    d->desc_gpa = alloc(d, 16 * QSZ, 16);
    d->avail_gpa = alloc(d, 6 + 2 * QSZ, 2);
    d->used_gpa = alloc(d, 6 + 8 * QSZ, 4);
    d->vr.num = QSZ;
    d->vr.desc = gp(d, d->desc_gpa);
    d->vr.avail = gp(d, d->avail_gpa);
    d->vr.used = gp(d, d->used_gpa);
    d->kick = eventfd(0, EFD_CLOEXEC);
    d->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

static int drv_start_at(struct drv *d, int event_idx, uint16_t last_avail)
{
    struct bs_vring_cfg vc = {
        .num = QSZ, .desc_uva = UVA_BASE + d->desc_gpa,
        .avail_uva = UVA_BASE + d->avail_gpa, .used_uva = UVA_BASE + d->used_gpa,
        .base = last_avail, .kick_fd = d->kick, .call_fd = d->call,
        .event_idx = event_idx,
    };
    return bs_queue_start(d->q, d->mem, &vc);
}

static int drv_start(struct drv *d, int event_idx)
{
    return drv_start_at(d, event_idx, d->avail_idx);
}

static void drv_fini(struct drv *d)
{
    bs_queue_free(d->q);
    bs_target_free(d->tgt);
    CHECK(bs_mem_free(d->mem) == 0);
    munmap(d->ram, MEM_SIZE);
    close(d->memfd);
    close(d->backing);
    close(d->kick);
    close(d->call);
}

static uint16_t put_desc(struct drv *d, uint64_t addr, uint32_t len, uint16_t flags)
{
    uint16_t i = d->next_desc++ % QSZ;
    d->vr.desc[i] = (struct bs_vring_desc){ addr, len, flags, (uint16_t)((i + 1) % QSZ) };
    return i;
}

static void publish(struct drv *d, uint16_t head)
{
    d->vr.avail->ring[d->avail_idx % QSZ] = head;
    d->avail_idx++;
    __atomic_store_n(&d->vr.avail->idx, d->avail_idx, __ATOMIC_RELEASE);
}

static void kick(struct drv *d) { eventfd_write(d->kick, 1); }

/* Wait until the used index reaches the driver's avail index. */
static int wait_used(struct drv *d, uint16_t target)
{
    for (int i = 0; i < 5000; i++) {
        if (__atomic_load_n(&d->vr.used->idx, __ATOMIC_ACQUIRE) == target)
            return 0;
        usleep(1000);
    }
    return -ETIMEDOUT;
}

struct req {
    uint16_t head;
    uint64_t hdr, data, status;
};

/* A plain request: header, optional data, status. */
static struct req submit(struct drv *d, uint32_t type, uint64_t sector,
                         uint32_t len, int data_writable)
{
    struct req r;
    r.hdr = alloc(d, 16, 16);
    r.data = len ? alloc(d, len, 512) : 0;
    r.status = alloc(d, 1, 1);
    uint32_t *h = gp(d, r.hdr);
    h[0] = type;
    h[1] = 0;
    memcpy(gp(d, r.hdr + 8), &sector, 8);
    *(uint8_t *)gp(d, r.status) = 0xff;
    r.head = put_desc(d, r.hdr, 16, BS_VRING_DESC_F_NEXT);
    if (len)
        put_desc(d, r.data, len, BS_VRING_DESC_F_NEXT |
                 (data_writable ? BS_VRING_DESC_F_WRITE : 0));
    put_desc(d, r.status, 1, BS_VRING_DESC_F_WRITE);
    publish(d, r.head);
    return r;
}

static uint8_t status_of(struct drv *d, struct req *r)
{
    return *(uint8_t *)gp(d, r->status);
}

static struct bs_vring_used_elem used_at(struct drv *d, uint16_t i)
{
    return d->vr.used->ring[i % QSZ];
}

/* Poll the queue's stats until it is broken (or 2 s pass); the last read
 * is left in *s. */
static void wait_broken(bs_queue *q, struct bs_queue_stats *s)
{
    bs_queue_get_stats(q, s);
    for (int i = 0; i < 2000 && !s->broken; i++) {
        usleep(1000);
        bs_queue_get_stats(q, s);
    }
}

static uint64_t hist_total(const uint64_t *h)
{
    uint64_t n = 0;
    for (int i = 0; i < BS_LAT_BUCKETS; i++)
        n += h[i];
    return n;
}

static void test_rw_roundtrip(void)
{
    struct drv d;
    /* counters in a caller-provided (shared) block, as `blkserve export` does */
    static struct bs_queue_stats shared;
    memset(&shared, 0, sizeof(shared));
    drv_init(&d, 0);
    CHECK(bs_queue_set_stats(d.q, &shared) == 0);
    CHECK(drv_start(&d, 1) == 0);
    CHECK(bs_queue_set_stats(d.q, &shared) == -EBUSY);
    struct req w = submit(&d, BS_BLK_T_OUT, 8, 4096, 0);
    memset(gp(&d, w.data), 0xab, 4096);
    kick(&d);
    CHECK(wait_used(&d, 1) == 0);
    CHECK(status_of(&d, &w) == BS_BLK_S_OK);
    CHECK(used_at(&d, 0).id == w.head && used_at(&d, 0).len == 1);
    uint8_t buf[4096];
    CHECK(pread(d.backing, buf, 4096, 8 * 512) == 4096);
    CHECK(buf[0] == 0xab && buf[4095] == 0xab);

    struct req r = submit(&d, BS_BLK_T_IN, 8, 4096, 1);
    kick(&d);
    CHECK(wait_used(&d, 2) == 0);
    CHECK(status_of(&d, &r) == BS_BLK_S_OK);
    CHECK(used_at(&d, 1).len == 4097);
    CHECK(memcmp(gp(&d, r.data), buf, 4096) == 0);

    struct req f = submit(&d, BS_BLK_T_FLUSH, 0, 0, 0);
    kick(&d);
    CHECK(wait_used(&d, 3) == 0);
    CHECK(status_of(&d, &f) == BS_BLK_S_OK);

    struct req id = submit(&d, BS_BLK_T_GET_ID, 0, 512, 1);
    kick(&d);
    CHECK(wait_used(&d, 4) == 0);
    CHECK(status_of(&d, &id) == BS_BLK_S_OK);
    CHECK(memcmp(gp(&d, id.data), "test-serial-0123\0\0\0\0", 20) == 0);
    CHECK(used_at(&d, 3).len == 21);

    uint64_t n;
    CHECK(read(d.call, &n, 8) == 8);  /* the driver was notified */
    uint32_t last = 0;
    CHECK(bs_queue_stop(d.q, &last) == 0);
    CHECK(last == 4);
    struct bs_queue_stats st;
    bs_queue_get_stats(d.q, &st);
    CHECK(st.reqs_read == 1 && st.reqs_write == 1 && st.reqs_flush == 1);
    CHECK(st.bytes_read == 4096 && st.bytes_write == 4096 && st.inflight == 0);
    /* the counters live in the shared block; get_stats adds the totals */
    CHECK(memcmp(st.op_status, shared.op_status, sizeof(st.op_status)) == 0);
    CHECK(memcmp(st.op_lat_hist, shared.op_lat_hist, sizeof(st.op_lat_hist)) == 0);
    CHECK(shared.reqs_read == 0 && st.err_ioerr == 0 && st.reqs_get_id == 1);
    CHECK(shared.op_status[BS_STAT_READ][0] == 1 && shared.op_status[BS_STAT_WRITE][0] == 1);
    CHECK(shared.op_status[BS_STAT_FLUSH][0] == 1 && shared.op_status[BS_STAT_GET_ID][0] == 1);
    CHECK(shared.op_bytes[BS_STAT_READ] == 4096 && shared.op_bytes[BS_STAT_WRITE] == 4096);
    CHECK(shared.op_bytes[BS_STAT_GET_ID] == 20);
    for (int op = 0; op < BS_STAT_NOPS; op++) {
        uint64_t done = shared.op_status[op][0] + shared.op_status[op][1] +
                        shared.op_status[op][2];
        CHECK(hist_total(shared.op_lat_hist[op]) == done);
        /* requests that went to the backing took measurable time */
        if (op == BS_STAT_READ || op == BS_STAT_WRITE || op == BS_STAT_FLUSH)
            CHECK(done == 0 || shared.op_lat_sum_ns[op] > 0);
    }
    drv_fini(&d);
}

static void test_errors(void)
{
    struct drv d;
    drv_init(&d, 0);
    CHECK(drv_start(&d, 0) == 0);
    struct req r1 = submit(&d, BS_BLK_T_IN, CAP / 512, 512, 1);   /* past end */
    struct req r2 = submit(&d, BS_BLK_T_IN, (CAP / 512) - 1, 1024, 1); /* straddles end */
    struct req r3 = submit(&d, BS_BLK_T_IN, 0xffffffffffffffffULL, 512, 1); /* overflow */
    struct req r4 = submit(&d, 77, 0, 512, 1);                    /* unknown type */
    struct req r5 = submit(&d, BS_BLK_T_OUT, 0, 512, 1);          /* writable data on write */
    struct req r6 = submit(&d, BS_BLK_T_IN, 0, 512, 0);           /* readable data on read */
    struct req r7 = submit(&d, BS_BLK_T_IN, 0, 100, 1);           /* not a sector multiple */
    kick(&d);
    CHECK(wait_used(&d, 7) == 0);
    CHECK(status_of(&d, &r1) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r2) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r3) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r4) == BS_BLK_S_UNSUPP);
    CHECK(status_of(&d, &r5) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r6) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r7) == BS_BLK_S_IOERR);

    /* Header shorter than 16 bytes. */
    uint64_t hdr = alloc(&d, 16, 16), st = alloc(&d, 1, 1);
    uint64_t st2 = alloc(&d, 1, 1), st3 = alloc(&d, 1, 1);
    *(uint8_t *)gp(&d, st) = 0xff;
    *(uint8_t *)gp(&d, st2) = 0xff;
    *(uint8_t *)gp(&d, st3) = 0xff;
    uint16_t h = put_desc(&d, hdr, 8, BS_VRING_DESC_F_NEXT);
    put_desc(&d, st, 1, BS_VRING_DESC_F_WRITE);
    publish(&d, h);
    /* A data buffer outside guest memory: the status byte (the last,
     * writable descriptor) is found and answered IOERR, never left as it
     * was (a driver that does not pre-set it would read success). */
    uint16_t h2 = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
    put_desc(&d, MEM_SIZE - 256, 512, BS_VRING_DESC_F_NEXT | BS_VRING_DESC_F_WRITE);
    put_desc(&d, st2, 1, BS_VRING_DESC_F_WRITE);
    publish(&d, h2);
    /* Address + length wrapping around 2^64: likewise. */
    uint16_t h5 = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
    put_desc(&d, 0xfffffffffffffe00ULL, 4096, BS_VRING_DESC_F_NEXT | BS_VRING_DESC_F_WRITE);
    put_desc(&d, st3, 1, BS_VRING_DESC_F_WRITE);
    publish(&d, h5);
    kick(&d);
    CHECK(wait_used(&d, 10) == 0);
    CHECK(*(uint8_t *)gp(&d, st) == BS_BLK_S_IOERR);
    CHECK(*(uint8_t *)gp(&d, st2) == BS_BLK_S_IOERR);
    CHECK(*(uint8_t *)gp(&d, st3) == BS_BLK_S_IOERR);
    CHECK(used_at(&d, 8).len == 1 && used_at(&d, 8).id == h2);
    CHECK(used_at(&d, 9).len == 1 && used_at(&d, 9).id == h5);
    struct bs_queue_stats s;
    bs_queue_get_stats(d.q, &s);
    CHECK(s.bad_chains == 2);
    CHECK(s.broken == 0);
    /* bad chains have no op; answered requests are counted by op and status */
    CHECK(s.op_status[BS_STAT_READ][1] + s.op_status[BS_STAT_WRITE][1] +
          s.op_status[BS_STAT_OTHER][2] + s.op_status[BS_STAT_READ][0] ==
          s.err_ioerr + s.err_unsupp + s.reqs_read - s.op_status[BS_STAT_READ][1]);

    /* The queue still works after all that. */
    struct req ok = submit(&d, BS_BLK_T_IN, 0, 512, 1);
    kick(&d);
    CHECK(wait_used(&d, 11) == 0);
    CHECK(status_of(&d, &ok) == BS_BLK_S_OK);

    /* A head index beyond the ring marks the queue broken, nothing else. */
    publish(&d, QSZ + 1);
    kick(&d);
    wait_broken(d.q, &s);
    CHECK(s.broken == 1);
    drv_fini(&d);
}

/* Chains whose status byte cannot be located (a loop, a link past the
 * table, no writable byte, a nested indirect table): no used entry is
 * published (its status would be whatever the byte held), the queue is
 * broken until the frontend resets it.  Each case on a fresh queue. */
static void test_unlocatable_status_breaks_queue(void)
{
    for (int k = 0; k < 4; k++) {
        struct drv d;
        drv_init(&d, 0);
        CHECK(drv_start(&d, 1) == 0);
        uint64_t hdr = alloc(&d, 16, 16), st = alloc(&d, 1, 1);
        *(uint8_t *)gp(&d, st) = 0xff;
        uint32_t *hw = gp(&d, hdr);
        hw[0] = BS_BLK_T_IN;
        uint16_t h;
        if (k == 0) {           /* loops onto itself */
            h = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
            d.vr.desc[h].next = h;
        } else if (k == 1) {    /* next index beyond the table */
            h = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
            d.vr.desc[h].next = QSZ + 5;
        } else if (k == 2) {    /* no writable byte at all */
            h = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
            put_desc(&d, st, 1, 0);
        } else {                /* nested indirect */
            uint64_t tbl = alloc(&d, 16, 16), tbl2 = alloc(&d, 16, 16);
            ((struct bs_vring_desc *)gp(&d, tbl2))[0] =
                (struct bs_vring_desc){ tbl, 16, BS_VRING_DESC_F_INDIRECT, 0 };
            h = put_desc(&d, tbl2, 16, BS_VRING_DESC_F_INDIRECT);
        }
        publish(&d, h);
        kick(&d);
        struct bs_queue_stats s = { 0 };
        wait_broken(d.q, &s);
        CHECK(s.broken == 1 && s.bad_chains == 1);
        CHECK(__atomic_load_n(&d.vr.used->idx, __ATOMIC_ACQUIRE) == 0);
        CHECK(*(uint8_t *)gp(&d, st) == 0xff);
        /* a stop still answers, and a new start (the reset) serves again */
        uint32_t base = 0;
        CHECK(bs_queue_stop(d.q, &base) == 0 && base == 1);
        CHECK(drv_start(&d, 1) == 0);
        struct req ok = submit(&d, BS_BLK_T_IN, 0, 512, 1);
        kick(&d);
        CHECK(wait_used(&d, 1) == 0);
        CHECK(status_of(&d, &ok) == BS_BLK_S_OK);
        drv_fini(&d);
    }
}

/* A hostile driver that keeps the avail index moving just ahead of the
 * device for `secs` seconds, always with the same head: a GET_ID chain
 * padded with empty descriptors to the table's size (cheap to answer,
 * costly to walk), and a notification asked for after every entry. */
struct flood {
    struct drv *d;
    volatile int stop;
    volatile int ended;     /* ran its `secs` out before it was stopped */
    double secs;
    uint16_t head;
    unsigned long published;
};

static void *flood_thread(void *arg)
{
    struct flood *f = arg;
    struct drv *d = f->d;
    double end = now_s() + f->secs;
    uint16_t done = 0;      /* used entries seen (each written before it is published) */
    for (int i = 0; i < QSZ; i++)
        d->vr.used->ring[i].len = 0;
    while (!f->stop && now_s() < end) {
        while (__atomic_load_n(&d->vr.used->ring[done % QSZ].len, __ATOMIC_ACQUIRE)) {
            d->vr.used->ring[done % QSZ].len = 0;
            done++;
        }
        __atomic_store_n(&d->vr.avail->ring[QSZ], done, __ATOMIC_RELAXED);  /* used_event */
        uint16_t old = d->avail_idx;
        /* one entry more for every one answered: always just ahead */
        while ((uint16_t)(d->avail_idx - done) < QSZ - 1) {
            publish(d, f->head);
            f->published++;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint16_t ev = __atomic_load_n((uint16_t *)&d->vr.used->ring[QSZ], __ATOMIC_ACQUIRE);
        if (old != d->avail_idx && bs_vring_need_event(ev, d->avail_idx, old))
            kick(d);
    }
    f->ended = !f->stop;
    return NULL;
}

/* A flooding driver cannot hold the queue thread: a stop answers within
 * the drain timeout while the flood goes on, and (sync engine) the
 * notifications' completions are reaped as it runs. */
static void test_flood_is_bounded(void)
{
    struct drv d;
    struct flood f;
    pthread_t th;
    drv_init(&d, 0);
    d.cfg.drain_timeout_ms = 500;
    bs_queue_free(d.q);
    bs_target_free(d.tgt);
    CHECK(bs_target_new(&d.cfg, &d.tgt) == 0);
    CHECK(bs_queue_new(d.tgt, 0, &d.q) == 0);
    memset(&f, 0, sizeof(f));
    f.d = &d;
    f.secs = 120;           /* stopped once checked: the bound only */
    uint64_t hdr = alloc(&d, 16, 16), id = alloc(&d, 20, 4), st = alloc(&d, 1, 1);
    ((uint32_t *)gp(&d, hdr))[0] = BS_BLK_T_GET_ID;
    /* an indirect table of the largest size, all but 3 entries empty */
    uint32_t tn = BS_MAX_QUEUE_SIZE;
    uint64_t tbl = alloc(&d, 16ULL * tn, 16);
    struct bs_vring_desc *t = gp(&d, tbl);
    memset(t, 0, 16ULL * tn);
    for (uint32_t i = 0; i < tn; i++)
        t[i] = (struct bs_vring_desc){ 0, 0, BS_VRING_DESC_F_NEXT, (uint16_t)(i + 1) };
    t[0] = (struct bs_vring_desc){ hdr, 16, BS_VRING_DESC_F_NEXT, 1 };
    t[tn - 2] = (struct bs_vring_desc){ id, 20, BS_VRING_DESC_F_NEXT | BS_VRING_DESC_F_WRITE,
                                        (uint16_t)(tn - 1) };
    t[tn - 1] = (struct bs_vring_desc){ st, 1, BS_VRING_DESC_F_WRITE, 0 };
    f.head = put_desc(&d, tbl, 16 * tn, BS_VRING_DESC_F_INDIRECT);
    CHECK(drv_start(&d, 1) == 0);
    CHECK(pthread_create(&th, NULL, flood_thread, &f) == 0);
    kick(&d);
    /* the flood is really being served before we look */
    double t0 = now_s();
    struct bs_queue_stats s;
    do {
        usleep(1000);
        bs_queue_get_stats(d.q, &s);
    } while (s.op_status[BS_STAT_GET_ID][0] < 2000 && now_s() - t0 < 60);
    CHECK(s.op_status[BS_STAT_GET_ID][0] >= 2000);
    usleep(200000);
    CHECK(cq_overflow_small());
    double t1 = now_s();
    uint32_t base = 0;
    CHECK(bs_queue_stop(d.q, &base) == 0);
    double took = now_s() - t1;
    CHECK(!f.ended && took < 1.0);   /* answered while the flood still ran */
    if (took >= 1.0)
        fprintf(stderr, "stop under a flood took %.2f s\n", took);
    f.stop = 1;
    pthread_join(th, NULL);
    CHECK(f.published > 2000);
    drv_fini(&d);
}

/* The call fd is the frontend's: one handed over blocking, its counter
 * filled to the brim (a write would sleep until the frontend reads), must
 * not stall the queue thread.  The queue makes it non-blocking, goes on
 * answering requests (each one a notification attempt) and stops at once. */
static void test_blocking_call_fd(void)
{
    struct drv d;
    drv_init(&d, 0);
    close(d.call);
    d.call = eventfd(0, EFD_CLOEXEC);
    uint64_t brim = 0xfffffffffffffffeULL;
    CHECK(write(d.call, &brim, 8) == 8);
    CHECK(drv_start(&d, 0) == 0);
    CHECK(fcntl(d.call, F_GETFL) & O_NONBLOCK);
    for (int round = 0; round < 8; round++) {
        struct req r = submit(&d, BS_BLK_T_IN, (uint64_t)round * 8, 4096, 1);
        kick(&d);
        CHECK(wait_used(&d, d.avail_idx) == 0);
        CHECK(status_of(&d, &r) == BS_BLK_S_OK);
    }
    struct bs_queue_stats s;
    bs_queue_get_stats(d.q, &s);
    CHECK(s.notifies >= 8);           /* each answer tried to notify */
    double t0 = now_s();
    uint32_t base = 0;
    CHECK(bs_queue_stop(d.q, &base) == 0 && base == d.avail_idx);
    double took = now_s() - t0;
    if (took >= 1.0)
        fprintf(stderr, "stop with a full blocking call fd took %.2f s\n", took);
    CHECK(took < 1.0);
    uint64_t v = 0;
    CHECK(read(d.call, &v, 8) == 8 && v == brim);   /* nothing was added */
    drv_fini(&d);
}

/* The frontend truncates guest RAM under a running queue: the queue
 * thread's next touch of a vanished page (here GET_ID's copy into the id
 * buffer) would SIGBUS the whole process.  It is absorbed: the queue is
 * broken with -ENXIO, the process lives, stops work. */
static void test_guest_ram_truncated(void)
{
    struct drv d;
    drv_init(&d, 0);
    CHECK(drv_start(&d, 1) == 0);
    struct req ok = submit(&d, BS_BLK_T_IN, 0, 512, 1);
    kick(&d);
    CHECK(wait_used(&d, 1) == 0 && status_of(&d, &ok) == BS_BLK_S_OK);
    CHECK(ftruncate(d.memfd, 1 << 20) == 0);       /* rings stay below 1 MiB */
    uint64_t hdr = alloc(&d, 16, 16);
    ((uint32_t *)gp(&d, hdr))[0] = BS_BLK_T_GET_ID;
    d.bump = 2 << 20;                               /* gone now */
    uint64_t id = alloc(&d, 20, 4), st = alloc(&d, 1, 1);
    uint16_t h = put_desc(&d, hdr, 16, BS_VRING_DESC_F_NEXT);
    put_desc(&d, id, 20, BS_VRING_DESC_F_NEXT | BS_VRING_DESC_F_WRITE);
    put_desc(&d, st, 1, BS_VRING_DESC_F_WRITE);
    publish(&d, h);
    kick(&d);
    struct bs_queue_stats s = { 0 };
    wait_broken(d.q, &s);
    CHECK(s.broken == 1 && s.last_error == -ENXIO);
    uint32_t base = 0;
    CHECK(bs_queue_stop(d.q, &base) == 0);
    CHECK(ftruncate(d.memfd, MEM_SIZE) == 0);
    drv_fini(&d);
}

static int log_bit(const uint8_t *log, uint64_t gpa)
{
    return (log[gpa / 4096 / 8] >> (gpa / 4096 % 8)) & 1;
}

/* Dirty logging (live migration): with a log set, a read's data pages, the
 * status byte's page and the used ring's page are marked, a write's data
 * pages (the device only read them) are not; with none set, nothing is. */
static void test_dirty_log(void)
{
    struct drv d;
    uint8_t log[MEM_SIZE / 4096 / 8];
    drv_init(&d, 0);
    CHECK(drv_start(&d, 1) == 0);
    d.bump = 1 << 20;                   /* requests' buffers on their own pages */
    struct req w = submit(&d, BS_BLK_T_OUT, 8, 8192, 0);
    memset(gp(&d, w.data), 0x5a, 8192);
    memset(log, 0, sizeof(log));
    CHECK(bs_mem_set_log(d.mem, log, 0) == -EINVAL);
    CHECK(bs_mem_set_log(d.mem, log, sizeof(log)) == 0);
    kick(&d);
    CHECK(wait_used(&d, 1) == 0 && status_of(&d, &w) == BS_BLK_S_OK);
    CHECK(!log_bit(log, w.data) && !log_bit(log, w.data + 4096));
    CHECK(log_bit(log, w.status) && log_bit(log, d.used_gpa));
    d.bump = (d.bump + 4095) & ~4095ULL;
    memset(log, 0, sizeof(log));
    struct req r = submit(&d, BS_BLK_T_IN, 8, 8192, 1);
    kick(&d);
    CHECK(wait_used(&d, 2) == 0 && status_of(&d, &r) == BS_BLK_S_OK);
    CHECK(*(uint8_t *)gp(&d, r.data + 8191) == 0x5a);
    CHECK(log_bit(log, r.data) && log_bit(log, r.data + 4096));
    CHECK(log_bit(log, r.status) && log_bit(log, d.used_gpa));
    CHECK(!log_bit(log, w.data));
    /* logging off: nothing marked */
    CHECK(bs_mem_set_log(d.mem, NULL, 0) == 0);
    memset(log, 0, sizeof(log));
    struct req r2 = submit(&d, BS_BLK_T_IN, 8, 512, 1);
    kick(&d);
    CHECK(wait_used(&d, 3) == 0 && status_of(&d, &r2) == BS_BLK_S_OK);
    for (size_t i = 0; i < sizeof(log); i++)
        CHECK(log[i] == 0);
    drv_fini(&d);
}

static void test_indirect_and_batch(void)
{
    struct drv d;
    drv_init(&d, 0);
    CHECK(drv_start(&d, 1) == 0);
    /* Indirect write of 8 KiB in 2 segments, then read back directly. */
    uint64_t tbl = alloc(&d, 4 * 16, 16);
    uint64_t hdr = alloc(&d, 16, 16), a = alloc(&d, 4096, 4096),
             b = alloc(&d, 4096, 4096), st = alloc(&d, 1, 1);
    uint32_t *h = gp(&d, hdr);
    h[0] = BS_BLK_T_OUT;
    memset(gp(&d, hdr + 8), 0, 8);
    h[2] = 16;
    memset(gp(&d, a), 0x11, 4096);
    memset(gp(&d, b), 0x22, 4096);
    struct bs_vring_desc *t = gp(&d, tbl);
    t[0] = (struct bs_vring_desc){ hdr, 16, BS_VRING_DESC_F_NEXT, 1 };
    t[1] = (struct bs_vring_desc){ a, 4096, BS_VRING_DESC_F_NEXT, 2 };
    t[2] = (struct bs_vring_desc){ b, 4096, BS_VRING_DESC_F_NEXT, 3 };
    t[3] = (struct bs_vring_desc){ st, 1, BS_VRING_DESC_F_WRITE, 0 };
    uint16_t head = put_desc(&d, tbl, 64, BS_VRING_DESC_F_INDIRECT);
    publish(&d, head);
    kick(&d);
    CHECK(wait_used(&d, 1) == 0);
    CHECK(*(uint8_t *)gp(&d, st) == BS_BLK_S_OK);
    uint8_t buf[8192];
    CHECK(pread(d.backing, buf, 8192, 16 * 512) == 8192);
    CHECK(buf[0] == 0x11 && buf[4096] == 0x22);

    /* A batch of 16 writes, one kick. */
    struct req rs[16];
    d.next_desc = 0;
    for (int i = 0; i < 16; i++) {
        rs[i] = submit(&d, BS_BLK_T_OUT, 64 + i, 512, 0);
        memset(gp(&d, rs[i].data), i, 512);
    }
    kick(&d);
    CHECK(wait_used(&d, 17) == 0);
    for (int i = 0; i < 16; i++)
        CHECK(status_of(&d, &rs[i]) == BS_BLK_S_OK);
    for (int i = 0; i < 16; i++) {
        uint8_t c;
        CHECK(pread(d.backing, &c, 1, (64 + i) * 512) == 1 && c == i);
    }
    drv_fini(&d);
}

static void test_read_only(void)
{
    struct drv d;
    drv_init(&d, 1);
    CHECK(drv_start(&d, 0) == 0);
    struct req w = submit(&d, BS_BLK_T_OUT, 0, 512, 0);
    memset(gp(&d, w.data), 0x5a, 512);
    struct req f = submit(&d, BS_BLK_T_FLUSH, 0, 0, 0);
    kick(&d);
    CHECK(wait_used(&d, 2) == 0);
    CHECK(status_of(&d, &w) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &f) == BS_BLK_S_OK);
    uint8_t c = 1;
    CHECK(pread(d.backing, &c, 1, 0) == 1 && c == 0);
    drv_fini(&d);
}

static void test_setup_validation(void)
{
    struct drv d;
    drv_init(&d, 0);
    bs_mem *m;
    CHECK(bs_mem_new(&m) == 0);
    /* larger than the fd: refused, never mapped (would SIGBUS) */
    CHECK(bs_mem_add(m, d.memfd, 0, MEM_SIZE + 4096, 0, 0) == -EINVAL);
    CHECK(bs_mem_add(m, d.memfd, 0, 4096, 0, MEM_SIZE) == -EINVAL);
    CHECK(bs_mem_add(m, d.memfd, 0, 0, 0, 0) == -EINVAL);
    CHECK(bs_mem_add(m, d.memfd, ~0ULL - 10, 4096, 0, 0) == -EINVAL);
    /* two regions contiguous in guest-physical space, apart in the fd */
    CHECK(bs_mem_add(m, d.memfd, 0, 8192, UVA_BASE, 65536) == 0);
    CHECK(bs_mem_add(m, d.memfd, 4096, 4096, UVA_BASE + 0x100000, 0) == -EINVAL); /* overlap */
    CHECK(bs_mem_add(m, d.memfd, 8192, 8192, UVA_BASE + 0x100000, 0) == 0);
    struct iovec iov[4];
    CHECK(bs_mem_iov(m, 4096, 8192, iov, 4) == 2);
    CHECK(iov[0].iov_len == 4096 && iov[1].iov_len == 4096);
    CHECK(bs_mem_iov(m, 4096, 8192, iov, 1) == -E2BIG);
    CHECK(bs_mem_iov(m, 12288, 8192, iov, 4) == -EFAULT);
    CHECK(bs_mem_free(m) == 0);

    struct bs_vring_cfg vc = { .num = 100, .desc_uva = UVA_BASE, .avail_uva = UVA_BASE,
                               .used_uva = UVA_BASE, .kick_fd = d.kick, .call_fd = -1 };
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EINVAL);   /* not a power of 2 */
    vc.num = 0;
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EINVAL);
    vc.num = 65536;
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EINVAL);
    vc.num = 64;
    vc.used_uva = UVA_BASE + MEM_SIZE - 8;                  /* ring past the end */
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EFAULT);
    vc.used_uva = 12;
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EFAULT);
    /* a running queue pins the memory table */
    CHECK(drv_start(&d, 0) == 0);
    CHECK(bs_mem_free(d.mem) == -EBUSY);
    uint32_t last = 99;
    CHECK(bs_queue_stop(d.q, &last) == 0);
    CHECK(last == 0);
    /* restart from the saved index continues where it stopped */
    struct req r = submit(&d, BS_BLK_T_IN, 0, 512, 1);
    CHECK(drv_start_at(&d, 0, last) == 0);
    kick(&d);
    CHECK(wait_used(&d, 1) == 0);
    CHECK(status_of(&d, &r) == BS_BLK_S_OK);
    drv_fini(&d);
}

/* A discard / write-zeroes request with nseg segments. */
static struct req submit_dwz(struct drv *d, uint32_t type, const uint64_t *sectors,
                             const uint32_t *nums, const uint32_t *flags, int nseg)
{
    struct req r = submit(d, type, 0, 16 * (uint32_t)nseg, 0);
    for (int i = 0; i < nseg; i++) {
        uint8_t *p = gp(d, r.data + 16 * (uint64_t)i);
        memcpy(p, &sectors[i], 8);
        memcpy(p + 8, &nums[i], 4);
        memcpy(p + 12, &flags[i], 4);
    }
    return r;
}

static int all_bytes(int fd, uint64_t off, size_t len, uint8_t v)
{
    uint8_t buf[8192];
    while (len) {
        size_t k = len < sizeof(buf) ? len : sizeof(buf);
        if (pread(fd, buf, k, (off_t)off) != (ssize_t)k)
            return 0;
        for (size_t i = 0; i < k; i++)
            if (buf[i] != v)
                return 0;
        off += k;
        len -= k;
    }
    return 1;
}

static void test_discard_write_zeroes(void)
{
    struct drv d;
    drv_init(&d, 0);
    uint8_t ones[65536];
    memset(ones, 0xee, sizeof(ones));
    CHECK(pwrite(d.backing, ones, sizeof(ones), 0) == (ssize_t)sizeof(ones));
    CHECK(drv_start(&d, 1) == 0);
    uint64_t s1[] = { 0, 16 }; uint32_t n1[] = { 8, 8 }; uint32_t f0[] = { 0, 0 };
    struct req r1 = submit_dwz(&d, BS_BLK_T_DISCARD, s1, n1, f0, 2);     /* 2 segments */
    uint64_t s2[] = { 32 }; uint32_t n2[] = { 8 }; uint32_t fu[] = { BS_BLK_WZ_F_UNMAP };
    struct req r2 = submit_dwz(&d, BS_BLK_T_WRITE_ZEROES, s2, n2, fu, 1); /* with unmap */
    uint64_t s3[] = { 48 }; uint32_t n3[] = { 8 };
    struct req r3 = submit_dwz(&d, BS_BLK_T_WRITE_ZEROES, s3, n3, f0, 1); /* no unmap */
    struct req r4 = submit_dwz(&d, BS_BLK_T_DISCARD, s3, n3, fu, 1);      /* unmap on discard */
    uint32_t fx[] = { 4 };
    struct req r5 = submit_dwz(&d, BS_BLK_T_WRITE_ZEROES, s3, n3, fx, 1); /* unknown flag */
    uint64_t s6[] = { CAP / 512 - 4 };
    struct req r6 = submit_dwz(&d, BS_BLK_T_DISCARD, s6, n3, f0, 1);      /* past the end */
    struct req r7 = submit(&d, BS_BLK_T_DISCARD, 0, 24, 0);               /* not 16*n bytes */
    kick(&d);
    CHECK(wait_used(&d, 7) == 0);
    CHECK(status_of(&d, &r1) == BS_BLK_S_OK);
    CHECK(status_of(&d, &r2) == BS_BLK_S_OK);
    CHECK(status_of(&d, &r3) == BS_BLK_S_OK);
    CHECK(status_of(&d, &r4) == BS_BLK_S_UNSUPP);
    CHECK(status_of(&d, &r5) == BS_BLK_S_UNSUPP);
    CHECK(status_of(&d, &r6) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &r7) == BS_BLK_S_IOERR);
    CHECK(all_bytes(d.backing, 0, 4096, 0));
    CHECK(all_bytes(d.backing, 4096, 4096, 0xee));
    CHECK(all_bytes(d.backing, 8192, 4096, 0));
    CHECK(all_bytes(d.backing, 16384, 4096, 0));
    CHECK(all_bytes(d.backing, 24576, 4096, 0));
    CHECK(all_bytes(d.backing, 28672, 65536 - 28672, 0xee));
    struct bs_queue_stats st;
    bs_queue_get_stats(d.q, &st);
    CHECK(st.reqs_discard == 4 && st.reqs_write_zeroes == 3);
    CHECK(st.bytes_discard == 8192 && st.bytes_write_zeroes == 8192);
    drv_fini(&d);
}

static void test_block_size_4k_and_writethrough(void)
{
    struct drv d;
    drv_init(&d, 0);
    bs_target_free(d.tgt);
    bs_queue_free(d.q);
    d.cfg.block_size = 4096;
    d.cfg.writethrough = 1;
    CHECK(bs_target_new(&d.cfg, &d.tgt) == 0);
    CHECK(bs_queue_new(d.tgt, 0, &d.q) == 0);
    CHECK(drv_start(&d, 0) == 0);
    struct req a = submit(&d, BS_BLK_T_OUT, 8, 4096, 0);   /* aligned */
    struct req b = submit(&d, BS_BLK_T_OUT, 1, 4096, 0);   /* offset not 4k aligned */
    struct req c = submit(&d, BS_BLK_T_IN, 8, 512, 1);     /* length not 4k */
    kick(&d);
    CHECK(wait_used(&d, 3) == 0);
    CHECK(status_of(&d, &a) == BS_BLK_S_OK);
    CHECK(status_of(&d, &b) == BS_BLK_S_IOERR);
    CHECK(status_of(&d, &c) == BS_BLK_S_IOERR);
    bs_target_set_writethrough(d.tgt, 0);
    struct req e = submit(&d, BS_BLK_T_OUT, 16, 8192, 0);
    kick(&d);
    CHECK(wait_used(&d, 4) == 0);
    CHECK(status_of(&d, &e) == BS_BLK_S_OK);
    struct bs_target_cfg bad = d.cfg;
    bs_target *t2;
    bad.block_size = 1024;
    CHECK(bs_target_new(&bad, &t2) == -EINVAL);
    bad.block_size = 4096;
    bad.capacity = 4096 + 512;
    CHECK(bs_target_new(&bad, &t2) == -EINVAL);
    drv_fini(&d);
}

/* A null target: no backing; reads fill the guest's buffers with zeroes,
 * writes, flushes and discards succeed and touch nothing; it needs the
 * sync engine and no fd (and refuses an fd, io_uring or RBD). */
static void test_null_target(void)
{
    struct drv d;
    drv_init(&d, 0);
    bs_queue_free(d.q);
    bs_target_free(d.tgt);
    struct bs_target_cfg bad = d.cfg;
    bs_target *t2;
    bad.null_io = 1;
    bad.sync_io = 1;
    CHECK(bs_target_new(&bad, &t2) == -EINVAL);      /* an fd as well */
    bad.fd = bad.fd_buffered = -1;
    bad.sync_io = 0;
    CHECK(bs_target_new(&bad, &t2) == -EINVAL);      /* io_uring */
    d.cfg.fd = d.cfg.fd_buffered = -1;
    d.cfg.null_io = 1;
    d.cfg.sync_io = 1;
    CHECK(bs_target_new(&d.cfg, &d.tgt) == 0);
    CHECK(bs_queue_new(d.tgt, 0, &d.q) == 0);
    CHECK(drv_start(&d, 1) == 0);
    struct req w = submit(&d, BS_BLK_T_OUT, 8, 4096, 0);
    memset(gp(&d, w.data), 0xab, 4096);
    struct req r = submit(&d, BS_BLK_T_IN, 8, 8192, 1);
    memset(gp(&d, r.data), 0xcd, 8192);
    struct req f = submit(&d, BS_BLK_T_FLUSH, 0, 0, 0);
    struct req o = submit(&d, BS_BLK_T_IN, CAP / 512, 512, 1);   /* past the end */
    kick(&d);
    CHECK(wait_used(&d, 4) == 0);
    CHECK(status_of(&d, &w) == BS_BLK_S_OK);
    CHECK(status_of(&d, &r) == BS_BLK_S_OK);
    CHECK(status_of(&d, &f) == BS_BLK_S_OK);
    CHECK(status_of(&d, &o) == BS_BLK_S_IOERR);
    uint8_t zero[8192] = {0};
    CHECK(memcmp(gp(&d, r.data), zero, 8192) == 0);
    uint8_t buf[4096];
    CHECK(pread(d.backing, buf, 4096, 8 * 512) == 4096 && buf[0] == 0);  /* untouched */
    uint32_t last = 0;
    CHECK(bs_queue_stop(d.q, &last) == 0);
    struct bs_queue_stats st;
    bs_queue_get_stats(d.q, &st);
    CHECK(st.reqs_write == 1 && st.bytes_write == 4096 && st.bytes_read == 8192);
    drv_fini(&d);
}

/* ---- packed ring: a minimal driver on a ring of a non-power-of-two size ---- */
#define PQSZ 6

struct pdrv {
    struct drv d;
    struct bs_pdesc *ring;
    struct bs_pevent *drv_evt, *dev_evt;
    uint64_t ring_gpa, drv_gpa, dev_gpa;
    uint16_t next, wrap;         /* driver: next free position, wrap counter */
    uint16_t used, used_wrap;    /* driver: next used position to look at */
};

static void pdesc_flags(struct pdrv *p, uint16_t pos, uint16_t flags, int wrap)
{
    flags |= wrap ? BS_PDESC_F_AVAIL : BS_PDESC_F_USED;
    __atomic_store_n(&p->ring[pos].flags, flags, __ATOMIC_RELEASE);
}

/* Post header + data + status as a 3-descriptor chain with buffer id `id`. */
static struct req psubmit(struct pdrv *p, uint16_t id, uint32_t type, uint64_t sector,
                          uint32_t len, int data_writable)
{
    struct drv *d = &p->d;
    struct req r;
    r.hdr = alloc(d, 16, 16);
    r.data = alloc(d, len, 512);
    r.status = alloc(d, 1, 1);
    uint32_t *h = gp(d, r.hdr);
    h[0] = type;
    h[1] = 0;
    memcpy(gp(d, r.hdr + 8), &sector, 8);
    *(uint8_t *)gp(d, r.status) = 0xff;
    uint64_t addr[3] = { r.hdr, r.data, r.status };
    uint32_t lens[3] = { 16, len, 1 };
    uint16_t fl[3] = { BS_VRING_DESC_F_NEXT,
                       (uint16_t)(BS_VRING_DESC_F_NEXT | (data_writable ? BS_VRING_DESC_F_WRITE : 0)),
                       BS_VRING_DESC_F_WRITE };
    uint16_t head = p->next, head_wrap = p->wrap;
    for (int i = 0; i < 3; i++) {
        uint16_t pos = p->next;
        p->ring[pos].addr = addr[i];
        p->ring[pos].len = lens[i];
        p->ring[pos].id = id;
        if (i > 0)
            pdesc_flags(p, pos, fl[i], p->wrap);
        if (++p->next == PQSZ) {
            p->next = 0;
            p->wrap ^= 1;
        }
    }
    pdesc_flags(p, head, fl[0], head_wrap);     /* the head last */
    r.head = id;
    return r;
}

/* Wait for the next used descriptor; returns its id, or -1 on timeout. */
static int pwait(struct pdrv *p, uint32_t *len)
{
    for (int i = 0; i < 5000; i++) {
        uint16_t f = __atomic_load_n(&p->ring[p->used].flags, __ATOMIC_ACQUIRE);
        if (!!(f & BS_PDESC_F_AVAIL) == p->used_wrap && !!(f & BS_PDESC_F_USED) == p->used_wrap) {
            int id = p->ring[p->used].id;
            *len = p->ring[p->used].len;
            p->used += 3;                       /* every chain here is 3 long */
            if (p->used >= PQSZ) {
                p->used -= PQSZ;
                p->used_wrap ^= 1;
            }
            return id;
        }
        usleep(1000);
    }
    return -1;
}

static void test_packed_ring(void)
{
    struct pdrv p;
    memset(&p, 0, sizeof(p));
    drv_init(&p.d, 0);
    p.ring_gpa = alloc(&p.d, 16 * PQSZ, 16);
    p.drv_gpa = alloc(&p.d, 4, 4);
    p.dev_gpa = alloc(&p.d, 4, 4);
    p.ring = gp(&p.d, p.ring_gpa);
    p.drv_evt = gp(&p.d, p.drv_gpa);
    p.dev_evt = gp(&p.d, p.dev_gpa);
    p.wrap = 1;
    p.used_wrap = 1;
    struct bs_vring_cfg vc = {
        .num = PQSZ, .desc_uva = UVA_BASE + p.ring_gpa, .avail_uva = UVA_BASE + p.drv_gpa,
        .used_uva = UVA_BASE + p.dev_gpa, .base = 0x80008000u, .kick_fd = p.d.kick,
        .call_fd = p.d.call, .event_idx = 0, .packed = 1,
    };
    CHECK(bs_queue_start(p.d.q, p.d.mem, &vc) == 0);
    /* 10 write+read rounds on a 6-entry ring: the wrap counters flip often */
    for (uint16_t i = 0; i < 10; i++) {
        struct req w = psubmit(&p, (uint16_t)(100 + i), BS_BLK_T_OUT, i * 8u, 4096, 0);
        memset(gp(&p.d, w.data), 0x30 + i, 4096);
        kick(&p.d);
        uint32_t len = 0;
        CHECK(pwait(&p, &len) == 100 + i && len == 1);
        CHECK(status_of(&p.d, &w) == BS_BLK_S_OK);
        struct req r = psubmit(&p, (uint16_t)(200 + i), BS_BLK_T_IN, i * 8u, 4096, 1);
        kick(&p.d);
        CHECK(pwait(&p, &len) == 200 + i && len == 4097);
        CHECK(status_of(&p.d, &r) == BS_BLK_S_OK);
        CHECK(((uint8_t *)gp(&p.d, r.data))[4095] == 0x30 + i);
        p.d.bump = 8192;   /* reuse request buffers; the rings sit below */
    }
    /* two chains in flight at once, completed in any order */
    struct req a = psubmit(&p, 7, BS_BLK_T_IN, 0, 512, 1);
    struct req b = psubmit(&p, 9, BS_BLK_T_GET_ID, 0, 512, 1);
    kick(&p.d);
    uint32_t l1, l2;
    int i1 = pwait(&p, &l1), i2 = pwait(&p, &l2);
    CHECK((i1 == 7 && i2 == 9) || (i1 == 9 && i2 == 7));
    CHECK(status_of(&p.d, &a) == BS_BLK_S_OK && status_of(&p.d, &b) == BS_BLK_S_OK);
    /* the base reports both positions with their wrap counters */
    uint32_t base = 0;
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    CHECK((base & 0xffff) == (uint32_t)(p.next | (p.wrap << 15)));
    CHECK((base >> 16) == (uint32_t)(p.used | (p.used_wrap << 15)));
    /* a base beyond the ring is refused */
    vc.base = PQSZ;
    CHECK(bs_queue_start(p.d.q, p.d.mem, &vc) == -EINVAL);
    drv_fini(&p.d);
}

/* A stop does not wait forever for a backing store that never answers: a
 * read from an empty pipe is cancelled after drain_timeout_ms and left
 * marked in the inflight region for the next backend. */
static void test_stop_timeout(void)
{
    struct drv d;
    int pfd[2];
    if (sync_io)
        return;     /* a blocking syscall in the queue thread is not bounded */
    drv_init(&d, 0);
    CHECK(pipe(pfd) == 0);
    d.cfg.fd = d.cfg.fd_buffered = pfd[0];
    d.cfg.drain_timeout_ms = 100;
    bs_queue_free(d.q);
    bs_target_free(d.tgt);
    CHECK(bs_target_new(&d.cfg, &d.tgt) == 0);
    CHECK(bs_queue_new(d.tgt, 0, &d.q) == 0);
    uint64_t isz = bs_inflight_queue_bytes(QSZ);
    struct bs_inflight_split *in = calloc(1, isz);
    CHECK(bs_queue_set_inflight(d.q, in, isz) == 0);
    CHECK(drv_start(&d, 1) == 0);
    struct req r = submit(&d, BS_BLK_T_IN, 0, 512, 1);
    kick(&d);
    /* the read is really in flight (blocked on the empty pipe) first */
    struct bs_queue_stats qs = { 0 };
    for (int i = 0; i < 5000 && qs.inflight == 0; i++) {
        usleep(1000);
        bs_queue_get_stats(d.q, &qs);
    }
    CHECK(qs.inflight == 1);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint32_t base = 0;
    CHECK(bs_queue_stop(d.q, &base) == -ETIMEDOUT);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK(secs < 10);       /* 0.1 s, then the cancellation; never the 30 s default */
    CHECK(base == 1 && status_of(&d, &r) == 0xff);
    CHECK(__atomic_load_n(&d.vr.used->idx, __ATOMIC_ACQUIRE) == 0);
    CHECK(in->desc[r.head].inflight == 1 && in->used_idx == 0);
    bs_queue_set_inflight(d.q, NULL, 0);
    close(pfd[1]);
    drv_fini(&d);       /* closes d.backing (the file), not the pipe's read end */
    close(pfd[0]);
    free(in);
}

/* ---- INFLIGHT_SHMFD on a packed ring ---- */

/* What a backend records when it pops the 3-descriptor chain at pos into
 * slot `slot` (a copy of the ring descriptors, as the engine keeps them). */
static void pmark(struct pdrv *p, struct bs_inflight_packed *in, int slot, uint16_t pos,
                  uint64_t counter)
{
    struct bs_inflight_pslot *r = &in->slot[slot];
    for (int i = 0; i < 3; i++)
        r->d[i] = p->ring[(pos + i) % PQSZ];
    r->id = p->ring[pos].id;
    r->ndesc = 3;
    r->nsaved = 3;
    r->counter = counter;
}

static uint32_t pstate(uint16_t pos, int wrap) { return pos | (wrap ? 0x8000u : 0); }

static int pstart(struct pdrv *p, uint32_t base)
{
    struct bs_vring_cfg vc = {
        .num = PQSZ, .desc_uva = UVA_BASE + p->ring_gpa, .avail_uva = UVA_BASE + p->drv_gpa,
        .used_uva = UVA_BASE + p->dev_gpa, .base = base, .kick_fd = p->d.kick,
        .call_fd = p->d.call, .event_idx = 0, .packed = 1,
    };
    return bs_queue_start(p->d.q, p->d.mem, &vc);
}

static int backing_byte(struct drv *d, uint64_t sector)
{
    uint8_t b = 0;
    return pread(d->backing, &b, 1, (off_t)(sector * 512)) == 1 ? b : -1;
}

/* A killed backend's packed state: the ring's own descriptors of an
 * in-flight chain may be overwritten (by used descriptors of chains that
 * finished before it), and QEMU restarts the ring at a stale base.  The
 * region alone tells where the ring is and what to redo. */
static void test_inflight_packed(void)
{
    struct pdrv p;
    memset(&p, 0, sizeof(p));
    drv_init(&p.d, 0);
    p.ring_gpa = alloc(&p.d, 16 * PQSZ, 16);
    p.drv_gpa = alloc(&p.d, 4, 4);
    p.dev_gpa = alloc(&p.d, 4, 4);
    p.ring = gp(&p.d, p.ring_gpa);
    p.drv_evt = gp(&p.d, p.drv_gpa);
    p.dev_evt = gp(&p.d, p.dev_gpa);
    p.wrap = 1;
    p.used_wrap = 1;
    const uint32_t stale = 0x80008000u;   /* what QEMU had at the first start */
    uint64_t isz = bs_inflight_queue_bytes(PQSZ);
    CHECK(isz >= sizeof(struct bs_inflight_packed) + PQSZ * sizeof(struct bs_inflight_pslot));
    struct bs_inflight_packed *in = calloc(1, isz);
    CHECK(bs_queue_set_inflight(p.d.q, in, isz) == 0);
    CHECK(pstart(&p, stale) == 0);
    CHECK(in->version == BS_INFLIGHT_PACKED_VERSION && in->nslots == PQSZ);
    struct req a = psubmit(&p, 11, BS_BLK_T_OUT, 72, 4096, 0);
    memset(gp(&p.d, a.data), 0xa1, 4096);
    kick(&p.d);
    uint32_t len = 0;
    CHECK(pwait(&p, &len) == 11 && len == 1);
    uint32_t base = 0;
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    CHECK(in->used == pstate(3, 1) && (in->avail_state & 0xffff) == pstate(3, 1));
    CHECK(in->avail_state >> 16 == 1 && in->batch_head == BS_INFLIGHT_NONE);
    for (int i = 0; i < PQSZ; i++)
        CHECK(in->slot[i].counter == 0);

    /* Round 1: B (slot 4) and C (slot 1) popped, neither done; the backend
     * died after marking C but before recording the avail position past
     * it.  B's head descriptor in the ring is junk by now. */
    struct req b = psubmit(&p, 21, BS_BLK_T_OUT, 80, 4096, 0);   /* ring 3..5 */
    memset(gp(&p.d, b.data), 0xb1, 4096);
    struct req c = psubmit(&p, 22, BS_BLK_T_OUT, 88, 4096, 0);   /* ring 0..2, lap 2 */
    memset(gp(&p.d, c.data), 0xc2, 4096);
    pmark(&p, in, 4, 3, 2);
    pmark(&p, in, 1, 0, 3);
    in->avail_state = 2ULL << 16 | pstate(0, 0);
    p.ring[3].addr = 0xdead0000;
    CHECK(pstart(&p, stale) == 0);
    CHECK(pwait(&p, &len) == 21 && len == 1);      /* in pop order */
    CHECK(pwait(&p, &len) == 22 && len == 1);
    CHECK(status_of(&p.d, &b) == BS_BLK_S_OK && status_of(&p.d, &c) == BS_BLK_S_OK);
    CHECK(backing_byte(&p.d, 80) == 0xb1 && backing_byte(&p.d, 88) == 0xc2);
    struct req d = psubmit(&p, 31, BS_BLK_T_IN, 80, 512, 1);     /* ring 3..5 */
    kick(&p.d);
    CHECK(pwait(&p, &len) == 31 && ((uint8_t *)gp(&p.d, d.data))[0] == 0xb1);
    usleep(20000);
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    CHECK((base & 0xffff) == pstate(p.next, p.wrap) && (base >> 16) == pstate(p.used, p.used_wrap));
    struct bs_queue_stats st;
    bs_queue_get_stats(p.d.q, &st);
    CHECK(st.resubmitted == 2);
    for (int i = 0; i < PQSZ; i++)
        CHECK(in->slot[i].counter == 0);

    /* Round 2: E popped and completed, its batch published (the used
     * descriptor is in the ring) but the region not yet told: not redone. */
    struct req e = psubmit(&p, 41, BS_BLK_T_OUT, 96, 4096, 0);   /* ring 0..2 */
    memset(gp(&p.d, e.data), 0xe4, 4096);
    CHECK(pwrite(p.d.backing, gp(&p.d, e.data), 4096, 96 * 512) == 4096);
    memset(gp(&p.d, e.data), 0xee, 4096);                /* a redo would write 0xee */
    pmark(&p, in, 2, 0, 10);
    in->avail_state = 10ULL << 16 | pstate(3, 1);
    in->slot[2].next = BS_INFLIGHT_NONE;
    in->batch_used = pstate(0, 1);
    in->batch_end = pstate(3, 1);
    in->batch_head = 2;
    *(uint8_t *)gp(&p.d, e.status) = BS_BLK_S_OK;
    p.ring[0].len = 1;
    __atomic_store_n(&p.ring[0].flags, BS_PDESC_F_AVAIL | BS_PDESC_F_USED, __ATOMIC_RELEASE);
    CHECK(pstart(&p, stale) == 0);
    CHECK(pwait(&p, &len) == 41);
    struct req f = psubmit(&p, 51, BS_BLK_T_IN, 96, 512, 1);     /* ring 3..5 */
    kick(&p.d);
    CHECK(pwait(&p, &len) == 51 && ((uint8_t *)gp(&p.d, f.data))[0] == 0xe4);
    usleep(20000);
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    CHECK(backing_byte(&p.d, 96) == 0xe4);
    bs_queue_get_stats(p.d.q, &st);
    CHECK(st.resubmitted == 2 && in->slot[2].counter == 0 && in->used == pstate(0, 0));

    /* Round 3: G completed into an unpublished batch (id and len written,
     * not the flags): redone. */
    struct req g = psubmit(&p, 61, BS_BLK_T_OUT, 104, 4096, 0);  /* ring 0..2 */
    memset(gp(&p.d, g.data), 0x66, 4096);
    pmark(&p, in, 5, 0, 20);
    in->avail_state = 20ULL << 16 | pstate(3, 0);
    in->slot[5].next = BS_INFLIGHT_NONE;
    in->batch_used = pstate(0, 0);
    in->batch_end = pstate(3, 0);
    in->batch_head = 5;
    p.ring[0].len = 1;
    CHECK(pstart(&p, stale) == 0);
    CHECK(pwait(&p, &len) == 61 && len == 1);
    CHECK(status_of(&p.d, &g) == BS_BLK_S_OK && backing_byte(&p.d, 104) == 0x66);
    usleep(20000);
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    bs_queue_get_stats(p.d.q, &st);
    CHECK(st.resubmitted == 3 && in->batch_head == BS_INFLIGHT_NONE);

    /* A saved chain longer than a record holds (the frontend wrote it) is
     * never copied: its status cannot be located, the queue is broken. */
    struct req h = psubmit(&p, 71, BS_BLK_T_OUT, 112, 4096, 0);  /* ring 3..5 */
    pmark(&p, in, 3, 3, 30);
    in->slot[3].ndesc = in->slot[3].nsaved = PQSZ;    /* fits the ring, so accepted */
    in->slot[3].nsaved = 60000;
    in->avail_state = 30ULL << 16 | pstate(0, 1);
    CHECK(pstart(&p, stale) == 0);
    wait_broken(p.d.q, &st);
    CHECK(st.broken == 1 && status_of(&p.d, &h) == 0xff);
    CHECK(bs_queue_stop(p.d.q, &base) == 0);
    in->slot[3].nsaved = PQSZ;
    in->slot[3].counter = 31;
    in->avail_state = 31ULL << 16 | pstate(0, 1);
    CHECK(pstart(&p, stale) == 0);   /* 6 claimed, the chain ends after 3: done empty */
    CHECK(bs_queue_stop(p.d.q, &base) == 0);

    /* A region the frontend scribbled on is refused, never followed. */
    in->slot[0] = in->slot[1] = (struct bs_inflight_pslot){ .counter = 1, .ndesc = 4 };
    CHECK(pstart(&p, stale) == -EINVAL);         /* 8 descriptors on a 6-ring */
    in->slot[1].counter = 0;
    in->batch_head = 0;
    in->batch_used = 0x7fff;
    CHECK(pstart(&p, stale) == -EINVAL);         /* batch position past the ring */
    in->batch_head = BS_INFLIGHT_NONE;
    in->avail_state = 5ULL << 16;
    in->slot[0].counter = 9;
    CHECK(pstart(&p, stale) == -EINVAL);         /* popped after the last pop */
    bs_queue_set_inflight(p.d.q, NULL, 0);
    drv_fini(&p.d);
    free(in);
}

/* INFLIGHT_SHMFD: requests a dead backend had popped are redone once, in
 * pop order, on the next start; a batch already published to the guest is
 * not redone; the ring resumes after them. */
/* A split ring larger than the engine's slots (1024): an inflight region
 * that marks more heads than could ever have been in flight at once is
 * the frontend's fabrication and refuses the start; as many as the slots
 * is a real state and starts. */
static void test_inflight_split_overmarked(void)
{
    struct drv d;
    const uint32_t num = 2048;
    drv_init(&d, 0);
    uint64_t desc = alloc(&d, 16ULL * num, 16), avail = alloc(&d, 6 + 2ULL * num, 2);
    uint64_t used = alloc(&d, 6 + 8ULL * num, 4);
    uint64_t isz = bs_inflight_queue_bytes(num);
    struct bs_inflight_split *in = calloc(1, isz);
    in->version = BS_INFLIGHT_VERSION;
    in->desc_num = (uint16_t)num;
    in->last_batch_head = BS_INFLIGHT_NONE;
    for (uint32_t h = 0; h <= BS_MAX_SLOTS; h++)      /* one more than the slots */
        in->desc[h] = (struct bs_inflight_desc){ .inflight = 1, .counter = h + 1 };
    CHECK(bs_queue_set_inflight(d.q, in, isz) == 0);
    struct bs_vring_cfg vc = {
        .num = num, .desc_uva = UVA_BASE + desc, .avail_uva = UVA_BASE + avail,
        .used_uva = UVA_BASE + used, .base = 0, .kick_fd = d.kick, .call_fd = d.call,
        .event_idx = 1,
    };
    CHECK(bs_queue_start(d.q, d.mem, &vc) == -EINVAL);
    in->desc[BS_MAX_SLOTS].inflight = 0;               /* exactly the slots */
    /* each marked head is a GET_ID-less empty chain: redone as a bad chain
     * would be; here only the start's decision matters, so stop at once */
    struct bs_vring_desc *t = gp(&d, desc);
    uint64_t hdr = alloc(&d, 16, 16), st = alloc(&d, 1, 1);
    ((uint32_t *)gp(&d, hdr))[0] = BS_BLK_T_GET_ID;
    uint64_t id = alloc(&d, 20, 4);
    for (uint32_t h = 0; h < BS_MAX_SLOTS; h++)
        t[h] = (struct bs_vring_desc){ hdr, 16, BS_VRING_DESC_F_NEXT,
                                       (uint16_t)(BS_MAX_SLOTS + 1) };
    t[BS_MAX_SLOTS + 1] = (struct bs_vring_desc){ id, 20, BS_VRING_DESC_F_NEXT |
                                                  BS_VRING_DESC_F_WRITE,
                                                  (uint16_t)(BS_MAX_SLOTS + 2) };
    t[BS_MAX_SLOTS + 2] = (struct bs_vring_desc){ st, 1, BS_VRING_DESC_F_WRITE, 0 };
    CHECK(bs_queue_start(d.q, d.mem, &vc) == 0);
    uint32_t base = 0;
    struct bs_queue_stats s;
    for (int i = 0; i < 2000; i++) {
        bs_queue_get_stats(d.q, &s);
        if (s.op_status[BS_STAT_GET_ID][0] == BS_MAX_SLOTS)
            break;
        usleep(1000);
    }
    CHECK(s.resubmitted == BS_MAX_SLOTS && s.op_status[BS_STAT_GET_ID][0] == BS_MAX_SLOTS);
    CHECK(bs_queue_stop(d.q, &base) == 0 && base == BS_MAX_SLOTS);
    bs_queue_set_inflight(d.q, NULL, 0);
    drv_fini(&d);
    free(in);
}

static void test_inflight_resubmit(void)
{
    struct drv d;
    drv_init(&d, 0);
    uint64_t isz = bs_inflight_queue_bytes(QSZ);
    CHECK(isz % 64 == 0 && isz >= 16 + 16 * QSZ);
    struct bs_inflight_split *in = calloc(1, isz);
    CHECK(bs_queue_set_inflight(d.q, in, isz / 2) == 0);
    CHECK(drv_start(&d, 1) == -EINVAL);          /* region too small */
    CHECK(bs_queue_set_inflight(d.q, in, isz) == 0);
    CHECK(drv_start(&d, 1) == 0);
    CHECK(bs_queue_set_inflight(d.q, in, isz) == -EBUSY);
    struct req w[3];
    for (int i = 0; i < 3; i++) {
        w[i] = submit(&d, BS_BLK_T_OUT, (uint64_t)i * 8, 4096, 0);
        memset(gp(&d, w[i].data), 0x10 + i, 4096);
    }
    kick(&d);
    CHECK(wait_used(&d, 3) == 0);
    uint32_t base = 0;
    CHECK(bs_queue_stop(d.q, &base) == 0 && base == 3);
    CHECK(in->version == 1 && in->desc_num == QSZ && in->used_idx == 3);
    for (int i = 0; i < 3; i++)
        CHECK(in->desc[w[i].head].inflight == 0 && in->desc[w[i].head].counter == (uint64_t)i + 1);

    /* The state a backend killed mid-batch leaves: w[2]'s completion reached
     * the guest (used idx 3) but the region still says used 2 and marks it;
     * r4 and r5 were popped (counters 5 then 4: r5 first) and never done. */
    struct req r4 = submit(&d, BS_BLK_T_OUT, 64, 4096, 0);
    memset(gp(&d, r4.data), 0x44, 4096);
    struct req r5 = submit(&d, BS_BLK_T_OUT, 72, 4096, 0);
    memset(gp(&d, r5.data), 0x55, 4096);
    in->used_idx = 2;
    in->last_batch_head = w[2].head;
    in->desc[w[2].head].inflight = 1;
    in->desc[w[2].head].next = BS_INFLIGHT_NONE;
    in->desc[r4.head] = (struct bs_inflight_desc){ .inflight = 1, .counter = 5 };
    in->desc[r5.head] = (struct bs_inflight_desc){ .inflight = 1, .counter = 4 };
    memset(gp(&d, w[2].data), 0x99, 4096);  /* redoing w[2] would write 0x99 */
    /* the frontend restarts the ring at its used index (QEMU after a crash) */
    CHECK(drv_start_at(&d, 1, 3) == 0);
    CHECK(wait_used(&d, 5) == 0);
    CHECK(status_of(&d, &r4) == BS_BLK_S_OK && status_of(&d, &r5) == BS_BLK_S_OK);
    CHECK(used_at(&d, 3).id == r5.head && used_at(&d, 4).id == r4.head);  /* pop order */
    uint8_t buf[4096];
    CHECK(pread(d.backing, buf, 4096, 64 * 512) == 4096 && buf[0] == 0x44);
    CHECK(pread(d.backing, buf, 4096, 72 * 512) == 4096 && buf[0] == 0x55);
    CHECK(pread(d.backing, buf, 4096, 16 * 512) == 4096 && buf[0] == 0x12);
    struct bs_queue_stats st;
    bs_queue_get_stats(d.q, &st);
    CHECK(st.resubmitted == 2);
    /* the ring goes on after them: the next request is done exactly once */
    struct req r6 = submit(&d, BS_BLK_T_IN, 64, 4096, 1);
    kick(&d);
    CHECK(wait_used(&d, 6) == 0);
    CHECK(status_of(&d, &r6) == BS_BLK_S_OK && memcmp(gp(&d, r6.data), buf, 1) != 0);
    CHECK(((uint8_t *)gp(&d, r6.data))[0] == 0x44);
    usleep(20000);
    CHECK(__atomic_load_n(&d.vr.used->idx, __ATOMIC_ACQUIRE) == 6);
    CHECK(bs_queue_stop(d.q, &base) == 0 && base == 6);
    CHECK(in->used_idx == 6);
    for (int h = 0; h < QSZ; h++)
        CHECK(in->desc[h].inflight == 0);

    /* A region the frontend scribbled on: a batch chain that loops and
     * points past the ring, marks on heads it never gave us.  Recovery must
     * stay inside the region and end; the junk heads complete as bad chains
     * (their descriptors were never handed to the device) or as requests. */
    in->used_idx = 1;                     /* != used: the chain is followed */
    in->last_batch_head = 3;
    in->desc[3].next = 7;
    in->desc[7].next = 3;                 /* a loop */
    in->desc[5].next = 60000;             /* past the ring */
    in->desc[9].inflight = 1;
    in->desc[9].counter = 1;
    CHECK(drv_start_at(&d, 1, 6) == 0);
    CHECK(wait_used(&d, 7) == 0);         /* head 9 was answered, nothing hung */
    CHECK(bs_queue_stop(d.q, &base) == 0 && base == 7);
    CHECK(in->used_idx == 7 && in->desc[9].inflight == 0);
    bs_queue_set_inflight(d.q, NULL, 0);
    drv_fini(&d);
    free(in);
}


/* QoS: N reads of LEN bytes, in batches the 64-entry test ring holds; the
 * seconds they took. */
static double qos_reads(struct drv *d, int n, uint32_t len)
{
    double t0 = now_s();
    while (n > 0) {
        int b = n < 16 ? n : 16;
        for (int i = 0; i < b; i++)
            submit(d, BS_BLK_T_IN, (uint64_t)(i % 8) * (len / 512), len, 1);
        kick(d);
        CHECK(wait_used(d, d->avail_idx) == 0);
        n -= b;
    }
    return now_s() - t0;
}

static void test_qos(void)
{
    static struct bs_qos vol, grp;
    struct drv d, e;
    struct bs_queue_stats st;
    uint32_t base;

    /* 200 IOPS: 96 reads take (96 - 20 let through at once) / 200 s; 100 ms
     * of credit (20 requests) and the wait's wake-up latency aside, the limit
     * is exact, so the lower bound is tight and the upper one generous */
    memset(&vol, 0, sizeof(vol));
    vol.lim[BS_QOS_IOPS_TOTAL].rate = 200;
    bs_qos_rebase(&vol, -1);
    CHECK(vol.magic == 0x534f5142u && vol.size == sizeof(vol));
    drv_init(&d, 0);
    bs_target_set_qos(d.tgt, &vol, NULL);
    CHECK(drv_start(&d, 1) == 0);
    double t = qos_reads(&d, 96, 4096);
    CHECK(t >= 0.36 && t < 2.0);
    /* writes count in the total too; flushes are never held */
    struct req f = submit(&d, BS_BLK_T_FLUSH, 0, 0, 0);
    kick(&d);
    CHECK(wait_used(&d, d.avail_idx) == 0 && status_of(&d, &f) == BS_BLK_S_OK);
    bs_queue_get_stats(d.q, &st);
    CHECK(st.throttled > 50 && hist_total(st.throttle_wait_hist) == st.throttled);
    CHECK(st.throttle_wait_ns > 100000000ULL);
    CHECK(vol.throttled == st.throttled && vol.wait_ns == st.throttle_wait_ns);

    /* bandwidth: 512 KiB of reads at 1 MiB/s (iops limit off), 100 ms of it
     * at once */
    vol.lim[BS_QOS_IOPS_TOTAL].rate = 0;
    vol.lim[BS_QOS_BPS_READ].rate = 1 << 20;
    bs_qos_rebase(&vol, -1);
    t = qos_reads(&d, 32, 16384);
    CHECK(t >= 0.36 && t < 2.0);
    /* a write is not a read: bps_read does not hold it */
    vol.lim[BS_QOS_BPS_READ].tat = bs_now_ns() + 5000000000ULL;  /* 5 s of debt */
    double t0 = now_s();
    struct req w = submit(&d, BS_BLK_T_OUT, 0, 4096, 0);
    kick(&d);
    CHECK(wait_used(&d, d.avail_idx) == 0 && status_of(&d, &w) == BS_BLK_S_OK);
    CHECK(now_s() - t0 < 1.0);

    /* held requests are started, not lost, when the limit goes away ... */
    vol.lim[BS_QOS_BPS_READ].rate = 0;
    vol.lim[BS_QOS_IOPS_READ].rate = 1;
    bs_qos_rebase(&vol, -1);
    uint16_t before = d.avail_idx;
    for (int i = 0; i < 6; i++)
        submit(&d, BS_BLK_T_IN, (uint64_t)i * 8, 4096, 1);
    kick(&d);
    usleep(100000);
    CHECK(d.vr.used->idx != d.avail_idx);   /* precondition: some are held */
    t0 = now_s();
    vol.lim[BS_QOS_IOPS_READ].rate = 0;
    CHECK(wait_used(&d, d.avail_idx) == 0);
    CHECK(now_s() - t0 < 0.5);               /* re-checked every 20 ms */
    /* ... and when the queue stops while one waits: the held request is
     * served, the ones behind it stay in the ring for the next start */
    vol.lim[BS_QOS_IOPS_READ].rate = 1;
    bs_qos_rebase(&vol, -1);
    before = d.avail_idx;
    struct req held[4];
    for (int i = 0; i < 4; i++)
        held[i] = submit(&d, BS_BLK_T_IN, (uint64_t)i * 8, 4096, 1);
    kick(&d);
    usleep(100000);
    uint16_t served = (uint16_t)(d.vr.used->idx - before);
    CHECK(served < 3);
    t0 = now_s();
    CHECK(bs_queue_stop(d.q, &base) == 0);
    CHECK(now_s() - t0 < 1.0);
    CHECK(d.vr.used->idx == (uint16_t)(before + served + 1) && base == d.vr.used->idx);
    for (int i = 0; i <= served; i++)
        CHECK(status_of(&d, &held[i]) == BS_BLK_S_OK);
    vol.lim[BS_QOS_IOPS_READ].rate = 0;
    CHECK(drv_start_at(&d, 1, (uint16_t)base) == 0);
    kick(&d);
    CHECK(wait_used(&d, d.avail_idx) == 0);
    for (int i = 0; i < 4; i++)
        CHECK(status_of(&d, &held[i]) == BS_BLK_S_OK);
    CHECK(bs_queue_stop(d.q, &base) == 0);

    /* a group: two targets (as two workers would) share one budget of 200
     * IOPS; 48 reads each take (96 - 20) / 200 s together */
    memset(&vol, 0, sizeof(vol));
    memset(&grp, 0, sizeof(grp));
    grp.lim[BS_QOS_IOPS_TOTAL].rate = 200;
    bs_qos_rebase(&grp, -1);
    bs_target_set_qos(d.tgt, NULL, &grp);
    drv_init(&e, 0);
    bs_target_set_qos(e.tgt, NULL, &grp);
    CHECK(drv_start(&d, 1) == 0 && drv_start(&e, 0) == 0);
    t0 = now_s();
    for (int r = 0; r < 6; r++) {
        for (int i = 0; i < 8; i++) {
            submit(&d, BS_BLK_T_IN, (uint64_t)i * 8, 4096, 1);
            submit(&e, BS_BLK_T_IN, (uint64_t)i * 8, 4096, 1);
        }
        kick(&d);
        kick(&e);
        CHECK(wait_used(&d, d.avail_idx) == 0 && wait_used(&e, e.avail_idx) == 0);
    }
    t = now_s() - t0;
    CHECK(t >= 0.36 && t < 2.0);
    CHECK(grp.throttled > 40);
    /* off: no limit, no wait */
    bs_target_set_qos(d.tgt, NULL, NULL);
    CHECK(qos_reads(&d, 32, 4096) < 0.2);
    CHECK(bs_queue_stop(d.q, &base) == 0 && bs_queue_stop(e.q, &base) == 0);
    drv_fini(&d);
    drv_fini(&e);
}

int main(void)
{
    test_rw_roundtrip();
    test_errors();
    test_unlocatable_status_breaks_queue();
    test_indirect_and_batch();
    test_read_only();
    test_setup_validation();
    test_discard_write_zeroes();
    test_block_size_4k_and_writethrough();
    test_packed_ring();
    test_inflight_resubmit();
    test_inflight_split_overmarked();
    test_inflight_packed();
    test_stop_timeout();
    test_flood_is_bounded();
    test_blocking_call_fd();
    test_guest_ram_truncated();
    test_dirty_log();
    test_qos();
    test_null_target();
    /* the sync engine behind the same interface (the fallback and oracle) */
    sync_io = 1;
    test_rw_roundtrip();
    test_errors();
    test_unlocatable_status_breaks_queue();
    test_indirect_and_batch();
    test_read_only();
    test_discard_write_zeroes();
    test_block_size_4k_and_writethrough();
    test_packed_ring();
    test_inflight_resubmit();
    test_inflight_packed();
    test_stop_timeout();
    test_flood_is_bounded();
    test_blocking_call_fd();
    test_guest_ram_truncated();
    test_dirty_log();
    test_qos();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_engine: all checks passed\n");
    return 0;
}
