/* C tests of the blkif transport: an in-process "frontend" puts requests on
 * a blkif ring; the Xen grant and event-channel functions are replaced by
 * fakes over a memfd of "guest pages" (grant ref N = page N), so the whole
 * request path (validation, mapping, the request core, responses) runs
 * without Xen.  Run plain and under ASan/UBSan (make asan). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "../internal.h"
#include "util.h"

#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/blkif.h>

#define PG 4096u
#define NPAGES 512          /* guest pages; gref N is page N */
#define CAP (4u << 20)
#define PORT 7

static int failures;
#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

/* ---- fake Xen ---- */
struct fakexen {
    int memfd;              /* the guest's pages */
    uint8_t *pages;         /* our view of them, as the frontend */
    int evt;                /* "event channel" towards the backend */
    int notified;           /* eventfd: the backend's notifications */
    int live_maps;          /* pages mapped through the fake gnttab */
    int map_calls;
    int fail_maps;          /* make the next map calls fail */
};
static struct fakexen fx;

static void *fake_map(void *xgt, uint32_t count, uint32_t domid, uint32_t *refs, int prot)
{
    (void)xgt;
    if (domid != 5 || count == 0)
        return NULL;
    if (fx.fail_maps) {
        fx.fail_maps--;
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++)
        if (refs[i] >= NPAGES)
            return NULL;
    uint8_t *a = mmap(NULL, (size_t)count * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return NULL;
    for (uint32_t i = 0; i < count; i++)
        if (mmap(a + (size_t)i * PG, PG, prot, MAP_SHARED | MAP_FIXED, fx.memfd,
                 (off_t)refs[i] * PG) == MAP_FAILED)
            abort();
    __atomic_add_fetch(&fx.live_maps, (int)count, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&fx.map_calls, 1, __ATOMIC_SEQ_CST);
    return a;
}

static int fake_unmap(void *xgt, void *addr, uint32_t count)
{
    (void)xgt;
    __atomic_sub_fetch(&fx.live_maps, (int)count, __ATOMIC_SEQ_CST);
    return munmap(addr, (size_t)count * PG);
}

static int fake_notify(void *xce, uint32_t port)
{
    (void)xce;
    CHECK(port == PORT);
    return eventfd_write(fx.notified, 1);
}

static int fake_pending(void *xce)
{
    eventfd_t v;
    (void)xce;
    return eventfd_read(fx.evt, &v) == 0 ? PORT : -1;
}

static int fake_unmask(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

static const struct bs_xen_ops ops = {
    .map_domain_grant_refs = fake_map, .unmap = fake_unmap, .notify = fake_notify,
    .pending = fake_pending, .unmask = fake_unmask,
};

/* ---- the test frontend ---- */
struct front {
    blkif_sring_t *sring;
    blkif_front_ring_t ring;
    bs_target *tgt;
    bs_blkif *b;
    int backing;
    struct bs_target_cfg cfg;
    struct bs_blkif_cfg bcfg;
};

/* --rbd CONF POOL IMAGE: the target is that Ceph RBD image (test_rbd_rw) */
static bs_rbd *rbd_img;

static void front_init(struct front *f, int read_only, int persistent)
{
    char path[] = "/tmp/bs-blkif-XXXXXX";
    memset(f, 0, sizeof(*f));
    f->sring = aligned_alloc(PG, PG);
    SHARED_RING_INIT(f->sring);
    FRONT_RING_INIT(&f->ring, f->sring, PG);
    f->backing = mkstemp(path);
    unlink(path);
    if (ftruncate(f->backing, CAP))
        exit(2);
    f->cfg.fd = rbd_img ? -1 : f->backing;
    f->cfg.fd_buffered = rbd_img ? -1 : f->backing;
    f->cfg.rbd = rbd_img;
    f->cfg.capacity = CAP;
    f->cfg.read_only = read_only;
    f->cfg.drain_timeout_ms = 2000;
    memcpy(f->cfg.serial, "blkif-test", 10);
    CHECK(bs_target_new(&f->cfg, &f->tgt) == 0);
    CHECK(bs_blkif_new(f->tgt, 0, &f->b) == 0);
    f->bcfg = (struct bs_blkif_cfg){ .sring = f->sring, .ring_pages = 1, .domid = 5,
                                     .port = PORT, .evtchn_fd = fx.evt,
                                     .persistent = persistent, .max_indirect = 64,
                                     .discard = 1 };
    CHECK(bs_blkif_start(f->b, &ops, &f->bcfg) == 0);
}

static void front_fini(struct front *f)
{
    CHECK(bs_blkif_stop(f->b) == 0);
    CHECK(fx.live_maps == 0);       /* every grant unmapped */
    bs_blkif_free(f->b);
    bs_target_free(f->tgt);
    close(f->backing);
    free(f->sring);
}

/* Queue a request and kick; the caller fills it through the pointer. */
static union { struct blkif_request rw; struct blkif_request_discard d;
               struct blkif_request_indirect ind; } *next_req(struct front *f)
{
    void *r = RING_GET_REQUEST(&f->ring, f->ring.req_prod_pvt);
    memset(r, 0, sizeof(struct blkif_request));
    f->ring.req_prod_pvt++;
    return r;
}

static void kick(struct front *f)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->ring, notify);
    (void)notify;           /* always kick: the backend must cope */
    eventfd_write(fx.evt, 1);
}

