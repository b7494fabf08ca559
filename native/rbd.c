/* Ceph RBD backings: requests go to librbd's asynchronous API on the guest's
 * buffers, with no Python on the way.  librbd completes a request on one of
 * its own threads; the completion callback pushes it on its queue's
 * lock-free stack and signals the queue's eventfd, which that queue's
 * io_uring watches with a poll.  The queue thread then finishes the request
 * exactly as it finishes a CQE (bs_core_cqe): counters, latency histograms,
 * USDT probes, the transport's status delivery are the same as for files. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "internal.h"

struct bs_rbd {
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    int cache;
    int locked;
};

static void set_stage(struct bs_rbd_cfg *cfg, const char *stage)
{
    snprintf(cfg->stage, sizeof(cfg->stage), "%s", stage);
}

static int conf_set_u32(rados_t cl, const char *key, uint32_t v)
{
    char buf[16];
    snprintf(buf, sizeof(buf), "%u", v);
    return rados_conf_set(cl, key, buf);
}

void bs_rbd_close(bs_rbd *r)
{
    if (!r)
        return;
    if (r->image) {
        if (r->locked)
            rbd_lock_release(r->image);
        rbd_close(r->image);
    }
    if (r->ioctx)
        rados_ioctx_destroy(r->ioctx);
    if (r->cluster)
        rados_shutdown(r->cluster);
    free(r);
}

/* Connect to the cluster and open the pool's ioctx (r->cluster, r->ioctx). */
static int connect_pool(struct bs_rbd *r, struct bs_rbd_cfg *cfg)
{
    int ret;
    if (!cfg->pool || !*cfg->pool || !cfg->image || !*cfg->image)
        return -EINVAL;
    set_stage(cfg, "create");
    ret = rados_create(&r->cluster, cfg->client_id && *cfg->client_id ? cfg->client_id : NULL);
    if (ret < 0) {
        r->cluster = NULL;
        goto fail;
    }
    set_stage(cfg, "conf");
    ret = rados_conf_read_file(r->cluster, cfg->conf && *cfg->conf ? cfg->conf : NULL);
    if (ret < 0)
        goto fail;
    if (cfg->keyring && *cfg->keyring) {
        ret = rados_conf_set(r->cluster, "keyring", cfg->keyring);
        if (ret < 0)
            goto fail;
    }
    r->cache = !!cfg->cache;
    /* every setting that bounds a wait: a missing monitor or OSD must give
     * an error within a bounded time, never a hung export */
    uint32_t ct = cfg->connect_timeout_s ? cfg->connect_timeout_s : 30;
    if ((ret = rados_conf_set(r->cluster, "rbd_cache", r->cache ? "true" : "false")) < 0 ||
        (ret = conf_set_u32(r->cluster, "client_mount_timeout", ct)) < 0 ||
        (ret = conf_set_u32(r->cluster, "rados_mon_op_timeout", ct)) < 0 ||
        (ret = conf_set_u32(r->cluster, "rados_osd_op_timeout", cfg->op_timeout_s)) < 0)
        goto fail;
    set_stage(cfg, "connect");
    ret = rados_connect(r->cluster);
    if (ret < 0)
        goto fail;
    set_stage(cfg, "pool");
    ret = rados_ioctx_create(r->cluster, cfg->pool, &r->ioctx);
    if (ret < 0) {
        r->ioctx = NULL;
        goto fail;
    }
    if (cfg->nspace && *cfg->nspace)
        rados_ioctx_set_namespace(r->ioctx, cfg->nspace);
    return 0;
fail:
    return ret < 0 ? ret : -EIO;
}

/* Open cfg->image in r's pool (read-only or not). */
static int open_image(struct bs_rbd *r, struct bs_rbd_cfg *cfg, int read_only)
{
    set_stage(cfg, "image");
    int ret = read_only ? rbd_open_read_only(r->ioctx, cfg->image, &r->image, NULL)
                        : rbd_open(r->ioctx, cfg->image, &r->image, NULL);
    if (ret < 0)
        r->image = NULL;
    return ret;
}

int bs_rbd_open(struct bs_rbd_cfg *cfg, bs_rbd **out)
{
    struct bs_rbd *r = calloc(1, sizeof(*r));
    int ret;

    if (!r)
        return -ENOMEM;
    ret = connect_pool(r, cfg);
    if (ret == 0)
        ret = open_image(r, cfg, cfg->read_only);
    if (ret < 0) {
        bs_rbd_close(r);
        return ret;
    }
    set_stage(cfg, "");
    *out = r;
    return 0;
}

