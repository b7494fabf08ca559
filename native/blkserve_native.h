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

/* An open Ceph RBD image (rbd.c): a backing served through librbd. */
typedef struct bs_rbd bs_rbd;

struct bs_target_cfg {
    int fd;                 /* main fd (O_DIRECT when cache=none)            */
    int fd_buffered;        /* same file without O_DIRECT, for unaligned I/O */
    uint64_t capacity;      /* bytes, a multiple of block_size               */
    uint32_t dio_align;     /* buffer/offset alignment O_DIRECT needs; 0=n/a */
    uint32_t block_size;    /* logical block size offered: 512 or 4096       */
    int read_only;
    int is_block_device;    /* discard/zeroing semantics of fallocate differ */
    int writethrough;       /* initial cache mode: every write made durable  */
    uint32_t poll_us;       /* busy-poll the rings this long before sleeping */
    int poll_adaptive;      /* ... or up to poll_us, a window that follows  */
                            /* the wake-ups: it grows while sleeps end      */
                            /* within poll_us, shrinks (to 0: idle costs    */
                            /* nothing) while they last longer              */
    int sync_io;            /* serve I/O with plain syscalls in the queue    */
                            /* thread instead of io_uring (backings whose    */
                            /* driver cannot do non-blocking I/O, e.g. tmpfs,*/
                            /* where io_uring hands every request to a       */
                            /* kernel worker thread)                         */
    unsigned char serial[20]; /* VIRTIO_BLK_T_GET_ID answer, zero-padded    */
    uint32_t drain_timeout_ms; /* a stop waits this long for in-flight I/O,   */
                            /* then cancels it (0: 30 s); see bs_queue_stop  */
    bs_rbd *rbd;            /* an RBD image instead of fd (fd -1): requests  */
                            /* go to librbd; never abandoned by a stop (the  */
                            /* image's op timeout bounds them)               */
    int null_io;            /* no backing at all (fd -1, sync_io): reads     */
                            /* return zeroes, writes are dropped, flushes    */
                            /* and discards succeed: the protocol's own cost */
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
    uint32_t num;           /* queue size: 1..32768, a power of two if split */
    uint64_t desc_uva;      /* frontend virtual addresses of the rings; for  */
    uint64_t avail_uva;     /* a packed ring: descriptor ring, driver event  */
    uint64_t used_uva;      /* area (avail) and device event area (used)     */
    uint32_t base;          /* SET_VRING_BASE: split: next avail index;      */
                            /* packed: avail pos | wrap<<15, and the same  */
                            /* for the used side in the upper 16 bits      */
    int kick_fd;            /* eventfd the frontend kicks                    */
    int call_fd;            /* eventfd we signal, or -1                      */
    int event_idx;          /* VIRTIO_RING_F_EVENT_IDX negotiated            */
    int packed;             /* VIRTIO_F_RING_PACKED negotiated               */
};

/* Request kinds of the per-op counters and latency histograms. */
enum bs_stat_op {
    BS_STAT_READ = 0,
    BS_STAT_WRITE = 1,
    BS_STAT_FLUSH = 2,
    BS_STAT_DISCARD = 3,
    BS_STAT_WRITE_ZEROES = 4,
    BS_STAT_GET_ID = 5,
    BS_STAT_OTHER = 6,          /* request types the device does not know */
    BS_STAT_NOPS = 7
};

/* Buckets of the log2 latency histograms: bucket i counts requests that took
 * less than 2^i ns and at least 2^(i-1) ns; the last one takes the rest. */
enum { BS_LAT_BUCKETS = 40 };

/* One queue's counters.  Single writer (the queue thread, relaxed atomic
 * stores); any reader, in this process or another mapping the same shared
 * block (bs_queue_set_stats), reads them without stopping or locking the
 * queue. */
struct bs_queue_stats {
    /* reqs_* .. err_unsupp: filled in by bs_queue_get_stats from the per-op
     * counters below (zero in a shared block, whose readers sum those) */
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
    /* completed requests by op (enum bs_stat_op) and status: [0] OK,
     * [1] VIRTIO_BLK_S_IOERR, [2] VIRTIO_BLK_S_UNSUPP */
    uint64_t op_status[7][3];
    uint64_t op_bytes[7];    /* data bytes of requests completed OK          */
    uint64_t op_lat_sum_ns[7];
    /* latency from descriptor pop to used-ring entry, per op, log2 ns */
    uint64_t op_lat_hist[7][40];
    uint64_t resubmitted;    /* requests found in flight after a restart     */
    /* QoS: requests that waited for budget, the time they waited, and that
     * time's log2 ns histogram (bucketed like op_lat_hist) */
    uint64_t throttled;
    uint64_t throttle_wait_ns;
    uint64_t throttle_wait_hist[40];
    /* polling (--poll-us): windows spent spinning on the rings, those that
     * found work before they ran out, and the time they took */
    uint64_t polls;
    uint64_t poll_hits;
    uint64_t poll_ns;
};

