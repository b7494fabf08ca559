/* The Xen blkif transport: one engine thread and io_uring per shared ring.
 *
 * The frontend (a domU's blkfront) puts requests on a ring in a page (or
 * 2^order pages) it granted us; its data pages are granted too.  The ring
 * and grants are mapped through libxengnttab and the event channel comes
 * from libxenevtchn: Python opens both (cffi) and hands us their handles and
 * functions in struct bs_xen_ops, so the engine itself links no Xen library.
 *
 * Every request is copied out of the shared ring before it is looked at,
 * then validated (operation, segment count, first/last sector, the range
 * against the capacity) and mapped; from there it is a struct bs_io for the
 * request core (core.c) like a virtio one.  The response is written when
 * the core reports the status; the ring's response index is pushed once per
 * loop and the event channel notified only when the frontend asked for it
 * (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "blkif.h"

static void start_request(struct bs_blkif *b, const union blkif_any *q)
{
    struct bslot *s = &b->slots[b->free_head];
    b->free_head = s->free_next;
    s->id = q->rw.id;
    /* an indirect request is answered with its inner operation (as Linux's
     * blkback does, and blkfront checks) */
    s->operation = q->rw.operation == BLKIF_OP_INDIRECT ? q->indirect.indirect_op
                                                        : q->rw.operation;
    s->map = NULL;
    s->nmap = 0;
    s->io.t_pop = b->core.t_now;
    bs_blkif_parse(b, s, q);
    bs_core_start(&b->core, &s->io);
}

/* The core's done(): unmap, write the response, free the slot. */
static void slot_done(struct bs_core *c, struct bs_io *io, uint8_t status)
{
    struct bs_blkif *b = BLKIF_OF(c);
    struct bslot *s = (struct bslot *)(void *)io;
    if (s->map) {
        b->ops.unmap(b->ops.gnttab, s->map, s->nmap);
        s->map = NULL;
    }
    struct blkif_response *rsp = RING_GET_RESPONSE(&b->ring, b->ring.rsp_prod_pvt);
    rsp->id = s->id;
    rsp->operation = s->operation;
    rsp->status = status == BS_BLK_S_OK ? BLKIF_RSP_OKAY
                  : status == BS_BLK_S_UNSUPP ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR;
    b->ring.rsp_prod_pvt++;
    s->free_next = b->free_head;
    b->free_head = (int)(s - b->slots);
}

static void push_responses(struct bs_blkif *b)
{
    int notify = 0;
    if (b->ring.rsp_prod_pvt == b->ring.sring->rsp_prod)
        return;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b->ring, notify);
    if (notify) {
        b->ops.notify(b->ops.evtchn, b->cfg.port);
        BS_STAT_ADD(b->st->notifies, 1);
        BS_PROBE(notify, b->target->cfg.serial, U64(b->index), U64(b->ring.rsp_prod_pvt));
    }
}

static void sync_progress(struct bs_blkif *b)
{
    if (b->target->cfg.sync_io)
        bs_core_run_sync(&b->core);
}

/* Pop every request the frontend queued.  Indexes come from the frontend:
 * a producer index more than a ring ahead of our responses breaks the
 * ring (it cannot be honest). */
/* A barrier runs alone: after every request before it has completed
 * (the caller holds it until then), and nothing after it starts before it
 * has completed (blkif.h). */
static void start_barrier(struct bs_blkif *b, const union blkif_any *q)
{
    /* never held for QoS: what follows must not start before it has */
    b->core.qos_bypass = 1;
    start_request(b, q);
    b->core.qos_bypass = 0;
    sync_progress(b);
    b->fenced = b->core.inflight > 0;
}

/* Requests started per wake-up: a frontend that keeps the ring moving
 * cannot hold the thread (and with it completions and stops) in one drain;
 * past it the main loop handles what is ready and drains again. */
#define DRAIN_BUDGET 256

static void drain_ring(struct bs_blkif *b)
{
    int more, budget = DRAIN_BUDGET;

    b->starved = 0;
    b->more = 0;
    b->core.t_now = bs_now_ns();
    if (b->core.held)
        return;                 /* out of QoS budget */
    if (b->has_held || b->fenced) {
        if (b->core.inflight)
            return;             /* a barrier still waits, or is still running */
        b->fenced = 0;
        if (b->has_held) {
            b->has_held = 0;
            start_barrier(b, &b->held);
            if (b->fenced)
                return;
        }
    }
    do {
        RING_IDX rp = __atomic_load_n(&b->ring.sring->req_prod, __ATOMIC_ACQUIRE);
        if (RING_REQUEST_PROD_OVERFLOW(&b->ring, rp)) {
            bs_blkif_mark_broken(b, -ERANGE);
            return;
        }
        while (b->ring.req_cons != rp) {
            if (b->free_head < 0 || RING_REQUEST_CONS_OVERFLOW(&b->ring, b->ring.req_cons)) {
                b->starved = 1;
                return;
            }
            union blkif_any q;
            /* one copy out of shared memory: only the copy is looked at */
            memcpy(&q, (const void *)RING_GET_REQUEST(&b->ring, b->ring.req_cons), sizeof(q));
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            b->ring.req_cons++;
            if (q.rw.operation == BLKIF_OP_WRITE_BARRIER) {
                if (b->core.inflight) {
                    b->held = q;    /* after everything before it */
                    b->has_held = 1;
                    return;
                }
                start_barrier(b, &q);
                if (b->fenced)
                    return;
                continue;
            }
            start_request(b, &q);
            sync_progress(b);
            if (b->core.held)
                return;         /* out of QoS budget: resumes once it started */
            if (--budget == 0 || b->core.stopping) {
                b->more = 1;
                return;
            }
        }
        RING_FINAL_CHECK_FOR_REQUESTS(&b->ring, more);
    } while (more);
}