int bs_rbd_manage(struct bs_rbd_cfg *cfg, int what, uint64_t *size)
{
    struct bs_rbd *r = calloc(1, sizeof(*r));
    int ret;

    if (!r)
        return -ENOMEM;
    ret = connect_pool(r, cfg);
    if (ret < 0)
        goto out;
    set_stage(cfg, "image");
    switch (what) {
    case BS_RBD_CREATE: {
        /* format 2 with librbd's default features (exclusive-lock among
         * them: what the exports' lock relies on) */
        int order = 0;
        ret = rbd_create2(r->ioctx, cfg->image, *size,
                          RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |
                          RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF |
                          RBD_FEATURE_DEEP_FLATTEN, &order);
        break;
    }
    case BS_RBD_REMOVE:
        ret = rbd_remove(r->ioctx, cfg->image);
        break;
    case BS_RBD_STAT:
        ret = open_image(r, cfg, 1);
        if (ret == 0)
            ret = rbd_get_size(r->image, size);
        break;
    case BS_RBD_RESIZE:
        ret = open_image(r, cfg, 0);
        if (ret == 0)
            ret = rbd_resize(r->image, *size);
        break;
    default:
        ret = -EINVAL;
    }
    if (ret == 0)
        set_stage(cfg, "");
out:
    bs_rbd_close(r);
    return ret;
}

int bs_rbd_size(bs_rbd *r, uint64_t *size)
{
    return rbd_get_size(r->image, size);
}

int bs_rbd_flush(bs_rbd *r)
{
    return rbd_flush(r->image);
}

int bs_rbd_lock(bs_rbd *r, int acquire)
{
    int ret;
    if (acquire) {
        if (r->locked)
            return 0;
        ret = rbd_lock_acquire(r->image, RBD_LOCK_MODE_EXCLUSIVE);
        if (ret == 0)
            r->locked = 1;
        return ret;
    }
    if (!r->locked)
        return 0;
    ret = rbd_lock_release(r->image);
    r->locked = 0;
    return ret;
}

/* ---- the request path ---- */

static void arm(struct bs_core *c)
{
    if (c->rbd_armed)
        return;
    struct io_uring_sqe *sqe = bs_core_sqe(c);
    if (!sqe)
        return;   /* re-armed at the next reap; a pending signal is not lost */
    io_uring_prep_poll_add(sqe, c->rbd_efd, POLLIN);
    io_uring_sqe_set_data64(sqe, BS_UD_RBD);
    c->rbd_armed = 1;
}

int bs_rbd_core_init(struct bs_core *c)
{
    c->rbd_done = NULL;
    c->rbd_armed = 0;
    c->rbd_cbs = 0;
    c->rbd_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->rbd_efd < 0)
        return -errno;
    arm(c);
    return 0;
}

void bs_rbd_core_exit(struct bs_core *c)
{
    /* a callback that pushed the last request may still be signalling
     * the eventfd: wait for it before closing */
    while (__atomic_load_n(&c->rbd_cbs, __ATOMIC_ACQUIRE))
        sched_yield();
    close(c->rbd_efd);
    c->rbd_efd = -1;
}

