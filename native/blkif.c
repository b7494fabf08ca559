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

#include "internal.h"

/* ring.h leaves its barriers (mb, rmb, wmb) to the includer */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/blkif.h>

#define XPAGE 4096u
#define SECTORS_PER_PAGE (XPAGE / 512u)
#define SEGS_PER_INDIRECT_PAGE (XPAGE / sizeof(struct blkif_request_segment))
#define MAX_INDIRECT_SEGS (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_PAGE)
#define BLKIF_T_OTHER 0xffffu   /* stats type of an operation we do not know */
#define PGRANT_BUCKETS 8192u    /* persistent grant table: open addressing */
#define PGRANT_NONE 0xffffffffu

/* Requests ride in the ring's union entries: copy one out as any of its
 * three shapes. */
union blkif_any {
    struct blkif_request rw;
    struct blkif_request_discard discard;
    struct blkif_request_indirect indirect;
};

struct bslot {
    struct bs_io io;          /* first: its address is the user_data */
    uint64_t id;              /* the frontend's, echoed in the response */
    uint8_t operation;
    void *map;                /* non-persistent mapping of the data pages */
    uint32_t nmap;
    int free_next;
};

struct pgrant {
    uint32_t gref;            /* PGRANT_NONE: empty bucket */
    void *addr;
};

struct bs_blkif {
    bs_target *target;
    int index;
    struct bs_core core;
    struct bs_xen_ops ops;
    struct bs_blkif_cfg cfg;
    blkif_back_ring_t ring;
    struct bslot *slots;
    int nslots;
    int free_head;
    int starved;
    int evt;                  /* the event channel fired: look at the ring */
    int more;                 /* the last drain stopped at its budget */
    union blkif_any held;     /* a barrier waiting for earlier requests */
    int has_held;
    int fenced;               /* a barrier in flight: later requests wait for it */
    struct pgrant *pg;        /* persistent grants, mapped until stop */
    uint32_t npg;
    int ctl_fd;
    pthread_t thread;
    pthread_mutex_t ctl_lock;
    int running;
    sem_t started;
    int start_err;
    struct bs_queue_stats *st;
    struct bs_queue_stats st_local;
};

#define BLKIF_OF(c) ((struct bs_blkif *)(void *)((char *)(c) - offsetof(struct bs_blkif, core)))

static void mark_broken(struct bs_blkif *b, int err)
{
    __atomic_store_n(&b->st->broken, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->st->last_error, err, __ATOMIC_RELAXED);
}

/* A frontend fault in one request: answered BLKIF_RSP_ERROR and counted. */
static void req_fault(struct bs_blkif *b, struct bs_blk_req *r, int err)
{
    BS_STAT_ADD(b->st->bad_chains, 1);
    __atomic_store_n(&b->st->last_error, err, __ATOMIC_RELAXED);
    r->op = BS_OP_NONE;
    r->status = BS_BLK_S_IOERR;
}

/* ---- grants ---- */

static uint32_t pg_hash(uint32_t gref)
{
    return (gref * 2654435761u) & (PGRANT_BUCKETS - 1);
}

/* The persistent mapping of gref, mapped now if there is room; NULL if the
 * table is full (the caller maps it for this request only) or on failure
 * (*err set). */
static void *pg_get(struct bs_blkif *b, uint32_t gref, int *err)
{
    uint32_t h = pg_hash(gref);
    for (uint32_t n = 0; n < PGRANT_BUCKETS; n++, h = (h + 1) & (PGRANT_BUCKETS - 1)) {
        struct pgrant *p = &b->pg[h];
        if (p->gref == gref)
            return p->addr;
        if (p->gref != PGRANT_NONE)
            continue;
        /* keep the table at most half full: probes stay short */
        if (b->npg >= PGRANT_BUCKETS / 2)
            return NULL;
        uint32_t ref = gref;
        void *a = b->ops.map_domain_grant_refs(b->ops.gnttab, 1, b->cfg.domid, &ref,
                                               PROT_READ | PROT_WRITE);
        if (!a) {
            *err = -EFAULT;
            return NULL;
        }
        p->gref = gref;
        p->addr = a;
        b->npg++;
        return a;
    }
    return NULL;
}