static int last_rsp_op;   /* operation of the latest response */

/* Wait for a response; returns its status, and its id through *id. */
static int wait_rsp(struct front *f, uint64_t *id)
{
    for (int i = 0; i < 5000; i++) {
        if (RING_HAS_UNCONSUMED_RESPONSES(&f->ring)) {
            struct blkif_response r;
            RING_COPY_RESPONSE(&f->ring, f->ring.rsp_cons, &r);
            f->ring.rsp_cons++;
            if (id)
                *id = r.id;
            last_rsp_op = r.operation;
            return r.status;
        }
        usleep(1000);
    }
    fprintf(stderr, "no response\n");
    failures++;
    return 99;
}

static void fill_page(uint32_t page, uint8_t seed)
{
    for (uint32_t i = 0; i < PG; i++)
        fx.pages[(size_t)page * PG + i] = (uint8_t)(seed + i * 7);
}

static void rw(struct front *f, uint8_t op, uint64_t id, uint64_t sector, int nseg,
               uint32_t first_page, uint8_t first_sect, uint8_t last_sect)
{
    struct blkif_request *r = &next_req(f)->rw;
    r->operation = op;
    r->nr_segments = (uint8_t)nseg;
    r->id = id;
    r->sector_number = sector;
    for (int i = 0; i < nseg && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        r->seg[i].gref = first_page + (uint32_t)i;
        r->seg[i].first_sect = first_sect;
        r->seg[i].last_sect = last_sect;
    }
}

