/* The request execution core, shared by the transports (engine.c: virtqueues
 * over vhost-user; blkif.c: Xen blkif rings).  A transport pops and parses a
 * request into a struct bs_io; from there this file turns it into an io_uring
 * operation (or a plain syscall with sync_io), retries and splits it as
 * needed, maps the result to a status, keeps the counters, latency histograms
 * and USDT probes, and hands the status back through the transport's done()
 * callback. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CANCEL_GRACE_NS 1000000000ULL
#define DRAIN_TIMEOUT_MS 30000  /* bs_target_cfg.drain_timeout_ms = 0 */

/* Fixed-file slots registered with each ring (io_uring_register_files). */
#define FIXED_DIRECT 0
#define FIXED_BUFFERED 1

/* ---- target: the backing every transport's queues serve ---- */

void bs_get_limits(struct bs_limits *out)
{
    out->seg_max = BS_SEG_MAX;
    out->size_max = BS_SIZE_MAX;
    out->max_discard_sectors = BS_MAX_DWZ_SECTORS;
    out->max_discard_seg = BS_MAX_DWZ_SEG;
    out->max_write_zeroes_sectors = BS_MAX_DWZ_SECTORS;
    out->max_write_zeroes_seg = BS_MAX_DWZ_SEG;
}

int bs_target_new(const struct bs_target_cfg *cfg, bs_target **out)
{
    uint32_t bs = cfg->block_size ? cfg->block_size : BS_SECTOR;
    if ((cfg->fd < 0 && !cfg->rbd && !cfg->null_io) || (cfg->rbd && cfg->sync_io) ||
        (cfg->null_io && (cfg->rbd || !cfg->sync_io || cfg->fd >= 0)) ||
        (bs != 512 && bs != 4096) || cfg->capacity % bs)
        return -EINVAL;
    bs_target *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->cfg = *cfg;
    t->cfg.block_size = bs;
    if (t->cfg.fd_buffered < 0)
        t->cfg.fd_buffered = cfg->fd;
    *out = t;
    return 0;
}

void bs_target_set_writethrough(bs_target *t, int writethrough)
{
    __atomic_store_n(&t->cfg.writethrough, !!writethrough, __ATOMIC_RELAXED);
}

int bs_target_set_capacity(bs_target *t, uint64_t capacity)
{
    if (capacity == 0 || capacity % t->cfg.block_size)
        return -EINVAL;
    __atomic_store_n(&t->cfg.capacity, capacity, __ATOMIC_RELAXED);
    return 0;
}

void bs_target_free(bs_target *t)
{
    free(t);
}

/* ---- the request core ---- */

uint64_t bs_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct io_uring_sqe *bs_core_sqe(struct bs_core *c)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
    if (!sqe) {
        io_uring_submit(&c->ring);
        sqe = io_uring_get_sqe(&c->ring);
    }
    return sqe;
}

int bs_core_init(struct bs_core *c, unsigned nslots)
{
    unsigned entries = nslots + 8;
    /* Newest first: completions run only when this thread enters the ring
     * (DEFER_TASKRUN, 6.1+), else without IPIs (COOP_TASKRUN, 5.19+). */
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int ret = -EINVAL;

    c->inflight = 0;
    c->stopping = 0;
    c->stop_expired = 0;
    c->abandoned = 0;
    c->sync_head = NULL;
    c->sync_tail = &c->sync_head;
    c->held = NULL;
    c->qos_timer = 0;
    c->qos_bypass = 0;
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        ret = io_uring_queue_init(entries, &c->ring, flag_sets[i]);
        if (ret == 0)
            break;
        if (ret != -EINVAL)
            return ret;
    }
    if (ret)
        return ret;
    c->rbd_efd = -1;
    const struct bs_target_cfg *t = &c->target->cfg;
    if (t->rbd) {
        c->fixed_files = 0;
        ret = bs_rbd_core_init(c);
        if (ret)
            io_uring_queue_exit(&c->ring);
        return ret;
    }
    /* Registered files spare an fd lookup per request; optional. */
    int fds[2] = { t->fd, t->fd_buffered };
    c->fixed_files = !t->null_io && io_uring_register_files(&c->ring, fds, 2) == 0;
    return 0;
}

