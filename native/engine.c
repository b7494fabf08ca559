/* The per-queue engine: one thread and one io_uring per virtqueue (the
 * ring layouts are in ring_split.c and ring_packed.c).
 *
 * The thread sleeps in io_uring_submit_and_wait() with a read armed on the
 * kick eventfd and one on a private control eventfd.  A kick drains the avail
 * ring: each chain is validated, parsed and turned into one SQE whose iovecs
 * point straight into guest memory.  Completions write the status byte and a
 * used-ring entry; the used index is published once per loop iteration and
 * the guest is signalled only when EVENT_IDX (or the NO_INTERRUPT flag) says
 * it wants it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "queue.h"

/* ---- helpers ---- */

/* Wait for an eventfd through the ring.  A poll, not a read: an io_uring
 * read of an eventfd was seen to consume the count without completing
 * (kernel 6.18), which lost stop requests.  The counter is reset with a
 * non-blocking read(2) after the poll fires: one syscall per wake-up, not
 * per request. */
static int arm_poll(struct bs_queue *q, int fd, uint64_t ud)
{
    struct io_uring_sqe *sqe = bs_core_sqe(&q->core);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_add(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static void eventfd_drain(int fd)
{
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof(v));
    (void)n;   /* EAGAIN: already drained; the value itself is meaningless */
}


static void push_used(struct bs_queue *q, const struct slot *s, uint32_t len)
{
    if (q->vr.packed)
        bs_packed_push(q, s, len);
    else
        bs_split_push(q, s, len);
}

/* The core's done(): the status byte, the used entry, the slot back. */
static void slot_done(struct bs_core *c, struct bs_io *io, uint8_t status)
{
    struct bs_queue *q = QUEUE_OF(c);
    struct slot *s = SLOT(io);
    /* safe: status_ptr was derived from a checked writable descriptor */
    *io->req.status_ptr = status;
    if (__builtin_expect(__atomic_load_n(&q->mem->log, __ATOMIC_ACQUIRE) != NULL, 0)) {
        bs_q_log_request(q, io);
        bs_log_write(q->mem, io->req.status_ptr, 1);
    }
    push_used(q, s, status == BS_BLK_S_OK ? io->req.used_len : 1);
    bs_q_slot_put(q, s);
}

/* The core's partial(): a short read's piece, marked in a dirty log. */
static void slot_partial(struct bs_core *c, const struct bs_io *io, size_t bytes)
{
    struct bs_queue *q = QUEUE_OF(c);
    if (__atomic_load_n(&q->mem->log, __ATOMIC_ACQUIRE) != NULL)
        bs_q_log_partial(q, io, bytes);
}


/* Validate and start one popped request whose chain walk returned ret.
 * A chain whose buffers are bad is answered IOERR through its status byte
 * when the walk located one; when it did not (a loop, a bad link, no
 * writable byte), there is no status we could write: a used entry would
 * let a driver read a stale byte as success, so the queue is broken
 * instead (the device needs a reset).  Returns -1 when the queue broke. */
int bs_q_start_request(struct bs_queue *q, struct slot *s, int ret)
{
    s->io.t_pop = q->core.t_now;
    if (ret == 0)
        bs_blk_parse(&q->target->cfg, &s->io.chain, &s->io.req);
    if (ret || !s->io.req.status_ptr) {
        BS_STAT_ADD(q->st->bad_chains, 1);
        __atomic_store_n(&q->st->last_error, ret ? ret : -EINVAL, __ATOMIC_RELAXED);
        if (ret && s->io.chain.fault_status) {
            /* safe: fault_status was checked inside guest memory by the walk */
            *s->io.chain.fault_status = BS_BLK_S_IOERR;
            bs_log_write(q->mem, s->io.chain.fault_status, 1);
            push_used(q, s, 1);
            bs_q_slot_put(q, s);
            return 0;
        }
        bs_q_slot_put(q, s);
        bs_q_mark_broken(q, ret ? ret : -EINVAL);
        return -1;
    }
    bs_core_start(&q->core, &s->io);
    return 0;
}

static void queue_event(struct bs_core *c, uint64_t ud, int res);
static void publish_used(struct bs_queue *q);

/* sync_io serves a whole batch inside one drain: publish every few requests
 * so the driver refills the ring while we work instead of waiting for the
 * batch's end (the used index is the driver's to poll; notifications still
 * follow EVENT_IDX). */
#define SYNC_PUBLISH_EVERY 8

void bs_q_sync_progress(struct bs_queue *q)
{
    if (!q->target->cfg.sync_io)
        return;
    bs_core_run_sync(&q->core);
    if ((uint16_t)(q->used_idx - q->published) >= SYNC_PUBLISH_EVERY) {
        publish_used(q);
        /* a notification the driver asked for goes out now, not at the end
         * of the batch (the only SQE a sync queue ever has pending) */
        if (io_uring_sq_ready(&q->core.ring))
            io_uring_submit(&q->core.ring);
        /* and its completion is reaped here: a long drain must not leave
         * CQEs to pile up in the kernel's overflow list */
        bs_core_reap(&q->core, queue_event);
    }
}

static void publish_used(struct bs_queue *q)
{
    uint16_t old = q->signalled_used;
    uint16_t now = q->used_idx;
    int notify;

    if (now == q->published && q->signalled_valid) {
        bs_q_log_rings(q);       /* an avail_event the drain wrote */
        return;
    }
    if (!q->vr.packed)
        bs_split_publish(q, now);
    else if (q->pfirst_pos >= 0)
        bs_packed_publish(q);
    bs_q_log_rings(q);
    q->published = now;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->vr.packed)
        notify = !q->signalled_valid || bs_packed_wants_notify(q, old, now);
    else
        notify = bs_split_wants_notify(q, old, now);
    q->signalled_used = now;
    q->signalled_valid = 1;
    if (notify && q->call_fd >= 0) {
        /* The eventfd write rides in the same io_uring_enter as the batch's
         * I/O instead of costing a syscall of its own. */
        struct io_uring_sqe *sqe = bs_core_sqe(&q->core);
        if (sqe) {
            io_uring_prep_write(sqe, q->call_fd, &q->one, sizeof(q->one), 0);
            io_uring_sqe_set_data64(sqe, UD_CALL);
            /* no CQE unless it fails (then the plain write below): a
             * completion would wake this thread for nothing, and make the
             * adaptive poll window read that as work arriving */
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
        } else {
            eventfd_write(q->call_fd, 1);
        }
        BS_STAT_ADD(q->st->notifies, 1);
        BS_PROBE(notify, q->target->cfg.serial, U64(q->index), U64(now));
    }
}
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Has the driver made a buffer available that we have not popped? */
static int avail_pending(struct bs_queue *q)
{
    if (q->vr.packed)
        return bs_vring_packed_avail(&q->vr, q->last_avail, q->avail_wrap);
    return __atomic_load_n(&q->vr.avail->idx, __ATOMIC_ACQUIRE) != q->last_avail;
}

