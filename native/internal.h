/* Internal declarations of the engine, shared by its C files and C tests.
 * Python never sees this header: its boundary is blkserve_native.h. */
#ifndef BS_INTERNAL_H
#define BS_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>

#include "blkserve_native.h"

/* x86-64 and arm64 are little-endian like virtio 1.x rings; refuse others
 * rather than byte-swap every field on the hot path. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "blkserve's engine assumes a little-endian host"
#endif

#define BS_MAX_REGIONS 32      /* >= VHOST_USER_MAX_RAM_SLOTS we advertise */
#define BS_MAX_QUEUE_SIZE 32768
#define BS_SEG_MAX 126         /* data segments per request we advertise   */
#define BS_MAX_IOV 192         /* header + data + status, plus region splits */
#define BS_MAX_SLOTS 1024      /* requests in flight per queue             */
#define BS_SECTOR 512ULL
#define BS_MAX_DWZ_SEG 32      /* discard / write-zeroes segments per request */
#define BS_MAX_DWZ_SECTORS (1u << 22)  /* per segment: 2 GiB */
#define BS_SIZE_MAX (4u << 20) /* bytes per data segment we advertise */

/* Relaxed stat update: each counter has a single writer (its queue thread). */
#define BS_STAT_ADD(field, v) \
    __atomic_store_n(&(field), __atomic_load_n(&(field), __ATOMIC_RELAXED) + (v), \
                     __ATOMIC_RELAXED)

/* ---- guest memory (mem.c) ---- */
struct bs_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *hva;          /* map_base + mmap_offset */
    void *map_base;
    size_t map_len;
};

/* A dirty log (bs_mem_set_log): replaced whole, never changed in place,
 * so a queue thread reads a consistent pointer and size. */
struct bs_log {
    uint8_t *bits;
    uint64_t size;           /* bytes */
    struct bs_log *retired;  /* older logs, freed with the table */
};

struct bs_mem {
    int nregions;
    int users;             /* running queues using this table (atomic) */
    int faulted;           /* a region's fd shrank under us (SIGBUS, atomic) */
    struct bs_log *log;    /* dirty logging on (atomic pointer), or NULL */
    struct bs_log *retired;
    struct bs_region r[BS_MAX_REGIONS];
};

/* Mark the guest pages under host range [p, p+len) dirty if logging is on
 * (the common case, off, costs one load and a branch). */
void bs_log_write_slow(const struct bs_log *lg, const struct bs_mem *m, const void *p,
                       uint64_t len);
static inline void bs_log_write(const struct bs_mem *m, const void *p, uint64_t len)
{
    const struct bs_log *lg = __atomic_load_n(&m->log, __ATOMIC_ACQUIRE);
    if (__builtin_expect(lg != NULL, 0))
        bs_log_write_slow(lg, m, p, len);
}

/* Register [start, start+len), a mapping of a file the frontend can
 * shrink: a SIGBUS inside it is absorbed (an anonymous page replaces the
 * missing one) and sets *flag.  page: the mapping's page size. */
int bs_guard_add(void *start, uint64_t len, uint64_t page, int *flag);
void bs_guard_remove(void *start, int *flag);

/* Host pointer for guest range [gpa, gpa+len) if it lies inside a single
 * region, else NULL. */
void *bs_mem_gpa(const struct bs_mem *m, uint64_t gpa, uint64_t len);
/* Same for a frontend virtual address range (vring addresses). */
void *bs_mem_uva(const struct bs_mem *m, uint64_t uva, uint64_t len);
/* Append iovecs covering [gpa, gpa+len), split at region ends.  Returns the
 * number appended, -EFAULT if any byte is outside guest memory, -E2BIG if
 * more than max entries would be needed. */
int bs_mem_iov(const struct bs_mem *m, uint64_t gpa, uint32_t len,
               struct iovec *iov, int max);

/* ---- split virtqueue (virtq.c) ---- */
#define BS_VRING_DESC_F_NEXT 1
#define BS_VRING_DESC_F_WRITE 2
#define BS_VRING_DESC_F_INDIRECT 4
#define BS_VRING_AVAIL_F_NO_INTERRUPT 1

