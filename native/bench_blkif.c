/* blkserve bench --blkif: a Xen blkfront without Xen, to measure the blkif
 * transport on the same engine, core and file as the virtio one.
 *
 * The "guest" is a memfd of pages (grant ref N = page N) and the grant and
 * event-channel functions are stand-ins over it (as in the C tests): the
 * backend maps a ref by mmap(2) of that page, and with persistent grants
 * (as Linux's blkfront negotiates them) each data page is mapped once and
 * reused, so in the measured window the backend does exactly what it does
 * under Xen minus the hypercalls.  The frontend runs in the calling thread
 * like blkfront: requests on the shared ring, a notification only when the
 * backend's req_event asks for one, responses consumed after polling the
 * ring for up to poll_ns and then sleeping on the "event channel" (an
 * eventfd), with rsp_event re-armed as RING_FINAL_CHECK_FOR_RESPONSES does.
 * Backend CPU is the process's minus the frontend thread's. */
#define _GNU_SOURCE            /* before any header: CPU_SET, memfd_create, RUSAGE_THREAD */
#include "blkif.h"
#include "bench.h"

#include <sys/resource.h>

#define BB_DOMID 7
#define BB_PORT 3
#define BB_MAX_DEPTH 32u    /* one page of ring: 32 requests */

struct bb_fake {
    int memfd;
    int evt;                /* frontend -> backend ("event channel") */
    int notified;           /* backend -> frontend */
    uint32_t npages;
};
static struct bb_fake bbx;  /* one run at a time (the fake Xen is global) */
static pthread_mutex_t bb_lock = PTHREAD_MUTEX_INITIALIZER;