/* Ask the driver not to kick (we are polling) or to kick again. */
static void set_kicks(struct bs_queue *q, int enable)
{
    struct bs_vring *vr = &q->vr;
    if (vr->packed) {
        __atomic_store_n(&vr->device_evt->flags,
                         (uint16_t)(enable ? BS_RING_EVENT_ENABLE : BS_RING_EVENT_DISABLE),
                         __ATOMIC_RELAXED);
    } else if (q->event_idx) {
        /* an avail_event half a ring-index space behind is never crossed */
        __atomic_store_n((uint16_t *)&vr->used->ring[vr->num],
                         (uint16_t)(q->last_avail - (enable ? 0 : 0x8000)), __ATOMIC_RELAXED);
    } else {
        __atomic_store_n(&vr->used->flags, (uint16_t)(enable ? 0 : 1), __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* --poll-us: spin on the avail ring and the completion queue for up to
 * WINDOW ns with guest kicks suppressed, instead of sleeping at once.
 * Returns 1 if the driver queued new buffers (drain them without a kick). */
static int poll_for_work(struct bs_queue *q, uint64_t window)
{
    uint64_t deadline = bs_now_ns() + window;
    int spins = 0;

    set_kicks(q, 0);
    for (;;) {
        if (avail_pending(q))
            return 1;
        if (io_uring_cq_ready(&q->core.ring))
            break;
        /* completions of device I/O are posted when we enter the ring */
        if (q->core.inflight && (++spins & 63) == 0)
            io_uring_get_events(&q->core.ring);
        cpu_relax();
        if ((spins & 15) == 0 && bs_now_ns() > deadline)
            break;
    }
    /* Going to sleep (or to reap): kicks back on, then look once more so a
     * buffer queued while they were off is not left waiting. */
    set_kicks(q, 1);
    return avail_pending(q);
}


/* Adaptive polling (the default): after a sleep of SLEPT ns that a kick or
 * a completion ended, the window for next time.  A wake-up that came
 * within the cap would have been caught by polling that long: the window
 * doubles (from POLL_START).  One that took longer means polling would
 * have been wasted: it halves, and below POLL_START it is 0, so an idle
 * queue, or a guest slower than the cap (TCG), costs no CPU. */
#define POLL_START_NS 2000u
/* A queue thread busy this long without sleeping yields the core. */
#define BS_YIELD_NS 200000u

static void adapt_poll(struct bs_queue *q, uint64_t slept)
{
    uint64_t w = q->poll_win;
    if (slept <= q->poll_ns) {
        w = w < POLL_START_NS ? POLL_START_NS : w * 2;
        if (w > q->poll_ns)
            w = q->poll_ns;
    } else {
        w /= 2;
        if (w < POLL_START_NS)
            w = 0;
    }
    q->poll_win = w;
}

/* The CQEs of our own polls and writes (the core handles the I/O ones). */
static void queue_event(struct bs_core *c, uint64_t ud, int res)
{
    struct bs_queue *q = QUEUE_OF(c);
    if (ud == UD_KICK) {
        BS_STAT_ADD(q->st->kicks, 1);
        BS_PROBE(kick, q->target->cfg.serial, U64(q->index));
        q->kicked = 1;
        eventfd_drain(q->kick_fd);
        if (arm_poll(q, q->kick_fd, UD_KICK))
            bs_q_mark_broken(q, -EBUSY);
    } else if (ud == UD_CTL) {
        bs_core_begin_stop(c);
    } else if (ud == UD_CALL && res < 0) {
        eventfd_write(q->call_fd, 1);   /* fall back to a plain write */
    }
}

/* The frontend shrank guest RAM or the inflight region (a SIGBUS was
 * absorbed, see mem.c): what we read there since is zeroes, not the
 * guest's.  -ENXIO (no such address) tells this fault apart. */
static void check_faults(struct bs_queue *q)
{
    if ((__atomic_load_n(&q->mem->faulted, __ATOMIC_RELAXED) ||
         __atomic_load_n(&q->inflight_faulted, __ATOMIC_RELAXED)) &&
        !__atomic_load_n(&q->st->broken, __ATOMIC_RELAXED))
        bs_q_mark_broken(q, -ENXIO);
}

static void *queue_thread(void *arg)
{
    struct bs_queue *q = arg;
    struct bs_core *c = &q->core;
    int ret;

    q->kicked = 1;           /* look at the ring once at start */
    ret = bs_core_init(c, (unsigned)q->nslots);
    if (ret == 0) {
        ret = arm_poll(q, q->kick_fd, UD_KICK);
        if (ret == 0)
            ret = arm_poll(q, q->ctl_fd, UD_CTL);
        if (ret)
            bs_core_exit(c);
    }
    q->start_err = ret;
    sem_post(&q->started);
    if (ret)
        return NULL;

    /* requests a previous backend left in flight, in the order it popped them */
    c->t_now = bs_now_ns();
    c->qos_bypass = 1;       /* admitted once already: never held again */
    for (int i = 0; i < q->nresubmit; i++) {
        BS_STAT_ADD(q->st->resubmitted, 1);
        int broke;
        if (q->pinf) {
            broke = bs_packed_resubmit(q, &q->slots[q->resubmit[i]]);
        } else {
            struct slot *s = bs_q_slot_take(q);
            s->head = q->resubmit[i];
            broke = bs_q_start_request(q, s, bs_vring_chain(&q->vr, q->mem, s->head, &s->io.chain));
        }
        if (broke)
            break;
        bs_q_sync_progress(q);
    }
    c->qos_bypass = 0;

    uint64_t awake_since = bs_now_ns();
    for (;;) {
        check_faults(q);
        int broken = __atomic_load_n(&q->st->broken, __ATOMIC_RELAXED);
        /* a request held for QoS budget starts first (at once on a stop);
         * until it has, nothing more is popped */
        if (c->held && bs_core_qos_tick(c))
            q->kicked = 1;
        if (!c->stopping && !broken && !c->held &&
            (q->kicked || (q->starved && q->free_head >= 0))) {
            if (q->vr.packed)
                bs_packed_drain(q);
            else
                bs_split_drain(q);
        }
        q->kicked = 0;
        bs_core_run_sync(c);
        check_faults(q);
        publish_used(q);
        /* (t_now, the batch's clock, may predate a wake-up that reaped nothing) */
        if (c->t_now > awake_since + BS_YIELD_NS) {
            /* Busy without a sleep for a while: let another thread on this
             * core run (queue threads of one volume, or of others, pinned
             * together).  The scheduler switches busy threads only at its
             * tick (4 ms at HZ=250): that was the p99 of two queues served
             * from one core.  Alone on the core this costs one syscall per
             * BS_YIELD_NS.  What was queued (the guest notification, I/O)
             * goes first. */
            if (io_uring_sq_ready(&c->ring))
                io_uring_submit(&c->ring);
            sched_yield();
            awake_since = bs_now_ns();
        }
        __atomic_store_n(&q->st->inflight, (uint64_t)c->inflight, __ATOMIC_RELAXED);
        if (c->stopping && c->inflight == 0)
            break;

        int polled = 0;
        uint64_t window = q->poll_adaptive ? q->poll_win : q->poll_ns;
        if (window && !c->stopping && !broken && !c->held) {
            /* start what was queued (I/O, the guest notification) first */
            if (io_uring_sq_ready(&c->ring))
                io_uring_submit(&c->ring);
            uint64_t t0 = bs_now_ns();
            polled = poll_for_work(q, window);
            BS_STAT_ADD(q->st->polls, 1);
            BS_STAT_ADD(q->st->poll_hits, (uint64_t)polled);
            BS_STAT_ADD(q->st->poll_ns, bs_now_ns() - t0);
        }
        if (polled) {
            q->kicked = 1;
            ret = 0;
        } else if (c->stopping && c->inflight) {
            ret = bs_core_stop_wait(c);
            if (ret == -ETIME && c->stop_expired == 2)
                break;
        } else if (q->starved && q->free_head >= 0 && !broken && !c->held) {
            ret = io_uring_submit(&c->ring);   /* slots came free: pop more */
            q->kicked = 1;
        } else if (q->more && !c->stopping && !broken && !c->held) {
            /* the drain used its budget: handle what is ready (completions,
             * a stop request) without sleeping, then go on */
            ret = io_uring_submit_and_get_events(&c->ring);
            q->kicked = 1;
        } else {
            uint64_t t0 = bs_now_ns();
            ret = io_uring_submit_and_wait(&c->ring, 1);
            awake_since = bs_now_ns();
            if (q->poll_adaptive && !c->stopping)
                adapt_poll(q, awake_since - t0);
        }
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            /* The ring itself failed: nothing can complete any more. */
            bs_q_mark_broken(q, ret);
            break;
        }
        bs_core_reap(c, queue_event);
    }
    publish_used(q);
    io_uring_submit(&c->ring);   /* a last guest notification, if queued */
    __atomic_store_n(&q->st->inflight, 0, __ATOMIC_RELAXED);
    bs_core_exit(c);
    return NULL;
}

/* ---- public queue API ---- */

int bs_queue_new(bs_target *t, int index, bs_queue **out)
{
    bs_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->target = t;
    q->index = index;
    q->core.target = t;
    q->core.index = index;
    q->core.done = slot_done;
    q->core.partial = slot_partial;
    q->ctl_fd = -1;
    q->one = 1;
    q->st = &q->st_local;
    pthread_mutex_init(&q->ctl_lock, NULL);
    *out = q;
    return 0;
}


/* The ring layout (split or packed) may not be negotiated yet when the
 * frontend asks for the region: room for either. */
uint64_t bs_inflight_queue_bytes(uint32_t queue_size)
{
    uint64_t n = sizeof(struct bs_inflight_split) +
                 (uint64_t)queue_size * sizeof(struct bs_inflight_desc);
    uint64_t p = bs_packed_region_bytes(queue_size);
    if (p > n)
        n = p;
    return (n + 63) & ~63ULL;
}

int bs_queue_set_inflight(bs_queue *q, void *region, uint64_t size)
{
    int ret = 0;
    pthread_mutex_lock(&q->ctl_lock);
    if (q->running) {
        ret = -EBUSY;
    } else {
        if (q->inflight_region)
            bs_guard_remove(q->inflight_region, &q->inflight_faulted);
        q->inflight_region = NULL;
        q->inflight_size = 0;
        q->inflight_faulted = 0;
        if (region)
            ret = bs_guard_add(region, size, 4096, &q->inflight_faulted);
        if (region && ret == 0) {
            q->inflight_region = region;
            q->inflight_size = size;
        }
    }
    pthread_mutex_unlock(&q->ctl_lock);
    return ret;
}


static int queue_start_locked(bs_queue *q, bs_mem *mem, const struct bs_vring_cfg *cfg)
{
    int ret;

    if (q->running)
        return -EBUSY;
    if (cfg->kick_fd < 0)
        return -EBADF;
    ret = bs_vring_map(&q->vr, mem, cfg);
    if (ret)
        return ret;
    /* The kick counter is reset with read(2) after each poll: never block. */
    int fl = fcntl(cfg->kick_fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(cfg->kick_fd, F_SETFL, fl | O_NONBLOCK) < 0))
        return -errno;
    /* The call fd is the frontend's: a counter it filled to the brim (or
     * a pipe) must not block this thread's fallback write(2). */
    if (cfg->call_fd >= 0) {
        fl = fcntl(cfg->call_fd, F_GETFL);
        if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(cfg->call_fd, F_SETFL, fl | O_NONBLOCK) < 0))
            return -errno;
    }
    q->mem = mem;
    q->kick_fd = cfg->kick_fd;
    q->call_fd = cfg->call_fd;
    q->event_idx = !!cfg->event_idx;
    q->poll_ns = (uint64_t)q->target->cfg.poll_us * 1000;
    q->poll_adaptive = q->target->cfg.poll_adaptive && q->poll_ns;
    q->poll_win = 0;       /* adaptive: no polling until wake-ups show it pays */
    if (q->vr.packed) {
        /* SET_VRING_BASE of a packed ring (as QEMU sends it): the avail
         * position | wrap << 15, and the used one likewise << 16 */
        q->last_avail = cfg->base & 0x7fff;
        q->avail_wrap = (cfg->base >> 15) & 1;
        q->used_pos = (cfg->base >> 16) & 0x7fff;
        q->used_wrap = (cfg->base >> 31) & 1;
        if (q->last_avail >= cfg->num || q->used_pos >= cfg->num)
            return -EINVAL;
        q->used_idx = 0;
        __atomic_store_n(&q->vr.device_evt->flags, (uint16_t)BS_RING_EVENT_ENABLE,
                         __ATOMIC_RELEASE);
    } else {
        if (cfg->base > 0xffff)
            return -EINVAL;     /* a split ring's base is a 16-bit index */
        q->last_avail = (uint16_t)cfg->base;
        q->used_idx = __atomic_load_n(&q->vr.used->idx, __ATOMIC_ACQUIRE);
    }
    q->published = q->used_idx;
    q->signalled_valid = 0;
    q->starved = 0;
    q->core.st = q->st;
    q->core.abandoned = 0;
    __atomic_store_n(&q->st->broken, 0, __ATOMIC_RELAXED);
    q->nslots = (int)bs_q_nslots(cfg->num);
    q->slots = calloc((size_t)q->nslots, sizeof(*q->slots));
    if (!q->slots)
        return -ENOMEM;
    q->inf = NULL;
    q->pinf = NULL;
    q->nresubmit = 0;
    q->nbatch = 0;
    q->pend_free = -1;
    q->pfirst_pos = -1;
    if (q->inflight_region) {
        q->resubmit = calloc((size_t)q->nslots, sizeof(*q->resubmit));
        q->batch = calloc(cfg->num, sizeof(*q->batch));
        if (!q->resubmit || !q->batch) {
            ret = -ENOMEM;
            goto err_slots;
        }
        ret = q->vr.packed ? bs_packed_recover(q, cfg->num)
                           : bs_split_recover(q, cfg->num);
        if (ret)
            goto err_slots;
    }
    /* free slots: all but those a packed restart gives back to their
     * resubmitted requests */
    q->free_head = -1;
    for (int i = q->nslots - 1; i >= 0; i--) {
        int taken = 0;
        for (int k = 0; q->pinf && k < q->nresubmit && !taken; k++)
            taken = q->resubmit[k] == i;
        if (!taken) {
            q->slots[i].free_next = q->free_head;
            q->free_head = i;
        }
    }
    q->ctl_fd = eventfd(0, EFD_CLOEXEC);
    if (q->ctl_fd < 0) {
        ret = -errno;
        goto err_slots;
    }
    if (sem_init(&q->started, 0, 0)) {
        ret = -errno;
        goto err_ctl;
    }
    __atomic_add_fetch(&mem->users, 1, __ATOMIC_ACQ_REL);
    ret = -pthread_create(&q->thread, NULL, queue_thread, q);
    if (ret == 0) {
        while (sem_wait(&q->started) && errno == EINTR)
            ;
        ret = q->start_err;
        if (ret)
            pthread_join(q->thread, NULL);
    }
    sem_destroy(&q->started);
    if (ret) {
        __atomic_sub_fetch(&mem->users, 1, __ATOMIC_ACQ_REL);
        goto err_ctl;
    }
    q->running = 1;
    BS_PROBE(queue_start, q->target->cfg.serial, U64(q->index), U64(cfg->num),
             U64(q->vr.packed));
    return 0;

