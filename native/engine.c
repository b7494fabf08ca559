/* The per-queue engine: one thread and one io_uring per virtqueue.
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
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "internal.h"

#define UD_KICK BS_UD_KICK
#define UD_CTL BS_UD_CTL
#define UD_CALL BS_UD_CALL       /* the guest notification write: no follow-up */
#define UD_CANCEL BS_UD_CANCEL   /* a stop's cancellation of overdue I/O */

/* One request in flight: the core's part first (its address is the
 * io_uring user_data and the probes' request pointer). */
struct slot {
    struct bs_io io;
    uint16_t head;
    uint16_t ndesc;          /* ring descriptors the chain spans (packed) */
    int free_next;
};

#define SLOT(iop) ((struct slot *)(void *)(iop))

struct bs_queue {
    bs_target *target;
    int index;

    /* set by start, owned by the thread while it runs */
    struct bs_vring vr;
    bs_mem *mem;
    int kick_fd;
    int call_fd;
    int event_idx;
    uint16_t last_avail;     /* split: free-running; packed: ring position */
    int avail_wrap;          /* packed: driver ring wrap counter */
    uint16_t used_pos;       /* packed: next used descriptor position */
    int used_wrap;           /* packed: device ring wrap counter */
    uint16_t used_idx;       /* free-running count of used descriptors */
    uint16_t published;      /* used->idx as we last wrote it */
    uint16_t signalled_used;
    int signalled_valid;
    int ctl_fd;
    struct bs_core core;     /* request execution: io_uring, stats, stop */
    uint64_t poll_ns;        /* --poll-us */
    uint64_t one;            /* the 8-byte value of a call eventfd write */
    struct slot *slots;
    int nslots;
    int free_head;
    int starved;
    int kicked;              /* the guest kicked (or we polled work): drain */
    int more;                /* the last drain stopped at its budget */
    int budget_pops;         /* work done by the current drain */
    uint32_t budget_descs;

    pthread_t thread;
    /* Serialises start/stop/free: a control path may be asked to stop a
     * queue from two threads (a cancelled stop still running, and the
     * shutdown path).  Never taken by the queue thread itself. */
    pthread_mutex_t ctl_lock;
    int running;
    sem_t started;
    int start_err;

    void *inflight_region;   /* set_inflight, or NULL */
    uint64_t inflight_size;
    int inflight_faulted;    /* the region's fd shrank under us (SIGBUS) */
    struct bs_inflight_split *inf;   /* while running: the region of a split ring */
    struct bs_inflight_packed *pinf; /* ... or of a packed ring */
    uint64_t inf_counter;    /* pop counter of the latest popped head */
    uint16_t *batch;         /* heads (split) or slots (packed) pushed since the
                                last publish (private: the region's copy is the
                                frontend's to scribble on) */
    uint32_t nbatch;
    uint16_t *resubmit;      /* heads (split) or slots (packed) to resubmit at
                                start, in pop order */
    int nresubmit;
    int pend_free;           /* packed inflight: slots freed at the next publish */
    int pfirst_pos;          /* packed: the unpublished batch's first used
                                descriptor (its flags are written last), or -1 */
    uint16_t pfirst_flags;
    uint32_t pfirst_state;   /* its position | wrap << 15 */
    struct bs_queue_stats *st;   /* st_local, or a shared block */
    struct bs_queue_stats st_local;
};

#define QUEUE_OF(c) ((struct bs_queue *)(void *)((char *)(c) - offsetof(struct bs_queue, core)))