struct bs_vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct bs_vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];       /* num entries, then used_event with EVENT_IDX */
};

struct bs_vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct bs_vring_used {
    uint16_t flags;
    uint16_t idx;
    struct bs_vring_used_elem ring[]; /* num entries, then avail_event */
};

/* The inflight region of one split queue (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD):
 * shared memory the frontend keeps across backend restarts.  Every popped
 * head is marked (with a pop counter) until its used entry is published; the
 * heads of the batch being published are chained through `next` from
 * last_batch_head, so a restart can tell which of them reached the guest. */
#define BS_INFLIGHT_VERSION 1
#define BS_INFLIGHT_NONE 0xffff
struct bs_inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct bs_inflight_split {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct bs_inflight_desc desc[];
};

/* Packed virtqueue (virtio 1.1 section 2.8). */
#define BS_PDESC_F_AVAIL (1 << 7)
#define BS_PDESC_F_USED (1 << 15)
#define BS_RING_EVENT_ENABLE 0
#define BS_RING_EVENT_DISABLE 1
#define BS_RING_EVENT_DESC 2

struct bs_pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

struct bs_pevent {
    uint16_t off_wrap;
    uint16_t flags;
};

/* The inflight region of one packed queue.  Used descriptors overwrite the
 * ring slots of chains still in flight (completion is out of order, and the
 * driver may reuse a slot as soon as it saw it used), so every popped chain
 * keeps a copy of its ring descriptors here, in the record of the engine
 * slot that serves it.  A restart gives each request back its old slot.
 * avail_state: pop counter << 16 | position | wrap << 15 after the latest
 * pop (one store).  While a batch of used descriptors is published, its
 * first descriptor's flags are written last and batch_head names the batch
 * (chained through next): a restart looks at those flags to tell whether
 * the batch reached the guest. */
#define BS_INFLIGHT_PACKED_VERSION 0x5062   /* not BS_INFLIGHT_VERSION */
#define BS_INFLIGHT_PMAXD 128               /* BS_SEG_MAX + header + status */
struct bs_inflight_pslot {
    uint64_t counter;        /* pop order; 0: not in flight */
    uint16_t id;             /* buffer id */
    uint16_t ndesc;          /* ring descriptors the chain spans */
    uint16_t nsaved;         /* copied into d[]: < ndesc if it did not fit */
    uint16_t next;           /* batch chain */
    struct bs_pdesc d[BS_INFLIGHT_PMAXD];
};

struct bs_inflight_packed {
    uint64_t features;
    uint16_t version;        /* same offset as in bs_inflight_split */
    uint16_t desc_num;
    uint16_t nslots;
    uint16_t batch_head;     /* BS_INFLIGHT_NONE: no batch being published */
    uint64_t avail_state;
    uint32_t used;           /* next used position | wrap << 15 (published) */
    uint32_t batch_used;     /* first used position | wrap << 15 of the batch */
    uint32_t batch_end;      /* used position | wrap << 15 after the batch */
    uint32_t padding;
    struct bs_inflight_pslot slot[];
};

struct bs_vring {
    uint32_t num;
    int packed;
    /* split */
    struct bs_vring_desc *desc;
    struct bs_vring_avail *avail;
    struct bs_vring_used *used;
    /* packed */
    struct bs_pdesc *pdesc;
    struct bs_pevent *driver_evt;   /* written by the driver */
    struct bs_pevent *device_evt;   /* written by us */
};

/* A request's buffers in guest memory: the first nout iovecs are
 * device-readable, the rest device-writable. */
struct bs_chain {
    int niov;
    int nout;
    uint64_t out_len;
    uint64_t in_len;
    uint32_t ndesc;          /* descriptors walked (the drain budget counts them) */
    /* A chain whose buffers are bad (-EFAULT/-E2BIG/-EINVAL on a buffer) but
     * whose last descriptor was found and is device-writable inside guest
     * memory: its last byte, where the walk's caller writes IOERR.  NULL
     * when no status byte can be located (a loop, a bad index or table):
     * the caller must then break the queue rather than complete the chain
     * with a status it never wrote. */
    uint8_t *fault_status;
    struct iovec iov[BS_MAX_IOV];
};