static void test_rw(int persistent)
{
    struct front f;
    uint64_t id = 0;
    front_init(&f, 0, persistent);

    /* write 3 whole pages at sector 8, read them back into other pages */
    for (uint32_t p = 10; p < 13; p++)
        fill_page(p, (uint8_t)p);
    rw(&f, BLKIF_OP_WRITE, 0x1234, 8, 3, 10, 0, 7);
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 0x1234);
    uint8_t buf[3 * PG];
    CHECK(pread(f.backing, buf, sizeof(buf), 8 * 512) == (ssize_t)sizeof(buf));
    CHECK(memcmp(buf, fx.pages + 10 * PG, sizeof(buf)) == 0);
    memset(fx.pages + 20 * PG, 0, 3 * PG);
    rw(&f, BLKIF_OP_READ, 77, 8, 3, 20, 0, 7);
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 77);
    CHECK(memcmp(fx.pages + 20 * PG, fx.pages + 10 * PG, 3 * PG) == 0);

    /* part of a page: sectors 2..3 of page 30 go to sector 100 */
    fill_page(30, 99);
    rw(&f, BLKIF_OP_WRITE, 3, 100, 1, 30, 2, 3);
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    CHECK(pread(f.backing, buf, 1024, 100 * 512) == 1024);
    CHECK(memcmp(buf, fx.pages + 30 * PG + 1024, 1024) == 0);

    /* flush; barrier without data */
    next_req(&f)->rw.operation = BLKIF_OP_FLUSH_DISKCACHE;
    next_req(&f)->rw.operation = BLKIF_OP_WRITE_BARRIER;
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);

    /* discard: a hole; secure discard is refused */
    struct blkif_request_discard *d = &next_req(&f)->d;
    d->operation = BLKIF_OP_DISCARD;
    d->sector_number = 8;
    d->nr_sectors = 8;
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    CHECK(pread(f.backing, buf, PG, 8 * 512) == PG);
    for (uint32_t i = 0; i < PG; i++)
        if (buf[i]) {
            CHECK(!"discarded range reads zero");
            break;
        }
    d = &next_req(&f)->d;
    d->operation = BLKIF_OP_DISCARD;
    d->flag = BLKIF_DISCARD_SECURE;
    d->sector_number = 8;
    d->nr_sectors = 8;
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_EOPNOTSUPP);

    /* indirect: 20 segments listed in one granted page (page 100) */
    struct blkif_request_segment *segs = (void *)(fx.pages + 100 * PG);
    for (int i = 0; i < 20; i++) {
        segs[i] = (struct blkif_request_segment){ .gref = 200 + (uint32_t)i,
                                                  .first_sect = 0, .last_sect = 7 };
        fill_page(200 + (uint32_t)i, (uint8_t)(i * 3));
    }
    struct blkif_request_indirect *ind = &next_req(&f)->ind;
    ind->operation = BLKIF_OP_INDIRECT;
    ind->indirect_op = BLKIF_OP_WRITE;
    ind->nr_segments = 20;
    ind->id = 555;
    ind->sector_number = 1024;
    ind->indirect_grefs[0] = 100;
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 555);
    CHECK(last_rsp_op == BLKIF_OP_WRITE);   /* the inner operation, as blkfront wants */
    uint8_t *big = malloc(20 * PG);
    CHECK(pread(f.backing, big, 20 * PG, 1024 * 512) == 20 * PG);
    CHECK(memcmp(big, fx.pages + 200 * PG, 20 * PG) == 0);
    free(big);

    struct bs_queue_stats st;
    CHECK(bs_blkif_get_stats(f.b, &st) == 0);
    CHECK(st.reqs_write == 3 && st.reqs_read == 1 && st.reqs_flush == 2);
    CHECK(st.bytes_write == 3 * PG + 1024 + 20 * PG && st.bad_chains == 0);
    if (persistent)     /* data grants stay mapped until the stop */
        CHECK(fx.live_maps == 3 + 3 + 1 + 20);
    else
        CHECK(fx.live_maps == 0);
    front_fini(&f);
}