/* ---- target ---- */

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
    if (cfg->fd < 0 || (bs != 512 && bs != 4096) || cfg->capacity % bs)
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
    if (!q->vr.packed) {
        struct bs_vring_used_elem *e = &q->vr.used->ring[q->used_idx & (q->vr.num - 1)];
        e->id = s->head;
        e->len = len;
        q->used_idx++;
        if (q->inf && q->nbatch < q->vr.num) {
            /* the chain a restart follows; never read back while we run */
            q->inf->desc[s->head].next =
                q->nbatch ? q->batch[q->nbatch - 1] : BS_INFLIGHT_NONE;
            q->batch[q->nbatch++] = s->head;
        }
        return;
    }
    /* Packed: write the used descriptor in place (used_pos < num), flags
     * last so the driver never sees a half-written one; the position then
     * skips the rest of the chain's descriptors.  The flags of a batch's
     * first descriptor wait for publish_used: the driver reads used
     * descriptors in ring order, so the whole batch appears at once. */
    struct bs_pdesc *d = &q->vr.pdesc[q->used_pos];
    uint16_t flags = (uint16_t)(q->used_wrap ? BS_PDESC_F_AVAIL | BS_PDESC_F_USED : 0);
    d->id = s->head;
    d->len = len;
    if (q->pfirst_pos < 0) {
        q->pfirst_pos = q->used_pos;
        q->pfirst_flags = flags;
        q->pfirst_state = q->used_pos | (q->used_wrap ? 0x8000u : 0);
    } else {
        __atomic_store_n(&d->flags, flags, __ATOMIC_RELEASE);
    }
    if (q->pinf && q->nbatch < (uint32_t)q->nslots) {
        uint16_t i = (uint16_t)(s - q->slots);
        q->pinf->slot[i].next = q->nbatch ? q->batch[q->nbatch - 1] : BS_INFLIGHT_NONE;
        q->batch[q->nbatch++] = i;
    }
    uint32_t pos = (uint32_t)q->used_pos + s->ndesc;
    if (pos >= q->vr.num) {
        pos -= q->vr.num;
        q->used_wrap ^= 1;
    }
    q->used_pos = (uint16_t)pos;
    q->used_idx = (uint16_t)(q->used_idx + s->ndesc);
}

static void slot_put(struct bs_queue *q, struct slot *s)
{
    int i = (int)(s - q->slots);
    if (q->pinf) {
        /* the slot's inflight record stays marked until its used descriptor
         * is published: no new request may take it before */
        s->free_next = q->pend_free;
        q->pend_free = i;
        return;
    }
    s->free_next = q->free_head;
    q->free_head = i;
}

static struct slot *slot_take(struct bs_queue *q)
{
    struct slot *s = &q->slots[q->free_head];
    q->free_head = s->free_next;
    s->ndesc = 1;
    return s;
}

/* The core's done(): the status byte, the used entry, the slot back. */
static void slot_done(struct bs_core *c, struct bs_io *io, uint8_t status)
{
    struct bs_queue *q = QUEUE_OF(c);
    struct slot *s = SLOT(io);
    /* safe: status_ptr was derived from a checked writable descriptor */
    *io->req.status_ptr = status;
    push_used(q, s, status == BS_BLK_S_OK ? io->req.used_len : 1);
    slot_put(q, s);
}

static void mark_broken(struct bs_queue *q, int err)
{
    __atomic_store_n(&q->st->broken, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&q->st->last_error, err, __ATOMIC_RELAXED);
}

/* Validate and start one popped request whose chain walk returned ret.
 * A chain whose buffers are bad is answered IOERR through its status byte
 * when the walk located one; when it did not (a loop, a bad link, no
 * writable byte), there is no status we could write: a used entry would
 * let a driver read a stale byte as success, so the queue is broken
 * instead (the device needs a reset).  Returns -1 when the queue broke. */
static int start_request(struct bs_queue *q, struct slot *s, int ret)
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
            push_used(q, s, 1);
            slot_put(q, s);
            return 0;
        }
        slot_put(q, s);
        mark_broken(q, ret ? ret : -EINVAL);
        return -1;
    }
    bs_core_start(&q->core, &s->io);
    return 0;
}

static void publish_used(struct bs_queue *q);
static void queue_event(struct bs_core *c, uint64_t ud, int res);

/* sync_io serves a whole batch inside one drain: publish every few requests
 * so the driver refills the ring while we work instead of waiting for the
 * batch's end (the used index is the driver's to poll; notifications still
 * follow EVENT_IDX). */
#define SYNC_PUBLISH_EVERY 8

static void sync_progress(struct bs_queue *q)
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

/* Work per wake-up is bounded (as Linux vhost's weights do): a driver that
 * keeps the ring one request ahead, or chains of many empty descriptors,
 * would otherwise hold the queue thread in one drain forever, and with it
 * completions, guest notifications and stop requests.  Past the budget
 * the drain returns with q->more set; the main loop handles what is ready
 * without sleeping and drains again. */
