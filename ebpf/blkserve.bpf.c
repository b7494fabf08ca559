/* blkserve tracing programs, compiled and loaded by bcc (blkserve/trace.py).
 *
 * Always: per-volume, per-op log2 latency histograms from the engine's USDT
 * probe request_done (its latency argument: descriptor pop to used-ring
 * entry), aggregated in the kernel in per-CPU maps.
 *
 * With -DBREAKDOWN: where one request's time goes, per volume, as log2
 * histograms of each stage:
 *   0 kick->pop        guest kick (the io_uring poll completing on the kick
 *                      eventfd, user_data 1) to the first request popped
 *   1 pop->submit      request_start to io_uring_submit_req (same user_data)
 *   2 submit->complete io_uring_submit_req to io_uring_complete: the backing
 *   3 complete->used   io_uring_complete to request_done (CQE reaped, status
 *                      and used entry written)
 *   4 used->notify     first request_done of a batch to the guest notify
 * For RBD backings (-DRBD: the engine has the probes) stages 1 and 2 end and
 * start at the probes rbd_submit (the request handed to librbd) and
 * rbd_complete (librbd's completion callback) instead of io_uring's.
 * With -DBLOCK: block-layer time (block_rq_issue to block_rq_complete) of the
 * block devices listed in the block_devs map, per device.
 *
 * Only processes listed in the `workers` map (tgid in the tracer's pid
 * namespace -> worker index, below MAX_WORKERS) are traced.  Histograms are per-CPU arrays indexed by
 * (worker, op or stage, log2 slot); Python sums the CPUs when it reads them. */
#include <uapi/linux/ptrace.h>

#define NOPS 7
#define NSTAGES 5
#define NSLOTS 32          /* log2 microsecond slots: up to ~35 minutes */
#define MAX_WORKERS 64
#define MAX_DEVS 16

BPF_PERCPU_ARRAY(lat_hist, u64, MAX_WORKERS * NOPS * NSLOTS);
BPF_HASH(workers, u32, u32, MAX_WORKERS);

static __always_inline u32 log2_slot(u64 v)
{
    u32 s = v ? bpf_log2l(v) + 1 : 0;   /* slot s: [2^(s-1), 2^s) us */
    return s < NSLOTS ? s : NSLOTS - 1;
}

/* The calling thread's ids (tgid << 32 | pid) as seen in the tracer's pid
 * namespace (PIDNS_DEV, PIDNS_INO: its /proc/self/ns/pid), where the pids of
 * the workers map come from: in a container they are not the kernel's global
 * ids.  0 for a thread outside that namespace. */
static __always_inline u64 current_pid_tgid(void)
{
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(PIDNS_DEV, PIDNS_INO, &ns, sizeof(ns)))
        return 0;
    return (u64)ns.tgid << 32 | ns.pid;
}

/* The worker's index, or -1 if the process is not traced. */
static __always_inline int worker_index(u32 tgid)
{
    u32 *w = workers.lookup(&tgid);
    return w && *w < MAX_WORKERS ? (int)*w : -1;
}

#ifdef BREAKDOWN
BPF_PERCPU_ARRAY(stage_hist, u64, MAX_WORKERS * NSTAGES * NSLOTS);

struct ud_key {
    u32 tgid;
    u32 pad;
    u64 user_data;
};
BPF_HASH(pop_ts, struct ud_key, u64, 65536);
BPF_HASH(submit_ts, struct ud_key, u64, 65536);
BPF_HASH(complete_ts, struct ud_key, u64, 65536);
BPF_HASH(ring_of_tid, u32, u64, 4096);      /* queue thread -> its io_uring ctx */
BPF_HASH(tgid_of_ring, u64, u32, 4096);
BPF_TABLE("lru_hash", u64, u64, kick_ts, 4096);      /* ring ctx -> pending kick time */
BPF_HASH(first_done, u32, u64, 4096);       /* queue thread -> first used entry */

static __always_inline void stage(u32 tgid, u32 st, u64 delta_ns)
{
    int w = worker_index(tgid);
    if (w < 0)
        return;
    int i = (w * NSTAGES + st) * NSLOTS + log2_slot(delta_ns / 1000);
    stage_hist.increment(i);
}

int on_request_start(struct pt_regs *ctx)
{
    u64 id = current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (worker_index(tgid) < 0)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct ud_key k = {.tgid = tgid};
    bpf_usdt_readarg(6, ctx, &k.user_data);
    pop_ts.update(&k, &now);
    u64 *ring = ring_of_tid.lookup(&tid);
    if (ring) {
        u64 r = *ring;
        u64 *kt = kick_ts.lookup(&r);
        if (kt) {
            if (now > *kt)
                stage(tgid, 0, now - *kt);
            kick_ts.delete(&r);
        }
    }
    return 0;
}

/* (bcc rewrites bpf_usdt_readarg only inside the probe functions themselves,
 * so the caller reads the arguments) */
static __always_inline void breakdown_done(u32 tgid, u64 user_data)
{
    u32 tid = (u32)current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    struct ud_key k = {.tgid = tgid, .user_data = user_data};
    u64 *ct = complete_ts.lookup(&k);
    if (ct) {
        if (now > *ct)
            stage(tgid, 3, now - *ct);
        complete_ts.delete(&k);
    }
    pop_ts.delete(&k);
    submit_ts.delete(&k);
    first_done.insert(&tid, &now);   /* keeps the batch's first */
}