/* ---- Ceph RBD backings (rbd.c) ----
 * bs_rbd_open connects to the cluster and opens POOL/IMAGE (in namespace
 * nspace, "" for none).  conf, client_id, keyring: NULL or "" for librbd's
 * defaults.  cache: rbd_cache (writeback: a write is acknowledged before it
 * is in the cluster; FLUSH waits).  op_timeout_s: an OSD operation (hence a
 * request) fails with -ETIMEDOUT after this long (0: waits forever);
 * connect_timeout_s bounds the monitor connection and the open.  On failure
 * stage names the step that failed ("connect", "pool", "image", ...). */
struct bs_rbd_cfg {
    const char *pool;
    const char *nspace;
    const char *image;
    const char *conf;
    const char *client_id;
    const char *keyring;
    int cache;
    int read_only;
    uint32_t op_timeout_s;
    uint32_t connect_timeout_s;
    char stage[32];
};
int bs_rbd_open(struct bs_rbd_cfg *cfg, bs_rbd **out);
int bs_rbd_size(bs_rbd *r, uint64_t *size);
/* rbd_flush: every acknowledged write is in the cluster (rbd_cache). */
int bs_rbd_flush(bs_rbd *r);
/* Take (acquire 1) or let go of (0) the image's exclusive lock for good:
 * while held, another client's writes fail (-EROFS) and its lock attempt
 * fails; -EROFS/-EBUSY: another client holds it. */
int bs_rbd_lock(bs_rbd *r, int acquire);
/* Image management, each on a connection of its own (cfg->image names the
 * image; read_only and cache are ignored): create (*size bytes), remove,
 * stat (*size out), resize (to *size). */
enum bs_rbd_op { BS_RBD_CREATE = 1, BS_RBD_REMOVE = 2, BS_RBD_STAT = 3, BS_RBD_RESIZE = 4 };
int bs_rbd_manage(struct bs_rbd_cfg *cfg, int what, uint64_t *size);
void bs_rbd_close(bs_rbd *r);

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
/* Dirty logging for live migration (VHOST_F_LOG_ALL): while a log is set,
 * every write the engine makes into guest memory (request data, status
 * bytes, used rings) sets the bit of each 4 KiB guest page it touched,
 * bit gpa / 4096 of the size-byte bitmap at log, atomically (the frontend
 * clears bits as it copies pages).  NULL stops logging.  May be called
 * while queues run: the caller keeps an old bitmap mapped until every
 * queue of this table has stopped once.  -EINVAL: size 0 with a log. */
int bs_mem_set_log(bs_mem *m, void *log, uint64_t size);

/* ---- backing target ---- */
void bs_get_limits(struct bs_limits *out);
int bs_target_new(const struct bs_target_cfg *cfg, bs_target **out);
/* Switch write cache mode at run time (the guest's config-space WCE write):
 * writethrough=1 makes each write durable (RWF_DSYNC) before its status. */
void bs_target_set_writethrough(bs_target *t, int writethrough);
/* Online resize: requests are checked against CAPACITY (bytes, a multiple
 * of the block size) from now on.  -EINVAL if it is not a multiple. */
int bs_target_set_capacity(bs_target *t, uint64_t capacity);
void bs_target_free(bs_target *t);