#define DRAIN_BUDGET_POPS 256
#define DRAIN_BUDGET_DESCS 8192

static int over_budget(struct bs_queue *q, const struct slot *s)
{
    q->budget_pops++;
    q->budget_descs += s->io.chain.ndesc;
    if (q->budget_pops < DRAIN_BUDGET_POPS && q->budget_descs < DRAIN_BUDGET_DESCS &&
        !q->core.stopping)
        return 0;
    q->more = 1;
    return 1;
}

/* Drain the avail ring (the classic EVENT_IDX loop: publish avail_event,
 * then re-check so a buffer added meanwhile is not missed). */
static void drain_avail(struct bs_queue *q)
{
    struct bs_vring *vr = &q->vr;
    uint16_t mask = (uint16_t)(vr->num - 1);

    q->starved = 0;
    q->more = 0;
    q->budget_pops = 0;
    q->budget_descs = 0;
    q->core.t_now = bs_now_ns();
    for (;;) {
        uint16_t avail = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
        if ((uint16_t)(avail - q->last_avail) > vr->num) {
            mark_broken(q, -ERANGE);   /* the guest claims more than a ring */
            return;
        }
        while (q->last_avail != avail) {
            if (q->free_head < 0) {
                q->starved = 1;        /* resumed when a slot frees up */
                return;
            }
            uint16_t head = __atomic_load_n(&vr->avail->ring[q->last_avail & mask],
                                            __ATOMIC_RELAXED);
            q->last_avail++;
            if (head >= vr->num) {
                mark_broken(q, -EINVAL);
                return;
            }
            if (q->inf) {
                q->inf->desc[head].counter = ++q->inf_counter;
                __atomic_store_n(&q->inf->desc[head].inflight, 1, __ATOMIC_RELEASE);
            }
            struct slot *s = slot_take(q);
            s->head = head;
            if (start_request(q, s, bs_vring_chain(vr, q->mem, head, &s->io.chain)))
                return;
            sync_progress(q);
            if (over_budget(q, s))
                return;
        }
        if (!q->event_idx)
            return;
        /* avail_event lives right after the used ring's entries */
        __atomic_store_n((uint16_t *)&vr->used->ring[vr->num], q->last_avail,
                         __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) == q->last_avail)
            return;
    }
}

/* Record a popped packed chain (at q->last_avail) in its slot's inflight
 * record: a copy of its ring descriptors, which later used descriptors may
 * overwrite in the ring while it is still in flight. */
static void inflight_mark_packed(struct bs_queue *q, const struct slot *s)
{
    struct bs_inflight_pslot *r = &q->pinf->slot[s - q->slots];
    uint16_t n = s->ndesc <= BS_INFLIGHT_PMAXD ? s->ndesc : 0;
    uint32_t pos = q->last_avail;
    for (uint16_t i = 0; i < n; i++) {
        memcpy(&r->d[i], (const void *)&q->vr.pdesc[pos], sizeof(r->d[i]));
        pos = pos + 1 == q->vr.num ? 0 : pos + 1;
    }
    r->id = s->head;
    r->ndesc = s->ndesc;
    r->nsaved = n;
    __atomic_store_n(&r->counter, ++q->inf_counter, __ATOMIC_RELEASE);
}

/* Packed ring: pop every available chain.  Our device event area always
 * says ENABLE, so every new buffer comes with a kick and there is no
 * re-check race to close. */
