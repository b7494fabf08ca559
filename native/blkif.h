/* The Xen blkif transport's private declarations, shared by blkif.c (the
 * ring thread, start/stop) and blkif_req.c (grants and request parsing). */
#ifndef BS_BLKIF_H
#define BS_BLKIF_H

#include <pthread.h>
#include <semaphore.h>

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

static inline void bs_blkif_mark_broken(struct bs_blkif *b, int err)
{
    __atomic_store_n(&b->st->broken, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->st->last_error, err, __ATOMIC_RELAXED);
}

/* A frontend fault in one request: answered BLKIF_RSP_ERROR and counted. */
static inline void bs_blkif_req_fault(struct bs_blkif *b, struct bs_blk_req *r, int err)
{
    BS_STAT_ADD(b->st->bad_chains, 1);
    __atomic_store_n(&b->st->last_error, err, __ATOMIC_RELAXED);
    r->op = BS_OP_NONE;
    r->status = BS_BLK_S_IOERR;
}

/* blkif_req.c */
/* Validate one request copied out of the ring into slot s and map its
 * data: s->io.req says what the core must do (a fault is an error status). */
void bs_blkif_parse(struct bs_blkif *b, struct bslot *s, const union blkif_any *q);
/* Unmap every persistent grant (at stop). */
void bs_blkif_pg_release_all(struct bs_blkif *b);

#endif