/* On a librbd thread. */
static void aio_done(rbd_completion_t comp, void *arg)
{
    struct bs_io *io = arg;
    struct bs_core *c = io->core;      /* io is ours until it is pushed */

    __atomic_add_fetch(&c->rbd_cbs, 1, __ATOMIC_ACQ_REL);
    ssize_t res = rbd_aio_get_return_value(comp);
    rbd_aio_release(comp);
    BS_PROBE(rbd_complete, c->target->cfg.serial, U64(c->index), io, U64(res));
    io->sync_res = res < 0 ? (res < -4095 ? -EIO : (int)res) : (res > INT32_MAX ? INT32_MAX : (int)res);
    struct bs_io *old = __atomic_load_n(&c->rbd_done, __ATOMIC_RELAXED);
    do {
        io->sync_next = old;
    } while (!__atomic_compare_exchange_n(&c->rbd_done, &old, io, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
    if (!old)
        eventfd_write(c->rbd_efd, 1);
    __atomic_sub_fetch(&c->rbd_cbs, 1, __ATOMIC_ACQ_REL);
}

static int writethrough(const struct bs_core *c, const struct bs_blk_req *r)
{
    return r->fua || __atomic_load_n(&c->target->cfg.writethrough, __ATOMIC_RELAXED);
}

int bs_rbd_submit(struct bs_core *c, struct bs_io *io)
{
    struct bs_rbd *rb = c->target->cfg.rbd;
    struct bs_blk_req *r = &io->req;
    struct iovec *iov = &io->chain.iov[r->iov_first];
    rbd_completion_t comp;
    uint64_t off = r->offset + io->done;
    int ret;

    io->core = c;
    ret = rbd_aio_create_completion(io, aio_done, &comp);
    if (ret < 0)
        return ret;
    switch (r->op) {
    case BS_OP_READ:
        ret = rbd_aio_readv(rb->image, iov, r->iov_count, off, comp);
        break;
    case BS_OP_WRITE:
        /* fallback set: the write is done, its flush (writethrough over a
         * write-back cache) is what runs now */
        ret = io->fallback ? rbd_aio_flush(rb->image, comp)
                           : rbd_aio_writev(rb->image, iov, r->iov_count, off, comp);
        break;
    case BS_OP_FLUSH:
        ret = rbd_aio_flush(rb->image, comp);
        break;
    case BS_OP_DISCARD:
        /* a hint to librbd (partial objects keep their data): DISCARD
         * promises no zeroes, WRITE_ZEROES below does */
        ret = rbd_aio_discard(rb->image, r->ranges[io->cur].offset, r->ranges[io->cur].len, comp);
        break;
    case BS_OP_WRITE_ZEROES:
        ret = rbd_aio_write_zeroes(rb->image, r->ranges[io->cur].offset,
                                   r->ranges[io->cur].len, comp,
                                   r->ranges[io->cur].unmap ? 0
                                                            : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
                                   0);
        break;
    default:
        ret = -EINVAL;
    }
    if (ret < 0)
        rbd_aio_release(comp);
    else
        BS_PROBE(rbd_submit, c->target->cfg.serial, U64(c->index), io);
    return ret;
}

/* What librbd answered, as the CQE the core expects for the operation:
 * a read or write complete to its end, 0 for the others.  Returns 1 when
 * the request went on (a writethrough write's flush), 0 to complete. */
static int finish(struct bs_core *c, struct bs_io *io, int *res)
{
    struct bs_blk_req *r = &io->req;
    if (*res < 0)
        return 0;
    if (r->op == BS_OP_READ) {
        uint64_t want = r->len - io->done;
        if ((uint64_t)*res < want) {
            /* librbd reads past an image's end as short: zeroes, as a
             * disk reads (capacity may lag a shrink done elsewhere) */
            uint64_t skip = (uint64_t)*res;
            for (int i = 0; i < r->iov_count; i++) {
                struct iovec *v = &io->chain.iov[r->iov_first + i];
                if (skip >= v->iov_len) {
                    skip -= v->iov_len;
                    continue;
                }
                memset((uint8_t *)v->iov_base + skip, 0, v->iov_len - skip);
                skip = 0;
            }
        }
        *res = (int)want;
    } else if (r->op == BS_OP_WRITE) {
        if (!io->fallback && c->target->cfg.rbd->cache && writethrough(c, r)) {
            io->fallback = 1;
            if (bs_rbd_submit(c, io) == 0)
                return 1;
            *res = -EIO;
            return 0;
        }
        *res = (int)(r->len - io->done);
    } else {
        *res = 0;
    }
    return 0;
}

void bs_rbd_reap(struct bs_core *c)
{
    eventfd_t v;
    c->rbd_armed = 0;
    (void)eventfd_read(c->rbd_efd, &v);
    struct bs_io *stack = __atomic_exchange_n(&c->rbd_done, NULL, __ATOMIC_ACQUIRE);
    arm(c);
    /* the stack is newest first: complete in completion order */
    struct bs_io *fifo = NULL;
    while (stack) {
        struct bs_io *next = stack->sync_next;
        stack->sync_next = fifo;
        fifo = stack;
        stack = next;
    }
    if (fifo)
        c->t_now = bs_now_ns();
    while (fifo) {
        struct bs_io *io = fifo;
        fifo = io->sync_next;
        int r = io->sync_res;
        if (finish(c, io, &r))
            continue;
        bs_core_cqe(c, io, r);
    }
}