static void drain_packed(struct bs_queue *q)
{
    struct bs_vring *vr = &q->vr;

    q->starved = 0;
    q->more = 0;
    q->budget_pops = 0;
    q->budget_descs = 0;
    q->core.t_now = bs_now_ns();
    while (bs_vring_packed_avail(vr, q->last_avail, q->avail_wrap)) {
        if (q->free_head < 0) {
            q->starved = 1;
            return;
        }
        struct slot *s = slot_take(q);
        int ret = bs_vring_packed_chain(vr, q->mem, q->last_avail, &s->io.chain, &s->head,
                                        &s->ndesc);
        if (s->ndesc == 0) {
            slot_put(q, s);
            mark_broken(q, ret);   /* a chain with no end: nothing to complete */
            return;
        }
        if (q->pinf)
            inflight_mark_packed(q, s);
        uint32_t pos = (uint32_t)q->last_avail + s->ndesc;
        if (pos >= vr->num) {
            pos -= vr->num;
            q->avail_wrap ^= 1;
        }
        q->last_avail = (uint16_t)pos;
        if (q->pinf)
            __atomic_store_n(&q->pinf->avail_state,
                             q->inf_counter << 16 | pos | (q->avail_wrap ? 0x8000u : 0),
                             __ATOMIC_RELEASE);
        if (start_request(q, s, ret))
            return;
        sync_progress(q);
        if (over_budget(q, s))
            return;
    }
}

/* Does the packed driver event area ask for a notification for used
 * descriptors [old, now) (free-running counts)? */
static int packed_wants_notify(struct bs_queue *q, uint16_t old, uint16_t now)
{
    struct bs_pevent ev;
    ev.flags = __atomic_load_n(&q->vr.driver_evt->flags, __ATOMIC_RELAXED) & 3;
    if (ev.flags == BS_RING_EVENT_ENABLE)
        return 1;
    if (ev.flags != BS_RING_EVENT_DESC || !q->event_idx)
        return 0;
    ev.off_wrap = __atomic_load_n(&q->vr.driver_evt->off_wrap, __ATOMIC_RELAXED);
    /* Turn the (position, wrap) the driver named into a free-running count
     * by its distance from where we are now (both in [0, 2*num)). */
    int num = (int)q->vr.num;
    int cur = q->used_pos + (q->used_wrap ? num : 0);
    int evp = (ev.off_wrap & 0x7fff) + ((ev.off_wrap >> 15) ? num : 0);
    int diff = cur - evp;
    if (diff > num)
        diff -= 2 * num;
    else if (diff <= -num)
        diff += 2 * num;
    return bs_vring_need_event((uint16_t)(now - diff), now, old);
}

static uint32_t used_state(const struct bs_queue *q)
{
    return q->used_pos | (q->used_wrap ? 0x8000u : 0);
}

/* Make a packed batch visible: one store of its first descriptor's flags,
 * bracketed by the inflight region's record of the batch. */
static void publish_packed(struct bs_queue *q)
{
    struct bs_inflight_packed *in = q->pinf;
    if (in && q->nbatch) {
        in->batch_used = q->pfirst_state;
        in->batch_end = used_state(q);
        __atomic_store_n(&in->batch_head, q->batch[q->nbatch - 1], __ATOMIC_RELEASE);
    }
    __atomic_store_n(&q->vr.pdesc[q->pfirst_pos].flags, q->pfirst_flags, __ATOMIC_RELEASE);
    q->pfirst_pos = -1;
    if (in && q->nbatch) {
        __atomic_store_n(&in->used, used_state(q), __ATOMIC_RELEASE);
        for (uint32_t i = 0; i < q->nbatch; i++)
            __atomic_store_n(&in->slot[q->batch[i]].counter, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&in->batch_head, (uint16_t)BS_INFLIGHT_NONE, __ATOMIC_RELEASE);
        q->nbatch = 0;
    }
    while (q->pend_free >= 0) {
        struct slot *f = &q->slots[q->pend_free];
        q->pend_free = f->free_next;
        f->free_next = q->free_head;
        q->free_head = (int)(f - q->slots);
    }
}