void bs_core_exit(struct bs_core *c)
{
    if (c->rbd_efd >= 0)
        bs_rbd_core_exit(c);
    io_uring_queue_exit(&c->ring);
}

static int stat_op(const struct bs_blk_req *r)
{
    switch (r->type) {
    case BS_BLK_T_IN: return BS_STAT_READ;
    case BS_BLK_T_OUT: return BS_STAT_WRITE;
    case BS_BLK_T_FLUSH: return BS_STAT_FLUSH;
    case BS_BLK_T_GET_ID: return BS_STAT_GET_ID;
    case BS_BLK_T_DISCARD: return BS_STAT_DISCARD;
    case BS_BLK_T_WRITE_ZEROES: return BS_STAT_WRITE_ZEROES;
    default: return BS_STAT_OTHER;
    }
}

int bs_lat_bucket(uint64_t ns)
{
    int b = ns ? 64 - __builtin_clzll(ns) : 0;   /* ns < 2^b */
    return b < BS_LAT_BUCKETS ? b : BS_LAT_BUCKETS - 1;
}

void bs_core_account(struct bs_core *c, struct bs_io *io, uint8_t status)
{
    struct bs_blk_req *r = &io->req;
    struct bs_queue_stats *st = c->st;
    int op = stat_op(r);
    uint64_t lat = c->t_now > io->t_pop ? c->t_now - io->t_pop : 0;

    BS_STAT_ADD(st->op_status[op][status <= BS_BLK_S_UNSUPP ? status : BS_BLK_S_IOERR], 1);
    BS_STAT_ADD(st->op_lat_sum_ns[op], lat);
    BS_STAT_ADD(st->op_lat_hist[op][bs_lat_bucket(lat)], 1);
    if (status == BS_BLK_S_OK)
        BS_STAT_ADD(st->op_bytes[op], op == BS_STAT_GET_ID ? r->used_len - 1 : r->len);
    BS_PROBE(request_done, c->target->cfg.serial, U64(c->index), U64(op), U64(r->offset >> 9),
             U64(r->len), U64(status), lat, io);
}

static void complete(struct bs_core *c, struct bs_io *io, uint8_t status)
{
    bs_core_account(c, io, status);
    c->done(c, io, status);
}

static int dio_aligned(const struct bs_target_cfg *t, const struct bs_blk_req *r,
                       const struct iovec *iov)
{
    uint64_t mask = t->dio_align - 1;
    if (t->dio_align == 0)
        return 1;
    if (r->offset & mask)
        return 0;
    for (int i = 0; i < r->iov_count; i++)
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & mask)
            return 0;
    return 1;
}

/* fallocate mode for the current discard / write-zeroes range.  Files and
 * block devices both take these: on a block device PUNCH_HOLE zeroes by
 * unmapping (no fallback to writing), ZERO_RANGE zeroes without unmapping. */
static int dwz_mode(const struct bs_blk_req *r, const struct bs_io *io)
{
    const int punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    const int zero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if (r->op == BS_OP_DISCARD)
        return punch;
    /* write zeroes: unmapping allowed -> punch first; either way the other
     * mode is the fallback (tmpfs has no ZERO_RANGE, some devices no unmap) */
    int prefer_punch = r->ranges[io->cur].unmap;
    return (prefer_punch ^ io->fallback) ? punch : zero;
}

static int writethrough(const struct bs_core *c, const struct bs_blk_req *r)
{
    return r->fua || __atomic_load_n(&c->target->cfg.writethrough, __ATOMIC_RELAXED);
}