/* Append one descriptor's buffer to c (readable ones must come first). */
int bs_add_buffer(const struct bs_mem *m, struct bs_chain *c,
                  const struct bs_vring_desc *d);

/* Map the rings of cfg through m.  -EINVAL on a bad size or alignment,
 * -EFAULT if a ring is not entirely inside one guest memory region. */
int bs_vring_map(struct bs_vring *vr, const struct bs_mem *m,
                 const struct bs_vring_cfg *cfg);
/* Walk the descriptor chain at head into c (direct or indirect).
 * -EINVAL: malformed (bad index, loop, order, nested indirect);
 * -EFAULT: a buffer outside guest memory; -E2BIG: too many segments.
 * On a bad buffer the walk goes on to the chain's end to locate its status
 * byte (c->fault_status). */
int bs_vring_chain(const struct bs_vring *vr, const struct bs_mem *m,
                   uint16_t head, struct bs_chain *c);

/* Packed ring: is the descriptor at pos available for wrap counter wrap? */
int bs_vring_packed_avail(const struct bs_vring *vr, uint16_t pos, int wrap);
/* Walk the packed chain starting at pos (available, checked by the caller).
 * *ndesc receives how many ring descriptors it spans and *id its buffer id,
 * both valid even when the buffers are bad (-EINVAL/-EFAULT/-E2BIG), so the
 * chain can still be completed.  *ndesc is 0 if the chain's extent cannot
 * be known (it runs over the whole ring): the ring is then broken. */
int bs_vring_packed_chain(const struct bs_vring *vr, const struct bs_mem *m,
                          uint16_t pos, struct bs_chain *c, uint16_t *id,
                          uint16_t *ndesc);