err_ctl:
    close(q->ctl_fd);
    q->ctl_fd = -1;
err_slots:
    free(q->slots);
    q->slots = NULL;
    free(q->resubmit);
    q->resubmit = NULL;
    free(q->batch);
    q->batch = NULL;
    q->inf = NULL;
    q->pinf = NULL;
    return ret;
}

int bs_queue_start(bs_queue *q, bs_mem *mem, const struct bs_vring_cfg *cfg)
{
    pthread_mutex_lock(&q->ctl_lock);
    int ret = queue_start_locked(q, mem, cfg);
    pthread_mutex_unlock(&q->ctl_lock);
    return ret;
}

/* What GET_VRING_BASE reports (the encoding of bs_vring_cfg.base). */
static uint32_t ring_base(const bs_queue *q)
{
    if (q->vr.packed)
        return (uint32_t)(q->last_avail | (q->avail_wrap ? 0x8000u : 0)) |
               (uint32_t)(q->used_pos | (q->used_wrap ? 0x8000u : 0)) << 16;
    return q->last_avail;
}

static int queue_stop_locked(bs_queue *q, uint32_t *last_avail)
{
    if (!q->running) {
        if (last_avail)
            *last_avail = ring_base(q);
        return 0;
    }
    if (eventfd_write(q->ctl_fd, 1) < 0)
        return -errno;
    pthread_join(q->thread, NULL);
    q->running = 0;
    BS_PROBE(queue_stop, q->target->cfg.serial, U64(q->index));
    __atomic_sub_fetch(&q->mem->users, 1, __ATOMIC_ACQ_REL);
    q->mem = NULL;
    close(q->ctl_fd);
    q->ctl_fd = -1;
    free(q->slots);
    q->slots = NULL;
    free(q->resubmit);
    q->resubmit = NULL;
    free(q->batch);
    q->batch = NULL;
    q->inf = NULL;
    q->pinf = NULL;
    if (last_avail)
        *last_avail = ring_base(q);
    return q->core.abandoned ? -ETIMEDOUT : 0;
}