static int arm_poll(struct bs_blkif *b, int fd, uint64_t ud)
{
    struct io_uring_sqe *sqe = bs_core_sqe(&b->core);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_add(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static void blkif_event(struct bs_core *c, uint64_t ud, int res)
{
    struct bs_blkif *b = BLKIF_OF(c);
    (void)res;
    if (ud == BS_UD_KICK) {
        /* read the pending port and unmask it before looking at the ring:
         * an event sent while we work is not lost */
        int port = b->ops.pending(b->ops.evtchn);
        if (port >= 0)
            b->ops.unmask(b->ops.evtchn, (uint32_t)port);
        BS_STAT_ADD(b->st->kicks, 1);
        BS_PROBE(kick, b->target->cfg.serial, U64(b->index));
        b->evt = 1;
        if (arm_poll(b, b->cfg.evtchn_fd, BS_UD_KICK))
            bs_blkif_mark_broken(b, -EBUSY);
    } else if (ud == BS_UD_CTL) {
        bs_core_begin_stop(c);
    }
}

static void *blkif_thread(void *arg)
{
    struct bs_blkif *b = arg;
    struct bs_core *c = &b->core;
    int ret = bs_core_init(c, (unsigned)b->nslots);
    if (ret == 0) {
        ret = arm_poll(b, b->cfg.evtchn_fd, BS_UD_KICK);
        if (ret == 0)
            ret = arm_poll(b, b->ctl_fd, BS_UD_CTL);
        if (ret)
            bs_core_exit(c);
    }
    b->start_err = ret;
    sem_post(&b->started);
    if (ret)
        return NULL;

    b->evt = 1;     /* requests queued before we started */
    for (;;) {
        int broken = __atomic_load_n(&b->st->broken, __ATOMIC_RELAXED);
        if (c->held && bs_core_qos_tick(c))
            b->evt = 1;
        if (!c->stopping && !broken && !c->held &&
            (b->evt || (b->starved && b->free_head >= 0) || ((b->has_held || b->fenced) && !c->inflight)))
            drain_ring(b);
        b->evt = 0;
        bs_core_run_sync(c);
        push_responses(b);
        __atomic_store_n(&b->st->inflight, (uint64_t)c->inflight, __ATOMIC_RELAXED);
        if (c->stopping && c->inflight == 0)
            break;
        if (c->stopping && c->inflight) {
            ret = bs_core_stop_wait(c);
            if (ret == -ETIME && c->stop_expired == 2)
                break;
        } else if (!broken && !c->held && ((b->starved && b->free_head >= 0) ||
                                           ((b->has_held || b->fenced) && !c->inflight))) {
            ret = io_uring_submit(&c->ring);
        } else if (!broken && b->more) {
            /* handle what is ready (completions, a stop) without sleeping */
            ret = io_uring_submit_and_get_events(&c->ring);
            b->evt = 1;
        } else {
            ret = io_uring_submit_and_wait(&c->ring, 1);
        }
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            bs_blkif_mark_broken(b, ret);
            break;
        }
        bs_core_reap(c, blkif_event);
    }
    push_responses(b);
    __atomic_store_n(&b->st->inflight, 0, __ATOMIC_RELAXED);
    bs_core_exit(c);
    /* the ring is gone (its exit waited for every request): mappings of
     * requests a stop gave up on can go too */
    for (int i = 0; i < b->nslots; i++)
        if (b->slots[i].map)
            b->ops.unmap(b->ops.gnttab, b->slots[i].map, b->slots[i].nmap);
    bs_blkif_pg_release_all(b);
    return NULL;
}

/* ---- public API ---- */

int bs_blkif_new(bs_target *t, int index, bs_blkif **out)
{
    bs_blkif *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    b->target = t;
    b->index = index;
    b->ctl_fd = -1;
    b->st = &b->st_local;
    b->core.target = t;
    b->core.index = index;
    b->core.done = slot_done;
    pthread_mutex_init(&b->ctl_lock, NULL);
    *out = b;
    return 0;
}

uint32_t bs_blkif_max_indirect(void)
{
    return MAX_INDIRECT_SEGS < BS_MAX_IOV ? MAX_INDIRECT_SEGS : BS_MAX_IOV;
}

static int start_locked(bs_blkif *b, const struct bs_xen_ops *ops, const struct bs_blkif_cfg *cfg)
{
    int ret;
    if (b->running)
        return -EBUSY;
    if (!ops->map_domain_grant_refs || !ops->unmap || !ops->notify || !ops->pending ||
        !ops->unmask || !cfg->sring || cfg->evtchn_fd < 0 || cfg->ring_pages == 0 ||
        cfg->ring_pages > 16 || (cfg->ring_pages & (cfg->ring_pages - 1)) ||
        cfg->max_indirect > bs_blkif_max_indirect())
        return -EINVAL;
    b->ops = *ops;
    b->cfg = *cfg;
    /* A fresh connection: the frontend initialised the ring's indexes.
     * Responses continue from its rsp_prod (nothing is outstanding). */
    blkif_sring_t *sr = cfg->sring;
    RING_IDX rsp = __atomic_load_n(&sr->rsp_prod, __ATOMIC_ACQUIRE);
    BACK_RING_ATTACH(&b->ring, sr, rsp, (size_t)cfg->ring_pages * XPAGE);
    b->nslots = (int)RING_SIZE(&b->ring);
    b->slots = calloc((size_t)b->nslots, sizeof(*b->slots));
    if (!b->slots)
        return -ENOMEM;
    b->free_head = -1;
    for (int i = b->nslots - 1; i >= 0; i--) {
        b->slots[i].free_next = b->free_head;
        b->free_head = i;
    }
    if (cfg->persistent) {
        b->pg = malloc(PGRANT_BUCKETS * sizeof(*b->pg));
        if (!b->pg) {
            ret = -ENOMEM;
            goto err;
        }
        for (uint32_t i = 0; i < PGRANT_BUCKETS; i++)
            b->pg[i].gref = PGRANT_NONE;
    }
    b->has_held = 0;
    b->fenced = 0;
    b->starved = 0;
    b->core.st = b->st;
    b->core.abandoned = 0;
    __atomic_store_n(&b->st->broken, 0, __ATOMIC_RELAXED);
    b->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->ctl_fd < 0) {
        ret = -errno;
        goto err;
    }
    if (sem_init(&b->started, 0, 0)) {
        ret = -errno;
        goto err;
    }
    ret = -pthread_create(&b->thread, NULL, blkif_thread, b);
    if (ret == 0) {
        while (sem_wait(&b->started) && errno == EINTR)
            ;
        ret = b->start_err;
        if (ret)
            pthread_join(b->thread, NULL);
    }
    sem_destroy(&b->started);
    if (ret)
        goto err;
    b->running = 1;
    BS_PROBE(queue_start, b->target->cfg.serial, U64(b->index), U64(b->nslots), U64(2));
    return 0;
err:
    if (b->ctl_fd >= 0)
        close(b->ctl_fd);
    b->ctl_fd = -1;
    free(b->slots);
    b->slots = NULL;
    free(b->pg);
    b->pg = NULL;
    return ret;
}