static void pg_release_all(struct bs_blkif *b)
{
    if (!b->pg)
        return;
    for (uint32_t i = 0; i < PGRANT_BUCKETS; i++)
        if (b->pg[i].gref != PGRANT_NONE)
            b->ops.unmap(b->ops.gnttab, b->pg[i].addr, 1);
    free(b->pg);
    b->pg = NULL;
    b->npg = 0;
}

/* Map the data pages of segs[0..n) (validated) and fill the slot's iovecs;
 * the data length goes to *len.  Returns 0 or -errno (the request gets an
 * error). */
static int map_segments(struct bs_blkif *b, struct bslot *s,
                        const struct blkif_request_segment *segs, uint32_t n,
                        int device_writes, uint64_t *len)
{
    uint32_t refs[BS_MAX_IOV];
    uint32_t tmp_idx[BS_MAX_IOV];
    uint32_t ntmp = 0;
    struct bs_chain *c = &s->io.chain;
    uint64_t total = 0;
    int err = 0;

    /* segments were validated by the caller */
    if (n == 0 || n > BS_MAX_IOV)
        return -E2BIG;
    for (uint32_t i = 0; i < n; i++)
        total += (uint64_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512;
    for (uint32_t i = 0; i < n; i++) {
        void *a = NULL;
        if (b->cfg.persistent) {
            a = pg_get(b, segs[i].gref, &err);
            if (err)
                return err;
        }
        if (!a)
            tmp_idx[ntmp++] = i;
        c->iov[i].iov_base = a;
    }
    if (ntmp) {
        for (uint32_t k = 0; k < ntmp; k++)
            refs[k] = segs[tmp_idx[k]].gref;
        /* a read writes into the guest's pages: it granted them writable */
        int prot = device_writes ? PROT_READ | PROT_WRITE : PROT_READ;
        uint8_t *m = b->ops.map_domain_grant_refs(b->ops.gnttab, ntmp, b->cfg.domid, refs, prot);
        if (!m)
            return -EFAULT;
        s->map = m;
        s->nmap = ntmp;
        for (uint32_t k = 0; k < ntmp; k++)
            c->iov[tmp_idx[k]].iov_base = m + (size_t)k * XPAGE;
    }
    for (uint32_t i = 0; i < n; i++) {
        c->iov[i].iov_base = (uint8_t *)c->iov[i].iov_base + segs[i].first_sect * 512u;
        c->iov[i].iov_len = (size_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512u;
    }
    c->niov = (int)n;
    *len = total;
    return 0;
}

/* The segment array of an indirect request, copied out of its granted
 * pages (mapped read-only for the copy). */
static int indirect_segments(struct bs_blkif *b, const struct blkif_request_indirect *ind,
                             uint32_t nseg, struct blkif_request_segment *out)
{
    uint32_t npages = (nseg + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
    uint32_t refs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    for (uint32_t i = 0; i < npages; i++)
        refs[i] = ind->indirect_grefs[i];
    uint8_t *m = b->ops.map_domain_grant_refs(b->ops.gnttab, npages, b->cfg.domid, refs,
                                              PROT_READ);
    if (!m)
        return -EFAULT;
    memcpy(out, m, nseg * sizeof(*out));
    b->ops.unmap(b->ops.gnttab, m, npages);
    return 0;
}

/* ---- requests ---- */

/* Read or write of segs[0..nseg): fill the slot's request. */
static void parse_rw(struct bs_blkif *b, struct bslot *s, int write, uint64_t sector,
                     const struct blkif_request_segment *segs, uint32_t nseg)
{
    struct bs_blk_req *r = &s->io.req;
    const struct bs_target_cfg *t = &b->target->cfg;
    uint64_t len = 0;

    r->type = write ? BS_BLK_T_OUT : BS_BLK_T_IN;
    if (write && t->read_only) {
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_IOERR;
        return;
    }
    if (nseg == 0) {
        req_fault(b, r, -EINVAL);
        return;
    }
    /* range first: nothing is mapped for a request that is refused */
    uint64_t want = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        if (segs[i].first_sect > segs[i].last_sect || segs[i].last_sect >= SECTORS_PER_PAGE) {
            req_fault(b, r, -EINVAL);
            return;
        }
        want += (uint64_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512;
    }
    if (!bs_range_ok(t, sector, want)) {
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_IOERR;
        return;
    }
    int err = map_segments(b, s, segs, nseg, !write, &len);
    if (err) {
        req_fault(b, r, err);
        return;
    }
    r->op = write ? BS_OP_WRITE : BS_OP_READ;
    r->offset = sector * BS_SECTOR;
    r->len = len;
    r->iov_first = 0;
    r->iov_count = (int)nseg;
}

static void parse_request(struct bs_blkif *b, struct bslot *s, const union blkif_any *q)
{
    struct bs_blk_req *r = &s->io.req;
    const struct bs_target_cfg *t = &b->target->cfg;
    struct blkif_request_segment segs[BS_MAX_IOV];

    memset(r, 0, sizeof(*r));
    r->status = BS_BLK_S_OK;
    switch (q->rw.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
        if (q->rw.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            r->type = q->rw.operation == BLKIF_OP_WRITE ? BS_BLK_T_OUT : BS_BLK_T_IN;
            req_fault(b, r, -E2BIG);
            return;
        }
        parse_rw(b, s, q->rw.operation == BLKIF_OP_WRITE, q->rw.sector_number, q->rw.seg,
                 q->rw.nr_segments);
        return;
    case BLKIF_OP_WRITE_BARRIER:
        /* earlier requests are complete (the caller held it until then);
         * with data it is a write made durable (FUA), without a flush */
        if (q->rw.nr_segments == 0) {
            r->type = BS_BLK_T_FLUSH;
            r->op = t->read_only ? BS_OP_NONE : BS_OP_FLUSH;
            return;
        }
        if (q->rw.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            r->type = BS_BLK_T_OUT;
            req_fault(b, r, -E2BIG);
            return;
        }
        parse_rw(b, s, 1, q->rw.sector_number, q->rw.seg, q->rw.nr_segments);
        r->fua = 1;
        return;
    case BLKIF_OP_FLUSH_DISKCACHE:
        r->type = BS_BLK_T_FLUSH;
        r->op = t->read_only ? BS_OP_NONE : BS_OP_FLUSH;
        return;
    case BLKIF_OP_DISCARD: {
        r->type = BS_BLK_T_DISCARD;
        uint64_t n = q->discard.nr_sectors;
        if (!b->cfg.discard || (q->discard.flag & BLKIF_DISCARD_SECURE)) {
            r->op = BS_OP_NONE;     /* secure discard is never advertised */
            r->status = BS_BLK_S_UNSUPP;
            return;
        }
        if (t->read_only || n > (1ULL << 40) || !bs_range_ok(t, q->discard.sector_number, n * 512)) {
            r->op = BS_OP_NONE;
            r->status = BS_BLK_S_IOERR;
            return;
        }
        if (n == 0)
            return;                 /* nothing to do: OK */
        r->op = BS_OP_DISCARD;
        r->nranges = 1;
        r->ranges[0].offset = q->discard.sector_number * BS_SECTOR;
        r->ranges[0].len = n * BS_SECTOR;
        r->len = n * BS_SECTOR;
        return;
    }
    case BLKIF_OP_INDIRECT: {
        const struct blkif_request_indirect *ind = &q->indirect;
        int write = ind->indirect_op == BLKIF_OP_WRITE;
        uint32_t nseg = ind->nr_segments;
        r->type = write ? BS_BLK_T_OUT : BS_BLK_T_IN;
        if (!b->cfg.max_indirect) {
            r->type = BLKIF_T_OTHER;
            r->op = BS_OP_NONE;
            r->status = BS_BLK_S_UNSUPP;
            return;
        }
        if ((ind->indirect_op != BLKIF_OP_READ && !write) || nseg == 0 ||
            nseg > b->cfg.max_indirect || nseg > BS_MAX_IOV) {
            req_fault(b, r, -EINVAL);
            return;
        }
        int err = indirect_segments(b, ind, nseg, segs);
        if (err) {
            req_fault(b, r, err);
            return;
        }
        parse_rw(b, s, write, ind->sector_number, segs, nseg);
        return;
    }
    default:
        r->type = BLKIF_T_OTHER;
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_UNSUPP;
        return;
    }
}

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
    parse_request(b, s, q);
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
    start_request(b, q);
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
            mark_broken(b, -ERANGE);
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
            mark_broken(b, -EBUSY);
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
        if (!c->stopping && !broken &&
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
        } else if (!broken && ((b->starved && b->free_head >= 0) ||
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
            mark_broken(b, ret);
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
    pg_release_all(b);
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
