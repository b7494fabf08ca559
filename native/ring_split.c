/* Split virtqueues (virtio 1.1 section 2.7) in the queue thread: popping
 * the avail ring under EVENT_IDX, pushing and publishing used entries, and
 * the inflight region that lets a restarted backend redo what a dead one
 * left in flight. */
#include <errno.h>
#include <string.h>

#include "queue.h"

/* A completed chain's used entry (published later, with the batch). */
void bs_split_push(struct bs_queue *q, const struct slot *s, uint32_t len)
{
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
}

/* Drain the avail ring (the classic EVENT_IDX loop: publish avail_event,
 * then re-check so a buffer added meanwhile is not missed). */
void bs_split_drain(struct bs_queue *q)
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
            bs_q_mark_broken(q, -ERANGE);   /* the guest claims more than a ring */
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
                bs_q_mark_broken(q, -EINVAL);
                return;
            }
            if (q->inf) {
                q->inf->desc[head].counter = ++q->inf_counter;
                __atomic_store_n(&q->inf->desc[head].inflight, 1, __ATOMIC_RELEASE);
            }
            struct slot *s = bs_q_slot_take(q);
            s->head = head;
            if (bs_q_start_request(q, s, bs_vring_chain(vr, q->mem, head, &s->io.chain)))
                return;
            bs_q_sync_progress(q);
            if (bs_q_over_budget(q, s))
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

/* Make the used entries pushed since the last publish visible: the used
 * index, bracketed by the inflight region's record of the batch. */
void bs_split_publish(struct bs_queue *q, uint16_t now)
{
    if (q->inf && q->nbatch)
        /* a restart after the used index below reaches the guest clears
         * the batch's inflight marks from here */
        __atomic_store_n(&q->inf->last_batch_head, q->batch[q->nbatch - 1],
                         __ATOMIC_RELEASE);
    __atomic_store_n(&q->vr.used->idx, now, __ATOMIC_RELEASE);
    if (q->inf) {
        for (uint32_t i = 0; i < q->nbatch; i++)
            __atomic_store_n(&q->inf->desc[q->batch[i]].inflight, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&q->inf->used_idx, now, __ATOMIC_RELEASE);
        q->nbatch = 0;
    }
}

/* Does the driver want a notification for used entries [old, now)? */
int bs_split_wants_notify(struct bs_queue *q, uint16_t old, uint16_t now)
{
    struct bs_vring *vr = &q->vr;
    if (q->event_idx) {
        uint16_t ev = __atomic_load_n(&vr->avail->ring[vr->num], __ATOMIC_RELAXED);
        return !q->signalled_valid || bs_vring_need_event(ev, now, old);
    }
    return !(__atomic_load_n(&vr->avail->flags, __ATOMIC_RELAXED) &
             BS_VRING_AVAIL_F_NO_INTERRUPT);
}

/* Start of a split ring with an inflight region: a fresh region is
 * initialised; one left by a previous backend tells which requests to redo
 * and where the avail ring resumes.  The region comes from the frontend:
 * every index in it is checked. */
int bs_split_recover(struct bs_queue *q, uint32_t num)
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