int bs_blkif_start(bs_blkif *b, const struct bs_xen_ops *ops, const struct bs_blkif_cfg *cfg)
{
    pthread_mutex_lock(&b->ctl_lock);
    int ret = start_locked(b, ops, cfg);
    pthread_mutex_unlock(&b->ctl_lock);
    return ret;
}

int bs_blkif_stop(bs_blkif *b)
{
    int ret = 0;
    pthread_mutex_lock(&b->ctl_lock);
    if (b->running) {
        if (eventfd_write(b->ctl_fd, 1) < 0) {
            ret = -errno;
        } else {
            pthread_join(b->thread, NULL);
            b->running = 0;
            BS_PROBE(queue_stop, b->target->cfg.serial, U64(b->index));
            close(b->ctl_fd);
            b->ctl_fd = -1;
            free(b->slots);
            b->slots = NULL;
            ret = b->core.abandoned ? -ETIMEDOUT : 0;
        }
    }
    pthread_mutex_unlock(&b->ctl_lock);
    return ret;
}

int bs_blkif_running(bs_blkif *b)
{
    return __atomic_load_n(&b->running, __ATOMIC_RELAXED);
}

int bs_blkif_get_stats(bs_blkif *b, struct bs_queue_stats *out)
{
    bs_stats_sum(b->st, out);
    return 0;
}

int bs_blkif_set_stats(bs_blkif *b, struct bs_queue_stats *area)
{
    int ret = 0;
    pthread_mutex_lock(&b->ctl_lock);
    if (b->running) {
        ret = -EBUSY;
    } else if (area && area != b->st) {
        memcpy(area, b->st, sizeof(*area));
        b->st = area;
    }
    pthread_mutex_unlock(&b->ctl_lock);
    return ret;
}

void bs_blkif_free(bs_blkif *b)
{
    if (!b)
        return;
    bs_blkif_stop(b);
    pthread_mutex_destroy(&b->ctl_lock);
    free(b);
}
