/*
 * blkserve native engine: the whole Python <-> C boundary.
 *
 * This header is read verbatim by cffi's cdef(), so it holds no preprocessor
 * lines, only opaque handles, plain integers and small plain structs.  Every
 * function returns 0 (or a non-negative count) on success and -errno on
 * failure; nothing here prints or exits.
 */

/* Guest memory: the regions of the frontend's RAM, mapped from their fds. */
typedef struct bs_mem bs_mem;

/* The backing store of one export, shared by all of its queues. */
typedef struct bs_target bs_target;

/* One virtqueue served by one engine thread with its own io_uring. */
typedef struct bs_queue bs_queue;

struct bs_target_cfg {
    int fd;                 /* main fd (O_DIRECT when cache=none)            */
    int fd_buffered;        /* same file without O_DIRECT, for unaligned I/O */
    uint64_t capacity;      /* bytes, a multiple of block_size               */
    uint32_t dio_align;     /* buffer/offset alignment O_DIRECT needs; 0=n/a */
    uint32_t block_size;    /* logical block size offered: 512 or 4096       */
    int read_only;
    int is_block_device;    /* discard/zeroing semantics of fallocate differ */
    int writethrough;       /* initial cache mode: every write made durable  */
    unsigned char serial[20]; /* VIRTIO_BLK_T_GET_ID answer, zero-padded    */
};

/* Request limits the engine enforces; the config space advertises them. */
struct bs_limits {
    uint32_t seg_max;
    uint32_t size_max;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
};

struct bs_vring_cfg {
    uint32_t num;           /* queue size: power of two, 1..32768            */
    uint64_t desc_uva;      /* frontend virtual addresses of the rings       */
    uint64_t avail_uva;
    uint64_t used_uva;
    uint16_t last_avail;    /* SET_VRING_BASE                                */
    int kick_fd;            /* eventfd the frontend kicks                    */
    int call_fd;            /* eventfd we signal, or -1                      */
    int event_idx;          /* VIRTIO_RING_F_EVENT_IDX negotiated            */
};

struct bs_queue_stats {
    uint64_t reqs_read;
    uint64_t reqs_write;
    uint64_t reqs_flush;
    uint64_t reqs_get_id;
    uint64_t reqs_discard;
    uint64_t reqs_write_zeroes;
    uint64_t reqs_other;
    uint64_t bytes_read;
    uint64_t bytes_write;
    uint64_t bytes_discard;
    uint64_t bytes_write_zeroes;
    uint64_t err_ioerr;      /* requests answered VIRTIO_BLK_S_IOERR         */
    uint64_t err_unsupp;     /* requests answered VIRTIO_BLK_S_UNSUPP        */
    uint64_t bad_chains;     /* malformed descriptor chains (guest fault)    */
    uint64_t io_errors;      /* backing-store errors from io_uring           */
    uint64_t kicks;
    uint64_t notifies;
    uint64_t inflight;
    int32_t broken;          /* ring-level guest fault: queue stopped        */
    int32_t last_error;      /* -errno of the latest failure, 0 if none      */
};

/* ---- guest memory ---- */
int bs_mem_new(bs_mem **out);
/* Map [mmap_offset, mmap_offset+size) of fd for guest range [gpa, gpa+size).
 * Fails with -EINVAL if the range is beyond the fd's size (no SIGBUS later),
 * overlaps another region, or the table is full. */
int bs_mem_add(bs_mem *m, int fd, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset);
/* Unmap the region exactly matching [gpa, gpa+size) at uva: -ENOENT if none.
 * Like bs_mem_free, -EBUSY while a running queue uses the table. */
int bs_mem_remove(bs_mem *m, uint64_t gpa, uint64_t size, uint64_t uva);
int bs_mem_count(bs_mem *m);
/* -EBUSY while a running queue still uses the table. */
int bs_mem_free(bs_mem *m);

/* ---- backing target ---- */
void bs_get_limits(struct bs_limits *out);
int bs_target_new(const struct bs_target_cfg *cfg, bs_target **out);
/* Switch write cache mode at run time (the guest's config-space WCE write):
 * writethrough=1 makes each write durable (RWF_DSYNC) before its status. */
void bs_target_set_writethrough(bs_target *t, int writethrough);
void bs_target_free(bs_target *t);

/* ---- queues ---- */
int bs_queue_new(bs_target *t, int index, bs_queue **out);
/* Validate the ring against mem and start the queue's thread. */
int bs_queue_start(bs_queue *q, bs_mem *mem, const struct bs_vring_cfg *cfg);
/* Stop popping, wait for in-flight requests, join the thread.  *last_avail
 * receives the index GET_VRING_BASE must return.  No-op if not running. */
int bs_queue_stop(bs_queue *q, uint16_t *last_avail);
int bs_queue_running(bs_queue *q);
int bs_queue_get_stats(bs_queue *q, struct bs_queue_stats *out);
void bs_queue_free(bs_queue *q);