/* A null backing: what the guest asked is done at once, nothing stored. */
static int null_op(struct bs_io *io)
{
    struct bs_blk_req *r = &io->req;
    struct iovec *iov = &io->chain.iov[r->iov_first];

    switch (r->op) {
    case BS_OP_READ:
        for (int i = 0; i < r->iov_count; i++)
            memset(iov[i].iov_base, 0, iov[i].iov_len);
        return (int)r->len;
    case BS_OP_WRITE:
        return (int)r->len;
    case BS_OP_FLUSH:
    case BS_OP_DISCARD:
    case BS_OP_WRITE_ZEROES:
        return 0;
    default:
        return -EINVAL;
    }
}

/* The sync engine: the same operation as an SQE below, as a plain syscall.
 * Returns what the CQE's res would be. */
static int sync_op(struct bs_core *c, struct bs_io *io)
{
    struct bs_blk_req *r = &io->req;
    struct iovec *iov = &io->chain.iov[r->iov_first];
    off_t off = (off_t)(r->offset + io->done);
    ssize_t res;

    if (c->target->cfg.null_io)
        return null_op(io);

    switch (r->op) {
    case BS_OP_READ:
        /* one segment (the common case): no iovec for the kernel to import */
        res = r->iov_count == 1 ? pread(io->fd, iov->iov_base, iov->iov_len, off)
                                : preadv(io->fd, iov, r->iov_count, off);
        break;
    case BS_OP_WRITE:
        if (writethrough(c, r))
            res = pwritev2(io->fd, iov, r->iov_count, off, RWF_DSYNC);
        else if (r->iov_count == 1)
            res = pwrite(io->fd, iov->iov_base, iov->iov_len, off);
        else
            res = pwritev(io->fd, iov, r->iov_count, off);
        break;
    case BS_OP_FLUSH:
        res = fdatasync(io->fd);
        break;
    case BS_OP_DISCARD:
    case BS_OP_WRITE_ZEROES:
        res = fallocate(io->fd, dwz_mode(r, io), (off_t)r->ranges[io->cur].offset,
                        (off_t)r->ranges[io->cur].len);
        break;
    default:
        return -EINVAL;
    }
    return res < 0 ? -errno : (int)res;
}

/* Queue the SQE for a request's operation at its current progress. */
static int submit_io(struct bs_core *c, struct bs_io *io)
{
    struct bs_blk_req *r = &io->req;
    if (c->target->cfg.rbd)
        return bs_rbd_submit(c, io);
    if (c->target->cfg.sync_io) {
        io->sync_res = sync_op(c, io);
        io->sync_next = NULL;
        *c->sync_tail = io;
        c->sync_tail = &io->sync_next;
        return 0;
    }
    struct io_uring_sqe *sqe = bs_core_sqe(c);
    if (!sqe)
        return -EBUSY;
    struct iovec *iov = &io->chain.iov[r->iov_first];
    const struct bs_target_cfg *t = &c->target->cfg;
    int fd = io->fd;
    if (c->fixed_files)
        fd = io->fd == t->fd ? FIXED_DIRECT : FIXED_BUFFERED;
    uint64_t off = r->offset + io->done;
    switch (r->op) {
    case BS_OP_READ:
        /* one segment (the common case): no iovec for the kernel to import */
        if (r->iov_count == 1)
            io_uring_prep_read(sqe, fd, iov->iov_base, (unsigned)iov->iov_len, off);
        else
            io_uring_prep_readv(sqe, fd, iov, (unsigned)r->iov_count, off);
        break;
    case BS_OP_WRITE:
        if (r->iov_count == 1)
            io_uring_prep_write(sqe, fd, iov->iov_base, (unsigned)iov->iov_len, off);
        else
            io_uring_prep_writev(sqe, fd, iov, (unsigned)r->iov_count, off);
        if (writethrough(c, r))
            sqe->rw_flags = RWF_DSYNC;
        break;
    case BS_OP_FLUSH:
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        break;
    case BS_OP_DISCARD:
    case BS_OP_WRITE_ZEROES:
        io_uring_prep_fallocate(sqe, fd, dwz_mode(r, io),
                                (off_t)r->ranges[io->cur].offset,
                                (off_t)r->ranges[io->cur].len);
        break;
    default:
        return -EINVAL;
    }
    if (c->fixed_files)
        sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data(sqe, io);
    return 0;
}