static inline int bs_vring_need_event(uint16_t event, uint16_t new_idx,
                                      uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---- virtio-blk request (blk.c) ---- */
#define BS_BLK_T_IN 0
#define BS_BLK_T_OUT 1
#define BS_BLK_T_FLUSH 4
#define BS_BLK_T_GET_ID 8
#define BS_BLK_T_DISCARD 11
#define BS_BLK_T_WRITE_ZEROES 13
#define BS_BLK_WZ_F_UNMAP 1
#define BS_BLK_S_OK 0
#define BS_BLK_S_IOERR 1
#define BS_BLK_S_UNSUPP 2
#define BS_BLK_ID_BYTES 20

enum bs_op {
    BS_OP_NONE = 0,        /* complete at once with status */
    BS_OP_READ,
    BS_OP_WRITE,
    BS_OP_FLUSH,
    BS_OP_DISCARD,
    BS_OP_WRITE_ZEROES,
};

/* One range of a discard / write-zeroes request, in bytes. */
struct bs_range {
    uint64_t offset;
    uint64_t len;
    int unmap;
};

/* What the engine must do for one request, decided from the chain alone. */
struct bs_blk_req {
    enum bs_op op;
    uint8_t status;         /* for BS_OP_NONE */
    uint32_t type;
    uint8_t *status_ptr;    /* NULL if the chain has no writable byte */
    uint64_t offset;        /* bytes into the backing */
    uint64_t len;           /* data bytes */
    int iov_first;          /* data iovecs: c->iov[iov_first .. +iov_count) */
    int iov_count;
    uint32_t used_len;      /* bytes written into writable buffers on success */
    int fua;                /* write: durable before its status (RWF_DSYNC)  */
    int nranges;            /* discard / write-zeroes */
    struct bs_range ranges[BS_MAX_DWZ_SEG];
};

/* Parse and validate one request against the target.  Fills r; never fails:
 * a bad request becomes BS_OP_NONE with an error status.  Trims c's iovecs
 * in place so the data iovecs can go straight into an SQE.  GET_ID is
 * answered here (copies the serial into the guest buffer). */
void bs_blk_parse(const struct bs_target_cfg *t, struct bs_chain *c,
                  struct bs_blk_req *r);
/* [sector*512, +len) inside the disk (its capacity now) and aligned to its
 * logical block; overflow-safe for any sector the guest sends. */
int bs_range_ok(const struct bs_target_cfg *t, uint64_t sector, uint64_t len);

struct bs_target {
    struct bs_target_cfg cfg;   /* cfg.writethrough is read atomically */
    /* QoS blocks (bs_target_set_qos), read atomically per request; qos_on
     * is nonzero when either is set: the one load a request costs when no
     * limit is */
    struct bs_qos *qos_vol;
    struct bs_qos *qos_grp;
    int qos_on;
};

/* ---- QoS (qos.c) ----
 * bs_qos_admit: may a request of op (enum bs_op) with BYTES of data start at
 * NOW?  0: yes, and its cost is taken from every bucket it counts in; else
 * the ns to wait before asking again (nothing taken).  *by_group is set
 * when the group's budget is (one of) the reason(s).  force: take the cost
 * without waiting (a stop). */
uint64_t bs_qos_admit(bs_target *t, int op, uint64_t bytes, uint64_t now, int *by_group,
                      int force);
/* Count a request that waited WAIT ns into the blocks (the queue's stats
 * are the caller's). */
void bs_qos_account(bs_target *t, uint64_t wait, int by_group);
int bs_lat_bucket(uint64_t ns);

/* ---- request execution core (core.c) ----
 * What every transport shares: a parsed request (struct bs_blk_req) and the
 * buffers of its data become io_uring operations (or plain syscalls with
 * sync_io); completions are retried, split and mapped to a status; counters,
 * latency histograms and USDT probes are kept here.  The transport (the
 * virtqueue engine in engine.c, the Xen blkif ring in blkif.c) pops
 * requests, fills a struct bs_io, and delivers the status through its
 * `done` callback. */
#include <liburing.h>

struct bs_io {
    struct bs_chain chain;   /* buffers; the data iovecs are named by req */
    struct bs_blk_req req;
    int fd;                  /* fd the I/O goes to */
    uint64_t done;           /* bytes transferred so far (short I/O) */
    int cur;                 /* discard / write-zeroes: range in progress */
    int fallback;            /* ... and whether its fallback mode is tried */
    uint64_t t_pop;          /* CLOCK_MONOTONIC ns when the request was popped */
    int sync_res;            /* sync_io: the operation's result ... */
    struct bs_io *sync_next; /* ... queued for completion like a CQE */
                             /* (rbd: the completed stack's link)           */
    struct bs_core *core;    /* rbd: the queue whose thread completes it */
};

struct bs_core;
/* Deliver the final status of io to the guest and free its slot. */
typedef void bs_core_done_fn(struct bs_core *c, struct bs_io *io, uint8_t status);
/* A read got BYTES of its data (a short transfer) into its data iovecs as
 * they are now, which the core then moves past them: what the transport
 * must note about those bytes before they go (a dirty log marks them). */
typedef void bs_core_partial_fn(struct bs_core *c, const struct bs_io *io, size_t bytes);

/* io_uring user_data values below this are the transports' own (polls,
 * notifications); anything else is a struct bs_io pointer. */
#define BS_UD_KICK 1ULL
#define BS_UD_CTL 2ULL
#define BS_UD_CALL 3ULL
#define BS_UD_CANCEL 4ULL
#define BS_UD_QOS 5ULL           /* the QoS timer: a held request's budget is due */
#define BS_UD_RBD 6ULL           /* librbd completed requests (the rbd eventfd) */
#define BS_UD_RESERVED 16ULL

struct bs_core {
    bs_target *target;
    int index;
    struct io_uring ring;
    int fixed_files;         /* backing fds registered: use slot indexes */
    int inflight;            /* requests submitted and not completed */
    int stopping;
    uint64_t stop_deadline;  /* stopping with I/O in flight: give up at (ns) */
    int stop_expired;        /* 1: in-flight I/O cancelled; 2: abandoned */
    int abandoned;           /* requests a stop gave up on */
    uint64_t t_now;          /* CLOCK_MONOTONIC ns, read once per batch of pops
                                or completions (the latency histograms' clock) */
    struct bs_io *sync_head; /* sync_io: completed, not yet handled (FIFO) */
    struct bs_io **sync_tail;
    struct bs_queue_stats *st;
    bs_core_done_fn *done;
    bs_core_partial_fn *partial;     /* NULL: nothing to note */
    /* QoS: a request out of budget is held here (one per queue: the
     * transport stops popping while one is) until bs_core_qos_tick starts
     * it; a timeout SQE wakes the thread for that */
    struct bs_io *held;
    uint64_t held_since;
    int held_by_group;
    int qos_timer;           /* the timeout SQE is armed */
    int qos_bypass;          /* start without asking (resubmissions, barriers) */
    struct __kernel_timespec qos_ts;
    /* rbd targets: librbd's threads push completed requests on rbd_done
     * (a lock-free stack) and signal rbd_efd, which a poll on this ring
     * watches; the thread then completes them like CQEs */
    int rbd_efd;
    int rbd_armed;
    int rbd_cbs;             /* librbd callbacks running (atomic) */
    struct bs_io *rbd_done;
};

uint64_t bs_now_ns(void);
/* Per start: the io_uring (entries for nslots requests plus the transport's
 * own polls) and the per-run state. */
int bs_core_init(struct bs_core *c, unsigned nslots);
void bs_core_exit(struct bs_core *c);
struct io_uring_sqe *bs_core_sqe(struct bs_core *c);
/* Start a parsed request (io->req filled, io->chain holding its buffers):
 * completes at once through done() for BS_OP_NONE or a failed submit. */
void bs_core_start(struct bs_core *c, struct bs_io *io);
/* QoS: if a request is held, start it when its budget is there (or at once
 * when stopping) and return 1 (the transport pops again); else arm the
 * timer that wakes the thread for it and return 0. */
int bs_core_qos_tick(struct bs_core *c);
/* A CQE (or a sync_io result) for io. */
void bs_core_cqe(struct bs_core *c, struct bs_io *io, int res);
/* sync_io: complete what ran inline, in order, like CQEs. */
void bs_core_run_sync(struct bs_core *c);
/* Count a request answered without I/O by the transport (e.g. a frontend
 * fault) with its status, as done() would, without calling done(). */
void bs_core_account(struct bs_core *c, struct bs_io *io, uint8_t status);
/* The stop request arrived: the drain deadline starts now. */
void bs_core_begin_stop(struct bs_core *c);
/* Stopping with I/O in flight: wait for completions until the deadline,
 * then cancel, then give up (-ETIME with stop_expired == 2). */
int bs_core_stop_wait(struct bs_core *c);
/* Handle the CQEs ready now: the transport's own user_data values go to
 * other(); the rest to bs_core_cqe. */
void bs_core_reap(struct bs_core *c, void (*other)(struct bs_core *c, uint64_t ud, int res));
/* ---- rbd backings (rbd.c) ---- */
int bs_rbd_core_init(struct bs_core *c);
void bs_rbd_core_exit(struct bs_core *c);
/* Submit io's operation at its current progress to librbd. */
int bs_rbd_submit(struct bs_core *c, struct bs_io *io);
/* The eventfd fired: complete what librbd finished (through bs_core_cqe). */
void bs_rbd_reap(struct bs_core *c);

/* A stats block with its per-kind totals summed from the per-op counters. */
void bs_stats_sum(const struct bs_queue_stats *in, struct bs_queue_stats *out);

/* USDT probes, provider "blkserve" (a nop instruction each until a tracer
 * attaches; see ebpf/).  The first argument of every probe is the target's
 * serial (the volume name under `blkserve serve`), the second the queue.
 * Arguments are passed as 64-bit values: bcc cannot read an argument that
 * the compiler left in a 32-bit sub-register such as %r14d. */
#define SDT_USE_VARIADIC
#include <sys/sdt.h>
#define BS_PROBE(...) STAP_PROBEV(blkserve, __VA_ARGS__)
#define U64(x) ((uint64_t)(x))

#endif