static void publish_used(struct bs_queue *q)
{
    struct bs_vring *vr = &q->vr;
    uint16_t old = q->signalled_used;
    uint16_t now = q->used_idx;
    int notify;

    if (now == q->published && q->signalled_valid)
        return;
    if (q->inf && q->nbatch)
        /* a restart after the used index below reaches the guest clears
         * the batch's inflight marks from here */
        __atomic_store_n(&q->inf->last_batch_head, q->batch[q->nbatch - 1],
                         __ATOMIC_RELEASE);
    if (!vr->packed)
        __atomic_store_n(&vr->used->idx, now, __ATOMIC_RELEASE);
    else if (q->pfirst_pos >= 0)
        publish_packed(q);
    if (q->inf) {
        for (uint32_t i = 0; i < q->nbatch; i++)
            __atomic_store_n(&q->inf->desc[q->batch[i]].inflight, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&q->inf->used_idx, now, __ATOMIC_RELEASE);
        q->nbatch = 0;
    }
    q->published = now;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vr->packed) {
        notify = !q->signalled_valid || packed_wants_notify(q, old, now);
    } else if (q->event_idx) {
        uint16_t ev = __atomic_load_n(&vr->avail->ring[vr->num], __ATOMIC_RELAXED);
        notify = !q->signalled_valid || bs_vring_need_event(ev, now, old);
    } else {
        notify = !(__atomic_load_n(&vr->avail->flags, __ATOMIC_RELAXED) &
                   BS_VRING_AVAIL_F_NO_INTERRUPT);
    }
    q->signalled_used = now;
    q->signalled_valid = 1;
    if (notify && q->call_fd >= 0) {
        /* The eventfd write rides in the same io_uring_enter as the batch's
         * I/O instead of costing a syscall of its own. */
        struct io_uring_sqe *sqe = bs_core_sqe(&q->core);
        if (sqe) {
            io_uring_prep_write(sqe, q->call_fd, &q->one, sizeof(q->one), 0);
            io_uring_sqe_set_data64(sqe, UD_CALL);
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
 * poll_ns with guest kicks suppressed, instead of sleeping at once.  Returns
 * 1 if the driver queued new buffers (drain them without a kick). */
static int poll_for_work(struct bs_queue *q)
{
    uint64_t deadline = bs_now_ns() + q->poll_ns;
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

/* Redo a packed request a previous backend left in flight, from the ring
 * descriptors its record kept (s->head and s->ndesc were set from it). */
static int resubmit_packed(struct bs_queue *q, struct slot *s)
{
    struct bs_pdesc d[BS_INFLIGHT_PMAXD];
    const struct bs_inflight_pslot *r = &q->pinf->slot[s - q->slots];
    uint16_t n = __atomic_load_n(&r->nsaved, __ATOMIC_RELAXED);
    uint16_t id, nd = 0;
    int ret = -E2BIG;      /* not kept: completed empty, as a bad chain */

    /* the region is the frontend's to scribble on: n is checked before use */
    if (n && n == s->ndesc && n <= BS_INFLIGHT_PMAXD) {
        memcpy(d, r->d, n * sizeof(d[0]));
        struct bs_vring fake = { .num = n, .packed = 1, .pdesc = d };
        ret = bs_vring_packed_chain(&fake, q->mem, 0, &s->io.chain, &id, &nd);
        if (ret == 0 && nd != n)
            ret = -EINVAL;
    }
    return start_request(q, s, ret);
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
            mark_broken(q, -EBUSY);
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
        mark_broken(q, -ENXIO);
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
    for (int i = 0; i < q->nresubmit; i++) {
        BS_STAT_ADD(q->st->resubmitted, 1);
        int broke;
        if (q->pinf) {
            broke = resubmit_packed(q, &q->slots[q->resubmit[i]]);
        } else {
            struct slot *s = slot_take(q);
            s->head = q->resubmit[i];
            broke = start_request(q, s, bs_vring_chain(&q->vr, q->mem, s->head, &s->io.chain));
        }
        if (broke)
            break;
        sync_progress(q);
    }

    for (;;) {
        check_faults(q);
        int broken = __atomic_load_n(&q->st->broken, __ATOMIC_RELAXED);
        if (!c->stopping && !broken && (q->kicked || (q->starved && q->free_head >= 0))) {
            if (q->vr.packed)
                drain_packed(q);
            else
                drain_avail(q);
        }
        q->kicked = 0;
        bs_core_run_sync(c);
        check_faults(q);
        publish_used(q);
        __atomic_store_n(&q->st->inflight, (uint64_t)c->inflight, __ATOMIC_RELAXED);
        if (c->stopping && c->inflight == 0)
            break;

        int polled = 0;
        if (q->poll_ns && !c->stopping && !broken) {
            /* start what was queued (I/O, the guest notification) first */
            if (io_uring_sq_ready(&c->ring))
                io_uring_submit(&c->ring);
            polled = poll_for_work(q);
        }
        if (polled) {
            q->kicked = 1;
            ret = 0;
        } else if (c->stopping && c->inflight) {
            ret = bs_core_stop_wait(c);
            if (ret == -ETIME && c->stop_expired == 2)
                break;
        } else if (q->starved && q->free_head >= 0 && !broken) {
            ret = io_uring_submit(&c->ring);   /* slots came free: pop more */
            q->kicked = 1;
        } else if (q->more && !c->stopping && !broken) {
            /* the drain used its budget: handle what is ready (completions,
             * a stop request) without sleeping, then go on */
            ret = io_uring_submit_and_get_events(&c->ring);
            q->kicked = 1;
        } else {
            ret = io_uring_submit_and_wait(&c->ring, 1);
        }
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            /* The ring itself failed: nothing can complete any more. */
            mark_broken(q, ret);
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
    q->ctl_fd = -1;
    q->one = 1;
    q->st = &q->st_local;
    pthread_mutex_init(&q->ctl_lock, NULL);
    *out = q;
    return 0;
}

static uint32_t nslots_for(uint32_t num)
{
    return num < BS_MAX_SLOTS ? num : BS_MAX_SLOTS;
}

static uint64_t packed_region_bytes(uint32_t num)
{
    return sizeof(struct bs_inflight_packed) +
           (uint64_t)nslots_for(num) * sizeof(struct bs_inflight_pslot);
}

/* The ring layout (split or packed) may not be negotiated yet when the
 * frontend asks for the region: room for either. */
uint64_t bs_inflight_queue_bytes(uint32_t queue_size)
{
    uint64_t n = sizeof(struct bs_inflight_split) +
                 (uint64_t)queue_size * sizeof(struct bs_inflight_desc);
    uint64_t p = packed_region_bytes(queue_size);
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
            bs_guard_remove(q->inflight_region);
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

/* Start of a split ring with an inflight region: a fresh region is
 * initialised; one left by a previous backend tells which requests to redo
 * and where the avail ring resumes.  The region comes from the frontend:
 * every index in it is checked. */
static int inflight_recover(struct bs_queue *q, uint32_t num)
{
    struct bs_inflight_split *in = q->inflight_region;
    uint16_t used = q->used_idx;

    q->nresubmit = 0;
    q->nbatch = 0;
    if (q->inflight_size < bs_inflight_queue_bytes(num))
        return -EINVAL;
    if (in->version != BS_INFLIGHT_VERSION || in->desc_num != num) {
        memset(in, 0, bs_inflight_queue_bytes(num));
        in->version = BS_INFLIGHT_VERSION;
        in->desc_num = (uint16_t)num;
        in->last_batch_head = BS_INFLIGHT_NONE;
        in->used_idx = used;
        q->inf_counter = 0;
        q->inf = in;
        return 0;
    }
    if (in->used_idx != used) {
        /* the last batch reached the guest before its marks were cleared */
        uint16_t h = in->last_batch_head;
        for (uint32_t n = 0; h < num && n < num; n++, h = in->desc[h].next)
            in->desc[h].inflight = 0;
        in->used_idx = used;
    }
    uint64_t max = 0;
    int count = 0;
    for (uint32_t h = 0; h < num; h++) {
        if (!in->desc[h].inflight)
            continue;
        if (count >= q->nslots)
            return -EINVAL;     /* more than we could ever have had in flight */
        /* insertion by pop counter */
        int i = count++;
        while (i > 0 && in->desc[q->resubmit[i - 1]].counter > in->desc[h].counter) {
            q->resubmit[i] = q->resubmit[i - 1];
            i--;
        }
        q->resubmit[i] = (uint16_t)h;
        if (in->desc[h].counter > max)
            max = in->desc[h].counter;
    }
    q->nresubmit = count;
    q->inf_counter = max;
    /* the frontend's base (its used index, after a crash) is behind the
     * requests we had popped: resume after them */
    q->last_avail = (uint16_t)(used + count);
    q->inf = in;
    return 0;
}

/* Start of a packed ring with an inflight region.  The frontend's base is
 * no guide after a crash (QEMU has nothing in shared memory to rebuild a
 * packed ring's positions from and sends what it had at the last start):
 * positions come from the region, which this backend kept.  Every value in
 * it is checked.  Marked requests keep their slot (their record). */
static int inflight_recover_packed(struct bs_queue *q, uint32_t num)
{
    struct bs_inflight_packed *in = q->inflight_region;
    uint32_t nslots = (uint32_t)q->nslots;

    if (q->inflight_size < packed_region_bytes(num))
        return -EINVAL;
    if (in->version != BS_INFLIGHT_PACKED_VERSION || in->desc_num != num ||
        in->nslots != nslots) {
        memset(in, 0, packed_region_bytes(num));
        in->version = BS_INFLIGHT_PACKED_VERSION;
        in->desc_num = (uint16_t)num;
        in->nslots = (uint16_t)nslots;
        in->batch_head = BS_INFLIGHT_NONE;
        in->avail_state = q->last_avail | (q->avail_wrap ? 0x8000u : 0);
        in->used = used_state(q);
        q->inf_counter = 0;
        q->pinf = in;
        return 0;
    }
    uint16_t bh = in->batch_head;
    if (bh != BS_INFLIGHT_NONE) {
        /* A batch was being published.  Its first descriptor still reads as
         * available (the driver's old one) unless the batch reached the
         * guest: used now, or reused by the driver for the next lap. */
        uint32_t bu = in->batch_used, be = in->batch_end;
        if ((bu & 0x7fff) >= num || (be & 0x7fff) >= num)
            return -EINVAL;
        if (!bs_vring_packed_avail(&q->vr, (uint16_t)(bu & 0x7fff), (int)(bu >> 15) & 1)) {
            for (uint32_t n = 0; bh < nslots && n < nslots; n++, bh = in->slot[bh].next)
                in->slot[bh].counter = 0;
            in->used = be;
        }
        in->batch_head = BS_INFLIGHT_NONE;
    }
    uint32_t used = in->used;
    uint64_t av = in->avail_state;
    if ((used & 0x7fff) >= num || (av & 0x7fff) >= num)
        return -EINVAL;
    uint64_t av_counter = av >> 16, max = 0;
    int count = 0;
    uint32_t descs = 0;
    for (uint32_t i = 0; i < nslots; i++) {
        struct slot *s = &q->slots[i];
        uint64_t c = in->slot[i].counter;
        if (!c)
            continue;
        uint16_t nd = in->slot[i].ndesc;
        if (nd == 0 || nd > num || (descs += nd) > num)
            return -EINVAL;     /* more than the ring could ever hold */
        s->head = in->slot[i].id;
        s->ndesc = nd;
        int k = count++;
        while (k > 0 && in->slot[q->resubmit[k - 1]].counter > c) {
            q->resubmit[k] = q->resubmit[k - 1];
            k--;
        }
        q->resubmit[k] = (uint16_t)i;
        if (c > max)
            max = c;
    }
    uint32_t pos = av & 0x7fff;
    int wrap = (int)(av >> 15) & 1;
    if (max > av_counter + 1)
        return -EINVAL;
    if (max == av_counter + 1) {
        /* stopped between marking its latest pop and recording the new
         * avail position: the chain is in flight, skip it */
        pos += q->slots[q->resubmit[count - 1]].ndesc;
        if (pos >= num) {
            pos -= num;
            wrap ^= 1;
        }
        in->avail_state = max << 16 | pos | (wrap ? 0x8000u : 0);
    }
    q->last_avail = (uint16_t)pos;
    q->avail_wrap = wrap;
    q->used_pos = (uint16_t)(used & 0x7fff);
    q->used_wrap = (int)(used >> 15) & 1;
    q->nresubmit = count;
    q->inf_counter = max > av_counter ? max : av_counter;
    q->pinf = in;
    return 0;
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
    q->nslots = (int)nslots_for(cfg->num);
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
        ret = q->vr.packed ? inflight_recover_packed(q, cfg->num)
                           : inflight_recover(q, cfg->num);
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
    pthread_mutex_destroy(&q->ctl_lock);
    free(q);
}