static void start_now(struct bs_core *c, struct bs_io *io)
{
    const struct bs_target_cfg *t = &c->target->cfg;

    io->done = 0;
    io->cur = 0;
    io->fallback = 0;
    BS_PROBE(request_start, t->serial, U64(c->index), U64(stat_op(&io->req)),
             U64(io->req.offset >> 9), U64(io->req.len), io);
    if (io->req.op == BS_OP_NONE) {
        complete(c, io, io->req.status);
        return;
    }
    io->fd = dio_aligned(t, &io->req, &io->chain.iov[io->req.iov_first])
                 ? t->fd : t->fd_buffered;
    if (submit_io(c, io)) {
        complete(c, io, BS_BLK_S_IOERR);
        return;
    }
    c->inflight++;
}

/* A QoS wait: wake the thread when it is over, or after QOS_RECHECK_NS to
 * see a changed limit (one timer armed at a time). */
#define QOS_RECHECK_NS 20000000ULL

static void qos_arm(struct bs_core *c, uint64_t wait)
{
    if (c->qos_timer)
        return;
    struct io_uring_sqe *sqe = bs_core_sqe(c);
    if (!sqe)
        return;     /* the next completion or kick looks again */
    if (wait > QOS_RECHECK_NS)
        wait = QOS_RECHECK_NS;
    c->qos_ts.tv_sec = (long long)(wait / 1000000000ULL);
    c->qos_ts.tv_nsec = (long long)(wait % 1000000000ULL);
    io_uring_prep_timeout(sqe, &c->qos_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, BS_UD_QOS);
    c->qos_timer = 1;
}

void bs_core_start(struct bs_core *c, struct bs_io *io)
{
    if (__builtin_expect(__atomic_load_n(&c->target->qos_on, __ATOMIC_RELAXED), 0) &&
        !c->qos_bypass) {
        /* the batch's clock (read once per batch of pops): a stale now only
         * makes the check stricter, never lets more through */
        uint64_t now = c->t_now;
        int by_group;
        uint64_t wait = bs_qos_admit(c->target, io->req.op, io->req.len, now, &by_group, 0);
        if (wait) {
            c->held = io;
            c->held_since = now;
            c->held_by_group = by_group;
            BS_STAT_ADD(c->st->throttled, 1);
            BS_PROBE(throttle, c->target->cfg.serial, U64(c->index), U64(wait), io);
            qos_arm(c, wait);
            return;
        }
    }
    start_now(c, io);
}

int bs_core_qos_tick(struct bs_core *c)
{
    struct bs_io *io = c->held;
    if (!io)
        return 0;
    uint64_t now = bs_now_ns();
    int by_group;
    uint64_t wait = bs_qos_admit(c->target, io->req.op, io->req.len, now, &by_group,
                                 c->stopping);
    if (wait) {
        c->held_by_group |= by_group;
        qos_arm(c, wait);
        return 0;
    }
    c->held = NULL;
    wait = now - c->held_since;
    BS_STAT_ADD(c->st->throttle_wait_ns, wait);
    BS_STAT_ADD(c->st->throttle_wait_hist[bs_lat_bucket(wait)], 1);
    bs_qos_account(c->target, wait, c->held_by_group);
    c->t_now = now;
    start_now(c, io);
    return 1;
}