/* ---- QoS: IOPS and bandwidth limits (native/qos.c) ----
 * A struct bs_qos holds the limits of one volume or of one group of
 * volumes together with their token buckets, in memory that may be shared
 * between processes (a file every member's worker maps): each queue of each
 * member takes its requests' cost from the same buckets with atomic
 * operations, so a limit holds for the volume (or the group) as a whole.
 * The control plane writes rate / burst_rate / burst_ms at any time (each
 * field is read atomically per request) and then calls bs_qos_rebase.
 *
 * Each limit is a GCRA token bucket on CLOCK_MONOTONIC: a request of n
 * units (1 for iops_*, its data bytes for bps_*) may start when the bucket's
 * theoretical arrival time is at most `tolerance` ahead of now, and pushes
 * it n / rate seconds further.  tolerance is 100 ms of the rate, or with a
 * burst (burst_rate > rate, burst_ms > 0) the credit of running at
 * burst_rate for burst_ms: (burst_rate - rate) * burst_ms / rate; a second
 * bucket then holds the burst itself to burst_rate.  A request larger than
 * the bucket still starts once the bucket is level, and the debt it leaves
 * delays the next ones.  Reads count in *_total and *_read, writes in
 * *_total and *_write; DISCARD and WRITE_ZEROES count as writes in iops_*
 * only; FLUSH, GET_ID and bad requests are never held. */
enum bs_qos_kind {
    BS_QOS_IOPS_TOTAL = 0,
    BS_QOS_IOPS_READ = 1,
    BS_QOS_IOPS_WRITE = 2,
    BS_QOS_BPS_TOTAL = 3,
    BS_QOS_BPS_READ = 4,
    BS_QOS_BPS_WRITE = 5,
    BS_QOS_KINDS = 6
};

struct bs_qos_limit {
    uint64_t rate;          /* units per second; 0: no limit of this kind    */
    uint64_t burst_rate;    /* up to this rate for burst_ms after idling ... */
    uint64_t burst_ms;      /* ... (0, or burst_rate <= rate: no burst)      */
    uint64_t tat;           /* the engine's: bucket state (ns)               */
    uint64_t tat_burst;
    uint64_t reserved[3];
};

struct bs_qos {
    uint32_t magic;         /* 0x534f5142 ("BQOS") once initialised          */
    uint32_t size;          /* sizeof(struct bs_qos)                         */
    struct bs_qos_limit lim[6];
    /* requests held for this block's budget, and how long (atomic adds
     * from every queue of every member; log2 ns like op_lat_hist) */
    uint64_t throttled;
    uint64_t wait_ns;
    uint64_t wait_hist[40];
    char group[64];         /* the control plane's (a volume's group name)   */
};

/* Serve t's requests under VOL's limits and GRP's (either may be NULL).
 * Takes effect for the next request of every queue; the blocks must stay
 * mapped until bs_target_free or until no queue of t runs. */
void bs_target_set_qos(bs_target *t, struct bs_qos *vol, struct bs_qos *grp);
/* After a limit of KIND (-1: every kind) changed: debt owed under the old
 * limit is forgiven, so a raised limit applies at once. */
void bs_qos_rebase(struct bs_qos *q, int32_t kind);

/* ---- queues ---- */
int bs_queue_new(bs_target *t, int index, bs_queue **out);
/* Validate the ring against mem and start the queue's thread. */
int bs_queue_start(bs_queue *q, bs_mem *mem, const struct bs_vring_cfg *cfg);
/* Stop popping, wait for in-flight requests, join the thread.  *base
 * receives what GET_VRING_BASE must return (same encoding as
 * bs_vring_cfg.base).  No-op if not running.  The wait is bounded by the
 * target's drain_timeout_ms; requests still in flight then are cancelled
 * and, after a 1 s grace, abandoned without a status (left marked in the
 * inflight region, if any, for the next backend to redo): the queue is
 * stopped all the same and -ETIMEDOUT is returned. */
int bs_queue_stop(bs_queue *q, uint32_t *base);
int bs_queue_running(bs_queue *q);
int bs_queue_get_stats(bs_queue *q, struct bs_queue_stats *out);
/* Bytes of one queue's part of the inflight region (INFLIGHT_SHMFD) for a
 * ring of QUEUE_SIZE entries (a multiple of 64). */
uint64_t bs_inflight_queue_bytes(uint32_t queue_size);
/* Track popped requests in REGION (SIZE bytes, this queue's part of the
 * frontend's inflight shared memory; NULL to stop) from the next start on.
 * At start, requests the region shows in flight (a previous backend died
 * with them) are resubmitted in pop order, and the ring resumes after them.
 * Split rings only.  -EBUSY while running. */
int bs_queue_set_inflight(bs_queue *q, void *region, uint64_t size);
/* Keep the queue's counters in AREA from now on (e.g. a file mapped shared,
 * read by another process); the counts so far are copied there.  AREA must
 * stay valid until bs_queue_free or the next call.  -EBUSY while running. */