/* A misbehaving frontend: every fault is a response, never a crash. */
static void test_faults(void)
{
    struct front f;
    front_init(&f, 0, 0);

    rw(&f, BLKIF_OP_WRITE, 1, 0, 1, 10, 5, 2);          /* first_sect > last_sect */
    rw(&f, BLKIF_OP_WRITE, 2, 0, 1, 10, 0, 8);          /* last_sect past the page */
    rw(&f, BLKIF_OP_READ, 3, 0, 0, 10, 0, 7);           /* no segment */
    rw(&f, BLKIF_OP_READ, 4, CAP / 512 - 4, 1, 10, 0, 7);   /* crosses the end */
    rw(&f, BLKIF_OP_READ, 5, ~0ULL / 256, 1, 10, 0, 7); /* sector * 512 overflows */
    struct blkif_request *r = &next_req(&f)->rw;        /* too many segments */
    r->operation = BLKIF_OP_READ;
    r->nr_segments = 200;
    r->id = 6;
    rw(&f, BLKIF_OP_READ, 7, 0, 1, NPAGES + 5, 0, 7);   /* a grant that does not map */
    next_req(&f)->rw.operation = 42;                   /* unknown operation */
    struct blkif_request_indirect *ind = &next_req(&f)->ind;
    ind->operation = BLKIF_OP_INDIRECT;                /* more than advertised */
    ind->indirect_op = BLKIF_OP_READ;
    ind->nr_segments = 65;
    ind->indirect_grefs[0] = 100;
    ind = &next_req(&f)->ind;                          /* indirect page unmappable */
    ind->operation = BLKIF_OP_INDIRECT;
    ind->indirect_op = BLKIF_OP_WRITE;
    ind->nr_segments = 4;
    ind->indirect_grefs[0] = NPAGES + 1;
    struct blkif_request_discard *d = &next_req(&f)->d;  /* discard past the end */
    d->operation = BLKIF_OP_DISCARD;
    d->sector_number = CAP / 512;
    d->nr_sectors = 1;
    kick(&f);
    /* none of them does I/O: answered in order */
    int want[] = { BLKIF_RSP_ERROR, BLKIF_RSP_ERROR, BLKIF_RSP_ERROR, BLKIF_RSP_ERROR,
                   BLKIF_RSP_ERROR, BLKIF_RSP_ERROR, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP,
                   BLKIF_RSP_ERROR, BLKIF_RSP_ERROR, BLKIF_RSP_ERROR };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        int st = wait_rsp(&f, NULL);
        if (st != want[i])
            fprintf(stderr, "fault %zu: status %d, want %d\n", i, st, want[i]);
        CHECK(st == want[i]);
    }
    struct bs_queue_stats st;
    bs_blkif_get_stats(f.b, &st);
    CHECK(st.bad_chains == 7 && !st.broken);

    /* a producer index more than a ring ahead: the ring is broken, the
     * thread lives on and stops cleanly */
    f.sring->req_prod = f.ring.req_prod_pvt + RING_SIZE(&f.ring) + 3;
    eventfd_write(fx.evt, 1);
    for (int i = 0; i < 1000 && !st.broken; i++) {
        usleep(1000);
        bs_blkif_get_stats(f.b, &st);
    }
    CHECK(st.broken && st.last_error == -ERANGE);
    front_fini(&f);

    /* read-only: writes and discards fail, reads and flushes work */
    front_init(&f, 1, 1);
    rw(&f, BLKIF_OP_WRITE, 0, 0, 1, 10, 0, 7);
    rw(&f, BLKIF_OP_READ, 1, 0, 1, 10, 0, 7);
    r = &next_req(&f)->rw;
    r->operation = BLKIF_OP_FLUSH_DISKCACHE;
    r->id = 2;
    d = &next_req(&f)->d;
    d->operation = BLKIF_OP_DISCARD;
    d->nr_sectors = 8;
    d->id = 3;
    kick(&f);
    /* responses come in completion order: match them by id */
    int ro_want[4] = { BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_RSP_OKAY, BLKIF_RSP_ERROR };
    for (int i = 0; i < 4; i++) {
        uint64_t id = 99;
        int st = wait_rsp(&f, &id);
        CHECK(id < 4 && st == ro_want[id]);
    }
    front_fini(&f);
}

/* A barrier with data runs after every request before it and before every
 * request after it: queued at once, W1, BARRIER, W3 on the same sectors
 * complete in that order and leave W3's data over the barrier's over W1's. */