void bs_core_cqe(struct bs_core *c, struct bs_io *io, int res)
{
    struct bs_blk_req *r = &io->req;

    if (res == -ECANCELED && c->stop_expired) {
        /* A stop gave up on it: no status for the guest.  The transport's
         * record of it (the inflight region) stays, so the next backend
         * redoes it. */
        c->inflight--;
        c->abandoned++;
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        if (submit_io(c, io) == 0)
            return;
        res = -EIO;
    }
    if (res == -EINVAL && io->fd != c->target->cfg.fd_buffered &&
        (r->op == BS_OP_READ || r->op == BS_OP_WRITE)) {
        /* O_DIRECT refused the alignment (a backing with a larger logical
         * block than we assumed): redo it through the page cache. */
        io->fd = c->target->cfg.fd_buffered;
        if (submit_io(c, io) == 0)
            return;
    }
    if (r->op == BS_OP_DISCARD || r->op == BS_OP_WRITE_ZEROES) {
        if ((res == -EOPNOTSUPP || res == -EINVAL) && !io->fallback &&
            r->op == BS_OP_WRITE_ZEROES) {
            io->fallback = 1;
            if (submit_io(c, io) == 0)
                return;
        }
        if (res == -EOPNOTSUPP && r->op == BS_OP_DISCARD)
            res = 0;    /* discard is advisory */
        if (res >= 0 && ++io->cur < r->nranges) {
            io->fallback = 0;
            if (submit_io(c, io) == 0)
                return;
            res = -EIO;
        }
    }
    if (res < 0) {
        BS_STAT_ADD(c->st->io_errors, 1);
        __atomic_store_n(&c->st->last_error, res, __ATOMIC_RELAXED);
        c->inflight--;
        complete(c, io, BS_BLK_S_IOERR);
        return;
    }
    int rw = r->op == BS_OP_READ || r->op == BS_OP_WRITE;
    if (rw && res > 0 && io->done + (uint64_t)res < r->len) {
        /* Short transfer: advance the iovecs and go on from there (the
         * transport first notes what the piece filled). */
        size_t skip = (size_t)res;
        if (r->op == BS_OP_READ && c->partial)
            c->partial(c, io, skip);
        io->done += (uint64_t)res;
        while (skip > 0 && r->iov_count > 0) {
            struct iovec *v = &io->chain.iov[r->iov_first];
            if (v->iov_len > skip) {
                v->iov_base = (uint8_t *)v->iov_base + skip;
                v->iov_len -= skip;
                break;
            }
            skip -= v->iov_len;
            r->iov_first++;
            r->iov_count--;
        }
        if (submit_io(c, io) == 0)
            return;
        res = -EIO;
    }
    c->inflight--;
    if (rw && res == 0 && io->done < r->len) {
        /* EOF inside the capacity: the backing shrank under us. */
        BS_STAT_ADD(c->st->io_errors, 1);
        __atomic_store_n(&c->st->last_error, -EIO, __ATOMIC_RELAXED);
        complete(c, io, BS_BLK_S_IOERR);
        return;
    }
    complete(c, io, BS_BLK_S_OK);
}

void bs_core_run_sync(struct bs_core *c)
{
    /* each sync request completes before the next is popped: time them all */
    if (c->sync_head)
        c->t_now = bs_now_ns();
    while (c->sync_head) {
        struct bs_io *done = c->sync_head;
        c->sync_head = done->sync_next;
        if (!c->sync_head)
            c->sync_tail = &c->sync_head;
        bs_core_cqe(c, done, done->sync_res);
    }
}

void bs_core_begin_stop(struct bs_core *c)
{
    if (!c->stopping) {
        uint32_t ms = c->target->cfg.drain_timeout_ms;
        c->stop_deadline = bs_now_ns() + (uint64_t)(ms ? ms : DRAIN_TIMEOUT_MS) * 1000000;
    }
    c->stopping = 1;
}