int bs_queue_set_stats(bs_queue *q, struct bs_queue_stats *area);
void bs_queue_free(bs_queue *q);

/* ---- Xen blkif rings (native/blkif.c) ----
 * One engine thread and io_uring per blkif ring, on the same request core
 * as the virtqueues.  The caller (Python, through cffi) opens the Xen
 * libraries, maps the shared ring, binds the event channel and passes the
 * handles and library functions here: the engine links no Xen library. */
typedef struct bs_blkif bs_blkif;

struct bs_xen_ops {
    void *gnttab;           /* xengnttab_handle *                            */
    void *evtchn;           /* xenevtchn_handle *                            */
    /* xengnttab_map_domain_grant_refs, xengnttab_unmap, xenevtchn_notify,
     * xenevtchn_pending, xenevtchn_unmask */
    void *(*map_domain_grant_refs)(void *xgt, uint32_t count, uint32_t domid,
                                   uint32_t *refs, int prot);
    int (*unmap)(void *xgt, void *start_address, uint32_t count);
    int (*notify)(void *xce, uint32_t port);
    int (*pending)(void *xce);
    int (*unmask)(void *xce, uint32_t port);
};

struct bs_blkif_cfg {
    void *sring;            /* the shared ring, mapped: ring_pages pages     */
    uint32_t ring_pages;    /* 2^ring-page-order: 1..16                      */
    uint32_t domid;         /* the frontend's domain                         */
    uint32_t port;          /* our end of the bound event channel            */
    int evtchn_fd;          /* xenevtchn_fd: poll(2)-able                    */
    int persistent;         /* feature-persistent: keep data grants mapped   */
    uint32_t max_indirect;  /* feature-max-indirect-segments offered, or 0   */
    int discard;            /* feature-discard offered                       */
};

int bs_blkif_new(bs_target *t, int index, bs_blkif **out);
/* Largest max_indirect bs_blkif_start accepts. */
uint32_t bs_blkif_max_indirect(void);
/* Serve the ring from a new thread (ops and cfg are copied). */
int bs_blkif_start(bs_blkif *b, const struct bs_xen_ops *ops, const struct bs_blkif_cfg *cfg);
/* Stop popping, wait for in-flight requests (bounded like bs_queue_stop),
 * unmap every grant, join the thread. */
int bs_blkif_stop(bs_blkif *b);
int bs_blkif_running(bs_blkif *b);
int bs_blkif_get_stats(bs_blkif *b, struct bs_queue_stats *out);
int bs_blkif_set_stats(bs_blkif *b, struct bs_queue_stats *area);
void bs_blkif_free(bs_blkif *b);

/* ==== bs_bench: vhost-user-blk frontend load generator (native/bench.c) ====
 * Owned by `blkserve bench`; independent of the engine above.  Lifecycle:
 * bs_bench_new -> bs_bench_connect -> bs_bench_setup -> bs_bench_run (blocks
 * for the whole run; bs_bench_stop from another thread ends it early) ->
 * bs_bench_get_stats -> bs_bench_free.  On failure bs_bench_error() gives a
 * sentence saying what went wrong (also after a failed bs_bench_new, whose
 * handle must still be freed). */
typedef struct bs_bench bs_bench;

enum bs_bench_rw {
    BS_BENCH_READ = 0,
    BS_BENCH_WRITE = 1,
    BS_BENCH_RANDREAD = 2,
    BS_BENCH_RANDWRITE = 3,
    BS_BENCH_RANDRW = 4
};

struct bs_bench_cfg {
    const char *socket_path;  /* copied by bs_bench_new                    */
    uint32_t rw;              /* enum bs_bench_rw                          */
    uint32_t rwmix_read;      /* randrw: percentage of reads               */
    uint32_t bs;              /* bytes per request, multiple of 512        */
    uint32_t iodepth;         /* requests in flight per queue              */
    uint32_t queues;
    int32_t verify;           /* write a per-sector pattern, check reads    */
    int32_t indirect;         /* one indirect descriptor per request        */
    int32_t dirty_log;        /* LOG_ALL on: the backend marks a dirty log   */
    uint64_t size;            /* bytes of the device to use; 0 = capacity  */
    uint64_t runtime_ns;      /* measured time                             */
    uint64_t ramp_ns;         /* unmeasured warm-up before it              */
    uint64_t poll_ns;         /* busy-poll the used ring before sleeping   */
    uint64_t timeout_ns;      /* no completion for this long: fail; 0=30 s */
    uint64_t seed;            /* 0: pick one                               */
};