int on_notify(struct pt_regs *ctx)
{
    u64 id = current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (worker_index(tgid) < 0)
        return 0;
    u64 *fd = first_done.lookup(&tid);
    if (fd) {
        u64 now = bpf_ktime_get_ns();
        if (now > *fd)
            stage(tgid, 4, now - *fd);
        first_done.delete(&tid);
    }
    return 0;
}

/* A request went to the backing (io_uring, or librbd): pop->submit ends,
 * submit->complete starts. */
static __always_inline void submitted(u32 tgid, u64 user_data, u64 now)
{
    struct ud_key k = {.tgid = tgid, .user_data = user_data};
    u64 *pt = pop_ts.lookup(&k);
    if (pt) {
        if (now > *pt)
            stage(tgid, 1, now - *pt);
        pop_ts.delete(&k);     /* a resubmission (short I/O) is not a new pop */
    }
    submit_ts.update(&k, &now);
}

/* ... and came back: submit->complete ends, complete->used starts. */
static __always_inline void completed(u32 tgid, u64 user_data, u64 now)
{
    struct ud_key k = {.tgid = tgid, .user_data = user_data};
    u64 *st = submit_ts.lookup(&k);
    if (st) {
        if (now > *st)
            stage(tgid, 2, now - *st);
        submit_ts.delete(&k);
        complete_ts.update(&k, &now);
    }
}

TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    u64 id = current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (worker_index(tgid) < 0)
        return 0;
    u64 ring = (u64)args->ctx;
    ring_of_tid.update(&tid, &ring);
    tgid_of_ring.update(&ring, &tgid);
    if (args->user_data < 16)    /* the engine's own (BS_UD_RESERVED): polls, timers */
        return 0;
    submitted(tgid, args->user_data, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_complete)
{
    u64 ring = (u64)args->ctx;
    u32 *tgidp = tgid_of_ring.lookup(&ring);
    if (!tgidp)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (args->user_data == 1) {        /* the kick eventfd's poll fired */
        kick_ts.insert(&ring, &now);
        return 0;
    }
    if (args->user_data < 16)
        return 0;
    completed(*tgidp, args->user_data, now);
    return 0;
}
#ifdef RBD
int on_rbd_submit(struct pt_regs *ctx)
{
    u32 tgid = current_pid_tgid() >> 32;
    if (worker_index(tgid) < 0)
        return 0;
    u64 user_data = 0;
    bpf_usdt_readarg(3, ctx, &user_data);
    submitted(tgid, user_data, bpf_ktime_get_ns());
    return 0;
}

int on_rbd_complete(struct pt_regs *ctx)
{
    u32 tgid = current_pid_tgid() >> 32;
    if (worker_index(tgid) < 0)
        return 0;
    u64 user_data = 0;
    bpf_usdt_readarg(3, ctx, &user_data);
    completed(tgid, user_data, bpf_ktime_get_ns());
    return 0;
}
#endif /* RBD */
#endif /* BREAKDOWN */

int on_request_done(struct pt_regs *ctx)
{
    u32 tgid = current_pid_tgid() >> 32;
    if (worker_index(tgid) < 0)
        return 0;
    u64 op = 0, lat = 0;
    bpf_usdt_readarg(3, ctx, &op);
    bpf_usdt_readarg(7, ctx, &lat);
    int i = (worker_index(tgid) * NOPS + (op < NOPS ? (int)op : NOPS - 1)) * NSLOTS +
            log2_slot(lat / 1000);
    lat_hist.increment(i);
#ifdef BREAKDOWN
    u64 user_data = 0;
    bpf_usdt_readarg(8, ctx, &user_data);
    breakdown_done(tgid, user_data);
#endif
    return 0;
}

#ifdef BLOCK
struct rq_key {
    u32 dev;
    u32 pad;
    u64 sector;
};
BPF_HASH(block_devs, u32, u32, MAX_DEVS);   /* kernel dev_t -> device index */
BPF_HASH(rq_start, struct rq_key, u64, 65536);
BPF_PERCPU_ARRAY(blk_hist, u64, MAX_DEVS * NSLOTS);

TRACEPOINT_PROBE(block, block_rq_issue)
{
    u32 dev = args->dev;
    if (!block_devs.lookup(&dev))
        return 0;
    struct rq_key k = {.dev = dev, .sector = args->sector};
    u64 now = bpf_ktime_get_ns();
    rq_start.update(&k, &now);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    u32 dev = args->dev;
    u32 *d = block_devs.lookup(&dev);
    if (!d || *d >= MAX_DEVS)
        return 0;
    struct rq_key k = {.dev = dev, .sector = args->sector};
    u64 *t = rq_start.lookup(&k);
    if (!t)
        return 0;
    u64 now = bpf_ktime_get_ns();
    int i = *d * NSLOTS + log2_slot((now - *t) / 1000);
    blk_hist.increment(i);
    rq_start.delete(&k);
    return 0;
}
#endif /* BLOCK */