/* A hung backing store must not hold a stop (GET_VRING_BASE, SIGTERM, a Xen
 * disconnect) forever: wait until the deadline, cancel what is left and
 * allow a short grace, then give up on it (stop_expired 2: the thread
 * leaves; the requests stay in the transport's records). */
int bs_core_stop_wait(struct bs_core *c)
{
    uint64_t now = bs_now_ns();
    if (now >= c->stop_deadline && c->target->cfg.rbd) {
        /* librbd cannot cancel, and a request it still holds may write
         * into guest memory: wait on; the image's op timeout (a request
         * fails after it) bounds the wait */
        __atomic_store_n(&c->st->last_error, -ETIMEDOUT, __ATOMIC_RELAXED);
        c->stop_deadline = now + CANCEL_GRACE_NS;
    } else if (now >= c->stop_deadline) {
        if (c->stop_expired) {
            c->stop_expired = 2;
            c->abandoned += c->inflight;
            __atomic_store_n(&c->st->last_error, -ETIMEDOUT, __ATOMIC_RELAXED);
            return -ETIME;
        }
        struct io_uring_sqe *sqe = bs_core_sqe(c);
        if (sqe) {
            io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
            io_uring_sqe_set_data64(sqe, BS_UD_CANCEL);
        }
        c->stop_expired = 1;
        c->stop_deadline = now + CANCEL_GRACE_NS;
    }
    uint64_t left = c->stop_deadline - now;
    struct __kernel_timespec ts = { .tv_sec = (long long)(left / 1000000000ULL),
                                    .tv_nsec = (long long)(left % 1000000000ULL) };
    struct io_uring_cqe *cqe;
    int ret = io_uring_submit_and_wait_timeout(&c->ring, &cqe, 1, &ts, NULL);
    return ret == -ETIME ? 0 : ret;
}

void bs_core_reap(struct bs_core *c, void (*other)(struct bs_core *c, uint64_t ud, int res))
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    if (io_uring_cq_ready(&c->ring))
        c->t_now = bs_now_ns();
    io_uring_for_each_cqe(&c->ring, head, cqe) {
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        n++;
        if (ud == BS_UD_QOS)
            c->qos_timer = 0;
        else if (ud == BS_UD_RBD)
            bs_rbd_reap(c);
        else if (ud < BS_UD_RESERVED)
            other(c, ud, cqe->res);
        else
            bs_core_cqe(c, (struct bs_io *)(uintptr_t)ud, cqe->res);
    }
    io_uring_cq_advance(&c->ring, n);
}

void bs_stats_sum(const struct bs_queue_stats *in, struct bs_queue_stats *out)
{
    memcpy(out, in, sizeof(*out));
    /* the per-kind totals are sums of the per-op counters (the hot path
     * updates only those) */
    uint64_t reqs[BS_STAT_NOPS];
    out->err_ioerr = out->err_unsupp = 0;
    for (int op = 0; op < BS_STAT_NOPS; op++) {
        reqs[op] = out->op_status[op][0] + out->op_status[op][1] + out->op_status[op][2];
        out->err_ioerr += out->op_status[op][1];
        out->err_unsupp += out->op_status[op][2];
    }
    out->reqs_read = reqs[BS_STAT_READ];
    out->reqs_write = reqs[BS_STAT_WRITE];
    out->reqs_flush = reqs[BS_STAT_FLUSH];
    out->reqs_get_id = reqs[BS_STAT_GET_ID];
    out->reqs_discard = reqs[BS_STAT_DISCARD];
    out->reqs_write_zeroes = reqs[BS_STAT_WRITE_ZEROES];
    out->reqs_other = reqs[BS_STAT_OTHER];
    out->bytes_read = out->op_bytes[BS_STAT_READ];
    out->bytes_write = out->op_bytes[BS_STAT_WRITE];
    out->bytes_discard = out->op_bytes[BS_STAT_DISCARD];
    out->bytes_write_zeroes = out->op_bytes[BS_STAT_WRITE_ZEROES];
}