struct bs_bench_info {
    uint64_t offered_features;
    uint64_t offered_protocol_features;
    uint64_t features;           /* acked                                  */
    uint64_t protocol_features;  /* acked                                  */
    uint64_t capacity;           /* bytes, from the device config          */
    uint64_t size;               /* bytes used by the run                  */
    uint64_t seed;
    uint32_t max_queues;
    uint32_t queue_size;
    uint32_t blk_size;
    uint32_t size_max;           /* 0 if the device sets no limit          */
    int32_t event_idx;
    int32_t indirect;
    int32_t reply_ack;
    int32_t dirty_log;           /* LOG_ALL acked and a log handed over    */
    uint64_t dirty_pages;        /* pages marked in that log so far        */
};

struct bs_bench_stats {
    uint64_t ios;                /* completed inside the measured window   */
    uint64_t ios_read;
    uint64_t ios_write;
    uint64_t bytes;
    uint64_t elapsed_ns;         /* the measured window                    */
    uint64_t errors;             /* io_errors + verify_errors, all passes  */
    uint64_t io_errors;          /* status byte other than VIRTIO_BLK_S_OK */
    uint64_t verify_errors;      /* requests whose data had a bad sector   */
    int64_t first_bad_offset;    /* byte offset of the first error, or -1  */
    uint64_t lat_min_ns;
    uint64_t lat_mean_ns;
    uint64_t lat_p50_ns;
    uint64_t lat_p90_ns;
    uint64_t lat_p99_ns;
    uint64_t lat_p999_ns;
    uint64_t lat_max_ns;
    uint64_t kicks;              /* kick eventfd writes                    */
    uint64_t calls;              /* call eventfd wake-ups                  */
    uint64_t sleeps;             /* waits that blocked in poll(2)          */
    uint64_t rescue_kicks;       /* kicks re-sent after 10 ms without progress */
    uint64_t ios_all;            /* run phase incl. ramp and final drain   */
    uint64_t wait_ns;            /* time spent polling or sleeping for completions */
};

int bs_bench_new(const struct bs_bench_cfg *cfg, bs_bench **out);
int bs_bench_connect(bs_bench *b);
int bs_bench_setup(bs_bench *b);
int bs_bench_get_info(bs_bench *b, struct bs_bench_info *out);
int bs_bench_run(bs_bench *b);
void bs_bench_stop(bs_bench *b);
/* queue -1: all queues together */
int bs_bench_get_stats(bs_bench *b, int32_t queue, struct bs_bench_stats *out);
int bs_bench_error(bs_bench *b, char *buf, uint32_t len);
void bs_bench_free(bs_bench *b);

/* bs_bench_blkif (native/bench_blkif.c): the blkif transport under the same
 * kind of load without Xen: a blkfront in the calling thread on a ring in a
 * memfd of "guest pages", the grant and event-channel calls stand-ins over
 * it (persistent grants, as Linux's blkfront uses them), the engine serving
 * target T from its own thread.  One run at a time (-EBUSY). */
struct bs_bench_blkif_cfg {
    uint32_t rw;              /* BS_BENCH_RANDREAD, _RANDWRITE or _RANDRW  */
    uint32_t rwmix_read;      /* randrw: percentage of reads               */
    uint32_t bs;              /* bytes per request: 512..44 KiB, x512      */
    uint32_t iodepth;         /* 1..32 (one ring page)                     */
    uint64_t size;            /* bytes of the target to use; 0 = capacity  */
    uint64_t runtime_ns;
    uint64_t ramp_ns;
    uint64_t poll_ns;         /* poll the response ring before sleeping    */
    uint64_t timeout_ns;      /* no response for this long: -ETIMEDOUT     */
    uint64_t seed;            /* 0: pick one                               */
    int32_t frontend_cpu;     /* pin the frontend (calling thread), or -1  */
    int32_t backend_cpu;      /* pin the engine thread, or -1              */
};

struct bs_bench_blkif_result {
    struct bs_bench_stats stats;
    uint64_t backend_cpu_ns;  /* the process's CPU but the frontend's, in  */
                              /* the measured window: the engine thread    */
};

int bs_bench_blkif(bs_target *t, const struct bs_bench_blkif_cfg *cfg,
                   struct bs_bench_blkif_result *out);
/* ==== end bs_bench ==== */