int bs_queue_stop(bs_queue *q, uint32_t *last_avail)
{
    pthread_mutex_lock(&q->ctl_lock);
    int ret = queue_stop_locked(q, last_avail);
    pthread_mutex_unlock(&q->ctl_lock);
    return ret;
}

int bs_queue_running(bs_queue *q)
{
    return __atomic_load_n(&q->running, __ATOMIC_RELAXED);
}

int bs_queue_get_stats(bs_queue *q, struct bs_queue_stats *out)
{
    bs_stats_sum(q->st, out);
    return 0;
}

int bs_queue_set_stats(bs_queue *q, struct bs_queue_stats *area)
{
    int ret = 0;
    pthread_mutex_lock(&q->ctl_lock);
    if (q->running) {
        ret = -EBUSY;
    } else if (area && area != q->st) {
        memcpy(area, q->st, sizeof(*area));
        q->st = area;
    }
    pthread_mutex_unlock(&q->ctl_lock);
    return ret;
}

void bs_queue_free(bs_queue *q)
{
    if (!q)
        return;
    bs_queue_stop(q, NULL);
    /* the SIGBUS guard of its inflight region points at this queue */
    bs_queue_set_inflight(q, NULL, 0);
    pthread_mutex_destroy(&q->ctl_lock);
    free(q);
}