static void test_barrier(void)
{
    struct front f;
    char path[] = "/var/tmp/bs-blkif-XXXXXX";
    front_init(&f, 0, 0);
    /* O_DIRECT on allocated blocks: io_uring issues a plain write at once
     * while a durable one waits for the disk, so a write let past the
     * barrier would overtake it (buffered writes to one file are serialised
     * by io_uring and would hide that) */
    int dfd = mkstemp(path);
    CHECK(dfd >= 0 && fallocate(dfd, 0, 0, CAP) == 0);
    int direct = open(path, O_RDWR | O_DIRECT);
    unlink(path);
    if (direct >= 0) {
        CHECK(bs_blkif_stop(f.b) == 0);
        bs_blkif_free(f.b);
        bs_target_free(f.tgt);
        close(f.backing);
        f.backing = dfd;
        f.cfg.fd = direct;
        f.cfg.fd_buffered = dfd;
        CHECK(bs_target_new(&f.cfg, &f.tgt) == 0);
        CHECK(bs_blkif_new(f.tgt, 0, &f.b) == 0);
        CHECK(bs_blkif_start(f.b, &ops, &f.bcfg) == 0);
    } else {
        /* buffered writes would pass whether or not the barrier holds:
         * a test that cannot fail is a failure */
        fprintf(stderr, "test_barrier: no O_DIRECT on /var/tmp (%s): cannot test barriers\n",
                strerror(errno));
        CHECK(direct >= 0);
        close(dfd);
    }
    for (int round = 0; round < 20; round++) {
        for (uint32_t p = 0; p < 8; p++) {
            fill_page(40 + p, (uint8_t)(round + 1));        /* W1 */
            fill_page(50 + p, (uint8_t)(round + 101));      /* the barrier */
        }
        fill_page(60, (uint8_t)(round + 201));              /* W3: first page only */
        rw(&f, BLKIF_OP_WRITE, 1, 2048, 8, 40, 0, 7);
        rw(&f, BLKIF_OP_WRITE_BARRIER, 2, 2048, 8, 50, 0, 7);
        rw(&f, BLKIF_OP_WRITE, 3, 2048, 1, 60, 0, 7);
        kick(&f);
        for (uint64_t want = 1; want <= 3; want++) {
            uint64_t id = 0;
            CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY);
            CHECK(id == want);
            if (want == 2)
                CHECK(last_rsp_op == BLKIF_OP_WRITE_BARRIER);
        }
        uint8_t buf[8 * PG];
        CHECK(pread(f.backing, buf, sizeof(buf), 2048 * 512) == (ssize_t)sizeof(buf));
        CHECK(memcmp(buf, fx.pages + 60 * PG, PG) == 0);
        CHECK(memcmp(buf + PG, fx.pages + 51 * PG, 7 * PG) == 0);
    }
    /* a barrier first, with nothing in flight, still fences what follows */
    fill_page(50, 7);
    fill_page(60, 8);
    rw(&f, BLKIF_OP_WRITE_BARRIER, 4, 4096, 1, 50, 0, 7);
    rw(&f, BLKIF_OP_WRITE, 5, 4096, 1, 60, 0, 7);
    kick(&f);
    uint64_t id = 0;
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 4);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 5);
    uint8_t buf[PG];
    CHECK(pread(f.backing, buf, PG, 4096 * 512) == PG);
    CHECK(memcmp(buf, fx.pages + 60 * PG, PG) == 0);
    front_fini(&f);
    if (direct >= 0)
        close(direct);
}

/* More requests than slots, queued at once: all are answered in turn. */
static void test_full_ring(void)
{
    struct front f;
    front_init(&f, 0, 1);
    int total = 0, answered = 0;
    for (int round = 0; round < 4; round++) {
        while (!RING_FULL(&f.ring)) {
            rw(&f, total % 2 ? BLKIF_OP_READ : BLKIF_OP_WRITE, (uint64_t)total,
               (uint64_t)(total % 64) * 8, 2, 10 + (uint32_t)(total % 8) * 2, 0, 7);
            total++;
        }
        kick(&f);
        while (answered < total) {
            CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
            answered++;
        }
    }
    CHECK(total == 4 * (int)RING_SIZE(&f.ring));
    front_fini(&f);
}

