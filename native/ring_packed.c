/* Packed virtqueues (virtio 1.1 section 2.8) in the queue thread: popping
 * chains, writing used descriptors in place and making a batch visible at
 * once, the driver's event suppression, and the inflight region of a
 * packed ring (which keeps its own ring positions: QEMU has none to give
 * back after a crash). */
#include <errno.h>
#include <string.h>

#include "queue.h"

void bs_packed_push(struct bs_queue *q, const struct slot *s, uint32_t len)
{
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
void bs_packed_drain(struct bs_queue *q)
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
        struct slot *s = bs_q_slot_take(q);
        int ret = bs_vring_packed_chain(vr, q->mem, q->last_avail, &s->io.chain, &s->head,
                                        &s->ndesc);
        if (s->ndesc == 0) {
            bs_q_slot_put(q, s);
            bs_q_mark_broken(q, ret);   /* a chain with no end: nothing to complete */
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
        if (bs_q_start_request(q, s, ret))
            return;
        bs_q_sync_progress(q);
        if (bs_q_over_budget(q, s))
            return;
    }
}

/* Does the packed driver event area ask for a notification for used
 * descriptors [old, now) (free-running counts)? */
int bs_packed_wants_notify(struct bs_queue *q, uint16_t old, uint16_t now)
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

uint32_t bs_packed_used_state(const struct bs_queue *q)
{
    return q->used_pos | (q->used_wrap ? 0x8000u : 0);
}

/* Make a packed batch visible: one store of its first descriptor's flags,
 * bracketed by the inflight region's record of the batch. */
void bs_packed_publish(struct bs_queue *q)
{
    struct bs_inflight_packed *in = q->pinf;
    if (in && q->nbatch) {
        in->batch_used = q->pfirst_state;
        in->batch_end = bs_packed_used_state(q);
        __atomic_store_n(&in->batch_head, q->batch[q->nbatch - 1], __ATOMIC_RELEASE);
    }
    __atomic_store_n(&q->vr.pdesc[q->pfirst_pos].flags, q->pfirst_flags, __ATOMIC_RELEASE);
    q->pfirst_pos = -1;
    if (in && q->nbatch) {
        __atomic_store_n(&in->used, bs_packed_used_state(q), __ATOMIC_RELEASE);
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

/* Redo a packed request a previous backend left in flight, from the ring
 * descriptors its record kept (s->head and s->ndesc were set from it). */
int bs_packed_resubmit(struct bs_queue *q, struct slot *s)
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
    return bs_q_start_request(q, s, ret);
}

uint64_t bs_packed_region_bytes(uint32_t num)
{
    return sizeof(struct bs_inflight_packed) +
           (uint64_t)bs_q_nslots(num) * sizeof(struct bs_inflight_pslot);
}

/* Start of a packed ring with an inflight region.  The frontend's base is
 * no guide after a crash (QEMU has nothing in shared memory to rebuild a
 * packed ring's positions from and sends what it had at the last start):
 * positions come from the region, which this backend kept.  Every value in
 * it is checked.  Marked requests keep their slot (their record). */
int bs_packed_recover(struct bs_queue *q, uint32_t num)
{
    struct bs_inflight_packed *in = q->inflight_region;
    uint32_t nslots = (uint32_t)q->nslots;

    if (q->inflight_size < bs_packed_region_bytes(num))
        return -EINVAL;
    if (in->version != BS_INFLIGHT_PACKED_VERSION || in->desc_num != num ||
        in->nslots != nslots) {
        memset(in, 0, bs_packed_region_bytes(num));
        in->version = BS_INFLIGHT_PACKED_VERSION;
        in->desc_num = (uint16_t)num;
        in->nslots = (uint16_t)nslots;
        in->batch_head = BS_INFLIGHT_NONE;
        in->avail_state = q->last_avail | (q->avail_wrap ? 0x8000u : 0);
        in->used = bs_packed_used_state(q);
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
