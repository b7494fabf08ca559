/* The virtqueue transport's private declarations, shared by engine.c (the
 * queue thread, start/stop), ring_split.c and ring_packed.c (the two ring
 * layouts).  Neither Python nor the other transports see this header. */
#ifndef BS_QUEUE_H
#define BS_QUEUE_H

#include <pthread.h>
#include <semaphore.h>

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
    uint64_t poll_ns;        /* --poll-us: the window, or the adaptive one's cap */
    uint64_t poll_win;       /* adaptive: the current window (0: sleep at once) */
    int poll_adaptive;
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

/* Work per wake-up is bounded (as Linux vhost's weights do): a driver that
 * keeps the ring one request ahead, or chains of many empty descriptors,
 * would otherwise hold the queue thread in one drain forever, and with it
 * completions, guest notifications and stop requests.  Past the budget
 * the drain returns with q->more set; the main loop handles what is ready
 * without sleeping and drains again. */
#define DRAIN_BUDGET_POPS 256
#define DRAIN_BUDGET_DESCS 8192

static inline void bs_q_slot_put(struct bs_queue *q, struct slot *s)
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

static inline struct slot *bs_q_slot_take(struct bs_queue *q)
{
    struct slot *s = &q->slots[q->free_head];
    q->free_head = s->free_next;
    s->ndesc = 1;
    return s;
}

static inline void bs_q_mark_broken(struct bs_queue *q, int err)
{
    __atomic_store_n(&q->st->broken, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&q->st->last_error, err, __ATOMIC_RELAXED);
}

static inline int bs_q_over_budget(struct bs_queue *q, const struct slot *s)
{
    if (q->core.held)
        return 1;            /* out of QoS budget: popping resumes once it started */
    q->budget_pops++;
    q->budget_descs += s->io.chain.ndesc;
    if (q->budget_pops < DRAIN_BUDGET_POPS && q->budget_descs < DRAIN_BUDGET_DESCS &&
        !q->core.stopping)
        return 0;
    q->more = 1;
    return 1;
}

static inline uint32_t bs_q_nslots(uint32_t num)
{
    return num < BS_MAX_SLOTS ? num : BS_MAX_SLOTS;
}

/* vq_log.c: dirty logging (mem->log set) */
void bs_q_log_request(struct bs_queue *q, const struct bs_io *io);
void bs_q_log_partial(struct bs_queue *q, const struct bs_io *io, size_t bytes);
void bs_q_log_rings(struct bs_queue *q);

/* engine.c */
int bs_q_start_request(struct bs_queue *q, struct slot *s, int ret);
void bs_q_sync_progress(struct bs_queue *q);

/* ring_split.c */
void bs_split_push(struct bs_queue *q, const struct slot *s, uint32_t len);
void bs_split_drain(struct bs_queue *q);
void bs_split_publish(struct bs_queue *q, uint16_t now);
int bs_split_wants_notify(struct bs_queue *q, uint16_t old, uint16_t now);
int bs_split_recover(struct bs_queue *q, uint32_t num);

/* ring_packed.c */
void bs_packed_push(struct bs_queue *q, const struct slot *s, uint32_t len);
void bs_packed_drain(struct bs_queue *q);
void bs_packed_publish(struct bs_queue *q);
int bs_packed_wants_notify(struct bs_queue *q, uint16_t old, uint16_t now);
uint32_t bs_packed_used_state(const struct bs_queue *q);
int bs_packed_resubmit(struct bs_queue *q, struct slot *s);
uint64_t bs_packed_region_bytes(uint32_t num);
int bs_packed_recover(struct bs_queue *q, uint32_t num);

#endif