/* A hostile frontend that keeps the ring full of requests that need no
 * I/O but cost the backend work (an indirect page to map and 64 segments
 * to check, the last one bad: answered with an error), taking each
 * response and queueing a new request for it, with an event after every
 * batch. */
#define FLOOD_PAGE 200
struct flood {
    struct front *f;
    volatile int stop;
    volatile int ended;     /* ran its `secs` out before it was stopped */
    double secs;
    unsigned long answered;
};

static void *flood_thread(void *arg)
{
    struct flood *fl = arg;
    struct front *f = fl->f;
    double end = now_s() + fl->secs;
    while (!fl->stop && now_s() < end) {
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->ring, more);
        while (RING_HAS_UNCONSUMED_RESPONSES(&f->ring)) {
            f->ring.rsp_cons++;
            __atomic_add_fetch(&fl->answered, 1, __ATOMIC_RELAXED);
        }
        (void)more;
        if (RING_FULL(&f->ring))
            continue;
        while (!RING_FULL(&f->ring)) {
            struct blkif_request_indirect *ind = &next_req(f)->ind;
            ind->operation = BLKIF_OP_INDIRECT;
            ind->indirect_op = BLKIF_OP_READ;
            ind->nr_segments = 64;
            ind->indirect_grefs[0] = FLOOD_PAGE;
        }
        kick(f);
    }
    fl->ended = !fl->stop;
    return NULL;
}

/* A frontend that keeps the ring moving cannot hold the ring's thread: a
 * stop answers within the drain timeout while the flood goes on, and no
 * completion is left to pile up in the kernel's overflow list.  Both
 * engines. */
static void test_flood_is_bounded(void)
{
    for (int sync_io = 0; sync_io <= 1; sync_io++) {
        struct front f;
        struct flood fl = { .f = &f, .secs = 120 };  /* stopped once checked */
        pthread_t th;
        struct blkif_request_segment *seg = (void *)(fx.pages + (size_t)FLOOD_PAGE * PG);
        for (int i = 0; i < 64; i++)
            seg[i] = (struct blkif_request_segment){ .gref = 10, .first_sect = 0,
                                                     .last_sect = 7 };
        seg[63].first_sect = 5;
        seg[63].last_sect = 2;
        front_init(&f, 0, 0);
        CHECK(bs_blkif_stop(f.b) == 0);
        bs_blkif_free(f.b);
        bs_target_free(f.tgt);
        f.cfg.sync_io = sync_io;
        f.cfg.drain_timeout_ms = 500;
        CHECK(bs_target_new(&f.cfg, &f.tgt) == 0);
        CHECK(bs_blkif_new(f.tgt, 0, &f.b) == 0);
        CHECK(bs_blkif_start(f.b, &ops, &f.bcfg) == 0);
        CHECK(pthread_create(&th, NULL, flood_thread, &fl) == 0);
        /* the flood is really being served before we look */
        double t0 = now_s();
        struct bs_queue_stats s;
        do {
            usleep(1000);
            bs_blkif_get_stats(f.b, &s);
        } while ((s.kicks < 2000 || __atomic_load_n(&fl.answered, __ATOMIC_RELAXED) <= 20000) &&
                 now_s() - t0 < 60);
        CHECK(s.kicks >= 2000 && __atomic_load_n(&fl.answered, __ATOMIC_RELAXED) > 20000);
        usleep(200000);
        CHECK(cq_overflow_small());
        double t1 = now_s();
        CHECK(bs_blkif_stop(f.b) == 0);
        double took = now_s() - t1;
        if (took >= 1.0 || fl.ended)
            fprintf(stderr, "stop under a flood took %.2f s (sync_io %d)\n", took, sync_io);
        CHECK(!fl.ended && took < 1.0);   /* answered while the flood still ran */
        fl.stop = 1;
        pthread_join(th, NULL);
        front_fini(&f);
    }
}