static void *bb_map(void *xgt, uint32_t count, uint32_t domid, uint32_t *refs, int prot)
{
    (void)xgt;
    if (domid != BB_DOMID || count == 0)
        return NULL;
    for (uint32_t i = 0; i < count; i++)
        if (refs[i] >= bbx.npages)
            return NULL;
    uint8_t *a = mmap(NULL, (size_t)count * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return NULL;
    for (uint32_t i = 0; i < count; i++)
        if (mmap(a + (size_t)i * PAGE, PAGE, prot, MAP_SHARED | MAP_FIXED, bbx.memfd,
                 (off_t)refs[i] * PAGE) == MAP_FAILED) {
            munmap(a, (size_t)count * PAGE);
            return NULL;
        }
    return a;
}

static int bb_unmap(void *xgt, void *addr, uint32_t count)
{
    (void)xgt;
    return munmap(addr, (size_t)count * PAGE);
}

static int bb_notify(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return eventfd_write(bbx.notified, 1);
}

static int bb_pending(void *xce)
{
    eventfd_t v;
    (void)xce;
    return eventfd_read(bbx.evt, &v) == 0 ? BB_PORT : -1;
}

static int bb_unmask(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

static const struct bs_xen_ops bb_ops = {
    .map_domain_grant_refs = bb_map, .unmap = bb_unmap, .notify = bb_notify,
    .pending = bb_pending, .unmask = bb_unmask,
};

struct bb_req {
    uint64_t offset;
    uint64_t t_submit;
    uint8_t is_read;
};

static int pin_self(int cpu)
{
    if (cpu < 0)
        return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return -pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static uint64_t thread_cpu_ns(int who)
{
    struct rusage ru;
    if (getrusage(who, &ru))
        return 0;
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ULL +
           (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ULL;
}

static void bb_submit(blkif_front_ring_t *fr, struct bb_req *reqs, uint32_t slot,
                      const struct bs_bench_blkif_cfg *cfg, uint64_t nblocks, uint64_t *rng,
                      uint32_t pages_per_req)
{
    struct bb_req *q = &reqs[slot];
    q->is_read = cfg->rw == BS_BENCH_RANDREAD ||
                 (cfg->rw == BS_BENCH_RANDRW && bench_rng(rng) % 100 < cfg->rwmix_read);
    q->offset = (bench_rng(rng) % nblocks) * cfg->bs;
    struct blkif_request *r = RING_GET_REQUEST(fr, fr->req_prod_pvt);
    r->operation = q->is_read ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    r->nr_segments = (uint8_t)pages_per_req;
    r->handle = 0;
    r->id = slot;
    r->sector_number = q->offset / SECTOR;
    uint32_t left = cfg->bs;
    for (uint32_t i = 0; i < pages_per_req; i++) {
        uint32_t n = left < PAGE ? left : (uint32_t)PAGE;
        r->seg[i].gref = 1 + slot * pages_per_req + i;   /* page 0 is the ring */
        r->seg[i].first_sect = 0;
        r->seg[i].last_sect = (uint8_t)(n / SECTOR - 1);
        left -= n;
    }
    fr->req_prod_pvt++;
    q->t_submit = bench_now_ns();
}

int bs_bench_blkif(bs_target *t, const struct bs_bench_blkif_cfg *cfg,
                   struct bs_bench_blkif_result *out)
{
    uint32_t depth = cfg->iodepth;
    uint32_t pages_per_req = (cfg->bs + (uint32_t)PAGE - 1) / (uint32_t)PAGE;
    uint64_t capacity = t->cfg.capacity;
    uint64_t size = cfg->size && cfg->size < capacity ? cfg->size : capacity;
    int ret;

    memset(out, 0, sizeof(*out));
    if (depth == 0 || depth > BB_MAX_DEPTH || cfg->bs == 0 || cfg->bs % SECTOR ||
        pages_per_req > BLKIF_MAX_SEGMENTS_PER_REQUEST || size < cfg->bs ||
        (cfg->rw != BS_BENCH_RANDREAD && cfg->rw != BS_BENCH_RANDWRITE &&
         cfg->rw != BS_BENCH_RANDRW))
        return -EINVAL;
    if (pthread_mutex_trylock(&bb_lock))
        return -EBUSY;

    cpu_set_t saved;
    pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved);
    bs_blkif *b = NULL;
    uint64_t *hist = calloc(HIST_N, sizeof(*hist));
    struct bb_req *reqs = calloc(depth, sizeof(*reqs));
    uint8_t *mem = MAP_FAILED;
    bbx.npages = 1 + depth * pages_per_req;
    bbx.memfd = memfd_create("blkserve-bench-blkif", MFD_CLOEXEC);
    bbx.evt = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    bbx.notified = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ret = -ENOMEM;
    if (!hist || !reqs || bbx.memfd < 0 || bbx.evt < 0 || bbx.notified < 0 ||
        ftruncate(bbx.memfd, (off_t)bbx.npages * (off_t)PAGE))
        goto out;
    mem = mmap(NULL, (size_t)bbx.npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED,
               bbx.memfd, 0);
    if (mem == MAP_FAILED)
        goto out;
    memset(mem + PAGE, 0x5a, (size_t)(bbx.npages - 1) * PAGE);   /* write payload */

    blkif_sring_t *sring = (blkif_sring_t *)mem;                    /* page 0 */
    blkif_front_ring_t fr;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&fr, sring, PAGE);

    /* the backend's thread inherits the affinity of its creator */
    if ((ret = pin_self(cfg->backend_cpu)))
        goto out;
    ret = bs_blkif_new(t, 0, &b);
    if (ret)
        goto out;
    struct bs_blkif_cfg bc = {
        .sring = sring, .ring_pages = 1, .domid = BB_DOMID, .port = BB_PORT,
        .evtchn_fd = bbx.evt, .persistent = 1, .max_indirect = 0, .discard = 0,
    };
    ret = bs_blkif_start(b, &bb_ops, &bc);
    if (ret) {
        bs_blkif_free(b);
        b = NULL;
        goto out;
    }
    if ((ret = pin_self(cfg->frontend_cpu)))
        goto stop;

    uint64_t rng = cfg->seed ? cfg->seed : bench_now_ns() | 1;
    uint64_t nblocks = size / cfg->bs;
    uint64_t t0 = bench_now_ns();
    uint64_t t_from = t0 + cfg->ramp_ns, t_to = t_from + cfg->runtime_ns;
    uint64_t cpu_from = 0, cpu_front_from = 0, lat_sum = 0;
    uint64_t timeout = cfg->timeout_ns ? cfg->timeout_ns : 30000000000ULL;
    uint64_t last_progress = t0, wait_ns = 0;
    int counting = 0, done = 0;
    uint32_t inflight = 0;
    struct bs_bench_stats *st = &out->stats;
    st->first_bad_offset = -1;

    for (uint32_t i = 0; i < depth; i++)
        bb_submit(&fr, reqs, i, cfg, nblocks, &rng, pages_per_req);
    inflight = depth;
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
    if (notify) {
        eventfd_write(bbx.evt, 1);
        st->kicks++;
    }
    while (inflight) {
        uint64_t now = bench_now_ns();
        if (!counting && now >= t_from) {
            counting = 1;
            cpu_from = thread_cpu_ns(RUSAGE_SELF);
            cpu_front_from = thread_cpu_ns(RUSAGE_THREAD);
        }
        if (counting == 1 && now >= t_to) {
            counting = 2;
            out->backend_cpu_ns = (thread_cpu_ns(RUSAGE_SELF) - cpu_from) -
                                  (thread_cpu_ns(RUSAGE_THREAD) - cpu_front_from);
            st->elapsed_ns = now - t_from;
            done = 1;            /* no new requests: drain what is in flight */
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
        if (!more) {
            /* poll the ring, then sleep on the "event channel" */
            uint64_t w0 = now, deadline = now + cfg->poll_ns;
            while (!RING_HAS_UNCONSUMED_RESPONSES(&fr) && bench_now_ns() < deadline)
                bench_cpu_relax();
            if (!RING_HAS_UNCONSUMED_RESPONSES(&fr)) {
                struct pollfd p = { .fd = bbx.notified, .events = POLLIN };
                eventfd_t v;
                st->sleeps++;
                if (poll(&p, 1, 1) > 0 && eventfd_read(bbx.notified, &v) == 0)
                    st->calls++;
            }
            wait_ns += bench_now_ns() - w0;
            if (!RING_HAS_UNCONSUMED_RESPONSES(&fr)) {
                if (bench_now_ns() - last_progress > timeout) {
                    ret = -ETIMEDOUT;
                    goto stop;
                }
                continue;
            }
        }
        RING_IDX rp = fr.sring->rsp_prod;
        rmb();
        uint32_t resubmit = 0;
        for (RING_IDX i = fr.rsp_cons; i != rp; i++) {
            struct blkif_response *r = RING_GET_RESPONSE(&fr, i);
            uint64_t slot = r->id;
            if (slot >= depth) {
                ret = -EPROTO;
                goto stop;
            }
            uint64_t end = bench_now_ns();
            struct bb_req *q = &reqs[slot];
            st->ios_all++;
            if (r->status != BLKIF_RSP_OKAY) {
                st->io_errors++;
                st->errors++;
                if (st->first_bad_offset < 0)
                    st->first_bad_offset = (int64_t)q->offset;
            }
            if (counting == 1) {
                uint64_t lat = end - q->t_submit;
                st->ios++;
                if (q->is_read)
                    st->ios_read++;
                else
                    st->ios_write++;
                st->bytes += cfg->bs;
                lat_sum += lat;
                hist[bench_hist_bucket(lat)]++;
                if (st->lat_min_ns == 0 || lat < st->lat_min_ns)
                    st->lat_min_ns = lat;
                if (lat > st->lat_max_ns)
                    st->lat_max_ns = lat;
            }
            inflight--;
            if (!done) {
                bb_submit(&fr, reqs, (uint32_t)slot, cfg, nblocks, &rng, pages_per_req);
                inflight++;
                resubmit++;
            }
        }
        fr.rsp_cons = rp;
        last_progress = bench_now_ns();
        if (resubmit) {
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
            if (notify) {
                eventfd_write(bbx.evt, 1);
                st->kicks++;
            }
        }
    }
    st->wait_ns = wait_ns;
    bench_finish_stats(st, hist, lat_sum);
    ret = 0;
stop:
    if (b) {
        int r2 = bs_blkif_stop(b);
        if (!ret)
            ret = r2;
        bs_blkif_free(b);
    }
out:
    pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    if (mem != MAP_FAILED)
        munmap(mem, (size_t)bbx.npages * PAGE);
    if (bbx.memfd >= 0)
        close(bbx.memfd);
    if (bbx.evt >= 0)
        close(bbx.evt);
    if (bbx.notified >= 0)
        close(bbx.notified);
    bbx.memfd = bbx.evt = bbx.notified = -1;
    free(reqs);
    free(hist);
    pthread_mutex_unlock(&bb_lock);
    return ret;
}