/* QoS on the blkif transport: 200 IOPS holds 96 requests (in batches the
 * ring holds) to (96 - 20) / 200 s, a stop with one held answers it, and
 * nothing is lost. */
static void test_qos(void)
{
    static struct bs_qos vol;
    struct front f;
    memset(&vol, 0, sizeof(vol));
    vol.lim[BS_QOS_IOPS_TOTAL].rate = 200;
    bs_qos_rebase(&vol, -1);
    front_init(&f, 0, 1);
    bs_target_set_qos(f.tgt, &vol, NULL);
    double t0 = now_s();
    int total = 0;
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 24; i++, total++)
            rw(&f, i % 2 ? BLKIF_OP_READ : BLKIF_OP_WRITE, (uint64_t)total,
               (uint64_t)i * 8, 1, 10 + (uint32_t)(i % 8), 0, 7);
        kick(&f);
        for (int i = 0; i < 24; i++)
            CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    }
    double t = now_s() - t0;
    CHECK(t >= 0.36 && t < 2.0);
    struct bs_queue_stats st;
    bs_blkif_get_stats(f.b, &st);
    CHECK(st.throttled > 50 && vol.throttled == st.throttled);
    /* a stop while requests wait for budget */
    vol.lim[BS_QOS_IOPS_TOTAL].rate = 1;
    bs_qos_rebase(&vol, -1);
    for (int i = 0; i < 4; i++)
        rw(&f, BLKIF_OP_READ, (uint64_t)i, (uint64_t)i * 8, 1, 10, 0, 7);
    kick(&f);
    usleep(100000);
    t0 = now_s();
    CHECK(bs_blkif_stop(f.b) == 0);
    CHECK(now_s() - t0 < 1.0);
    int answered = 0;
    while (RING_HAS_UNCONSUMED_RESPONSES(&f.ring)) {
        CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
        answered++;
    }
    CHECK(answered >= 1 && answered < 4);   /* the rest wait in the ring */
    /* the next start serves them */
    vol.lim[BS_QOS_IOPS_TOTAL].rate = 0;
    CHECK(bs_blkif_start(f.b, &ops, &f.bcfg) == 0);
    eventfd_write(fx.evt, 1);
    for (; answered < 4; answered++)
        CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    front_fini(&f);
}

/* The blkif transport on an RBD image: the same requests as test_rw, the
 * data read back through the ring (there is no file to look at). */
static void test_rbd_rw(void)
{
    struct front f;
    uint64_t id = 0;
    front_init(&f, 0, 1);

    for (uint32_t p = 10; p < 13; p++)
        fill_page(p, (uint8_t)(p + 40));
    rw(&f, BLKIF_OP_WRITE, 0x1234, 8, 3, 10, 0, 7);
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 0x1234);
    memset(fx.pages + 20 * PG, 0, 3 * PG);
    rw(&f, BLKIF_OP_READ, 77, 8, 3, 20, 0, 7);
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 77);
    CHECK(memcmp(fx.pages + 20 * PG, fx.pages + 10 * PG, 3 * PG) == 0);

    /* part of a page */
    fill_page(30, 199);
    rw(&f, BLKIF_OP_WRITE, 3, 100, 1, 30, 2, 3);
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    memset(fx.pages + 31 * PG, 0, PG);
    rw(&f, BLKIF_OP_READ, 4, 100, 1, 31, 0, 1);
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    CHECK(memcmp(fx.pages + 31 * PG, fx.pages + 30 * PG + 1024, 1024) == 0);

    next_req(&f)->rw.operation = BLKIF_OP_FLUSH_DISKCACHE;
    next_req(&f)->rw.operation = BLKIF_OP_WRITE_BARRIER;
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);

    /* a discard is a hint to librbd: answered OK, no zeroes promised */
    struct blkif_request_discard *d = &next_req(&f)->d;
    d->operation = BLKIF_OP_DISCARD;
    d->sector_number = 4096;
    d->nr_sectors = 8;
    kick(&f);
    CHECK(wait_rsp(&f, NULL) == BLKIF_RSP_OKAY);

    /* indirect: 20 segments written, then read back into other pages */
    struct blkif_request_segment *segs = (void *)(fx.pages + 100 * PG);
    for (int i = 0; i < 20; i++) {
        segs[i] = (struct blkif_request_segment){ .gref = 200 + (uint32_t)i,
                                                  .first_sect = 0, .last_sect = 7 };
        fill_page(200 + (uint32_t)i, (uint8_t)(i * 5 + 1));
    }
    struct blkif_request_indirect *ind = &next_req(&f)->ind;
    ind->operation = BLKIF_OP_INDIRECT;
    ind->indirect_op = BLKIF_OP_WRITE;
    ind->nr_segments = 20;
    ind->id = 555;
    ind->sector_number = 1024;
    ind->indirect_grefs[0] = 100;
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 555);
    segs = (void *)(fx.pages + 101 * PG);
    for (int i = 0; i < 20; i++)
        segs[i] = (struct blkif_request_segment){ .gref = 300 + (uint32_t)i,
                                                  .first_sect = 0, .last_sect = 7 };
    memset(fx.pages + 300 * PG, 0, 20 * PG);
    ind = &next_req(&f)->ind;
    ind->operation = BLKIF_OP_INDIRECT;
    ind->indirect_op = BLKIF_OP_READ;
    ind->nr_segments = 20;
    ind->id = 556;
    ind->sector_number = 1024;
    ind->indirect_grefs[0] = 101;
    kick(&f);
    CHECK(wait_rsp(&f, &id) == BLKIF_RSP_OKAY && id == 556);
    CHECK(memcmp(fx.pages + 300 * PG, fx.pages + 200 * PG, 20 * PG) == 0);

    struct bs_queue_stats st;
    CHECK(bs_blkif_get_stats(f.b, &st) == 0);
    CHECK(st.reqs_write == 3 && st.reqs_read == 3 && st.reqs_flush == 2);
    CHECK(st.io_errors == 0 && st.bad_chains == 0);
    front_fini(&f);
}

int main(int argc, char **argv)
{
    fx.memfd = memfd_create("guest-pages", MFD_CLOEXEC);
    if (ftruncate(fx.memfd, (off_t)NPAGES * PG))
        return 2;
    fx.pages = mmap(NULL, (size_t)NPAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fx.memfd, 0);
    fx.evt = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fx.notified = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    if (argc == 5 && strcmp(argv[1], "--rbd") == 0) {
        struct bs_rbd_cfg rc = { .conf = argv[2], .pool = argv[3], .image = argv[4],
                                 .nspace = "", .op_timeout_s = 30, .connect_timeout_s = 10 };
        int ret = bs_rbd_open(&rc, &rbd_img);
        if (ret) {
            fprintf(stderr, "test_blkif: rbd open (%s): %s\n", rc.stage, strerror(-ret));
            return 2;
        }
        test_rbd_rw();
        bs_rbd_close(rbd_img);
        if (failures) {
            fprintf(stderr, "test_blkif --rbd: %d failure(s)\n", failures);
            return 1;
        }
        printf("test_blkif --rbd: all checks passed\n");
        return 0;
    }
    test_rw(0);
    test_rw(1);
    test_faults();
    test_barrier();
    test_full_ring();
    test_flood_is_bounded();
    test_qos();
    if (failures) {
        fprintf(stderr, "test_blkif: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_blkif: all checks passed\n");
    return 0;
}
