/* blkserve bench: the frontend load generator's private declarations,
 * shared by bench_vu.c (vhost-user messages), bench_setup.c (negotiation,
 * guest memory and rings) and bench.c (the queue threads and results). */
#ifndef BS_BENCH_H
#define BS_BENCH_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef BS_INTERNAL_H          /* the engine's header has it already */
#include "blkserve_native.h"
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "blkserve bench assumes a little-endian host (virtio 1.x rings are LE)"
#endif

/* ---- protocol constants (vhost-user spec, virtio spec) ---- */

enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_SET_MEM_TABLE = 5,
    VU_SET_LOG_BASE = 6,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24,
};

#define VU_VERSION 0x1u
#define VU_VERSION_MASK 0x3u
#define VU_FLAG_REPLY (1u << 2)
#define VU_FLAG_NEED_REPLY (1u << 3)
#define VU_MAX_PAYLOAD 512u
#define VU_TIMEOUT_S 10

#define F_BLK_SIZE_MAX 1
#define F_BLK_RO 5
#define F_BLK_BLK_SIZE 6
#define F_BLK_MQ 12
#define F_LOG_ALL 26
#define F_RING_INDIRECT 28
#define F_RING_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32

#define PF_MQ 0
#define PF_LOG_SHMFD 1
#define PF_REPLY_ACK 3
#define PF_CONFIG 9

#define BIT(n) (1ULL << (n))

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_F_LOG 1          /* vhost_vring_addr.flags: log the used ring */
#define VRING_USED_F_NO_NOTIFY 1

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define STATUS_UNSET 0xff

#define SECTOR 512u
#define CONFIG_READ_LEN 36u    /* capacity .. num_queues of virtio_blk_config */
#define MAX_QUEUES 64u
#define MAX_DEPTH 1024u
#define MAX_RING 1024u         /* the largest queue size every backend takes */
#define MAX_BS (8u << 20)
#define MAX_MEM (4ULL << 30)
#define PAGE 4096ULL
#define META_STRIDE 64u        /* header(16) + status(1), a cache line each */
#define SLEEP_MS 1             /* longest sleep: deadline, stop and hang-up checks */
#ifndef RESCUE_MS
#define RESCUE_MS 10           /* no progress this long: kick again */
#endif

/* log-linear latency histogram: 32 sub-buckets per power of two (error
 * below 3%), values from 0 to 2^40 ns. */
#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_MAX_EXP 40
#define HIST_N (HIST_SUB + (HIST_MAX_EXP - HIST_SUB_BITS) * HIST_SUB)

/* ---- rings, as the driver lays them out ---- */

struct vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vavail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];       /* num entries, then used_event */
};

struct vused_elem {
    uint32_t id;
    uint32_t len;
};

struct vused {
    uint16_t flags;
    uint16_t idx;
    struct vused_elem ring[]; /* num entries, then avail_event */
};

struct blk_hdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

enum phase { PH_PREFILL, PH_RUN, PH_VERIFY, PH_COUNT };

struct slot {
    uint8_t *meta;           /* request header, then the status byte at +16 */
    uint8_t *data;
    struct vdesc *chain;     /* the three descriptors this slot reuses */
    uint64_t offset;         /* bytes into the device */
    uint64_t t_submit;
    uint16_t head;
    uint8_t is_read;
    uint8_t inflight;
};

struct bq {
    struct bs_bench *b;
    uint32_t index;
    uint32_t num;
    uint16_t mask;
    struct vdesc *desc;
    struct vavail *avail;
    struct vused *used;
    uint16_t *used_event;
    uint16_t *avail_event;
    uint64_t desc_off, avail_off, used_off;   /* offsets in guest memory */
    int kick_fd;
    int call_fd;
    uint16_t avail_idx;      /* next index we publish */
    uint16_t last_used;      /* next used entry we consume */
    uint64_t last_rescue;    /* time of the last rescue kick */

    struct slot *slots;
    uint32_t *free_list;
    uint32_t nfree;

    uint64_t rng;
    uint64_t seq_next;       /* sequential workloads and passes: next block */
    uint64_t share_begin, share_end;

    /* measured window of the run phase */
    uint64_t t_count_from, t_count_to;

    struct bs_bench_stats st;
    uint64_t lat_sum;
    uint64_t hist[HIST_N];

    pthread_t thread;
};

struct bs_bench {
    struct bs_bench_cfg cfg;
    char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int sock;

    struct bs_bench_info info;
    uint32_t depth;          /* = cfg.iodepth */
    uint64_t nblocks;        /* size / bs */
    uint64_t seed_a;         /* pattern of the prefill pass */
    uint64_t seed_b;         /* pattern of writes in the run phase */
    uint8_t *written;        /* verify: blocks written in the run phase */
    uint8_t *busy;           /* verify with writes: block has a request in flight */
    int writes_in_run;

    int memfd;
    uint8_t *mem;
    uint64_t mem_size;
    int logfd;               /* --dirty-log: the log the backend marks */
    uint8_t *log;
    uint64_t log_size;

    struct bq *q;
    uint32_t nq;
    int set_up;
    int ran;

    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    int gate;                /* 0 closed, 1 run, -1 give up */
    pthread_barrier_t barrier;
    int abort_err;           /* atomic: first fatal error of any thread */
    int stop;                /* atomic: bs_bench_stop() was called */
    pthread_mutex_t err_lock;
    char err[256];
};


/* ---- helpers shared by the vhost-user and blkif load generators ---- */

static inline unsigned bench_hist_bucket(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    if (e >= HIST_MAX_EXP)
        return HIST_N - 1;
    unsigned m = (unsigned)(v >> (e - HIST_SUB_BITS));   /* HIST_SUB..2*HIST_SUB-1 */
    return HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + (m - HIST_SUB);
}

static inline void bench_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t bench_rng(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* bench_report.c: mean and percentiles of ST from a histogram */
void bench_finish_stats(struct bs_bench_stats *st, const uint64_t *hist, uint64_t lat_sum);

/* bench_vu.c */
int bench_fail(struct bs_bench *b, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int bench_aborted(const struct bs_bench *b);
int bench_stopped(const struct bs_bench *b);
uint64_t bench_now_ns(void);
const char *bench_req_name(uint32_t req);
int bench_vu_send(struct bs_bench *b, uint32_t req, const void *payload,
                  uint32_t size, const int *fds, int nfds, int need_reply);
int bench_vu_read(struct bs_bench *b, uint32_t req, void *buf, size_t len);
int bench_vu_recv_reply(struct bs_bench *b, uint32_t req, void *payload, uint32_t *size);
int bench_vu_get_u64(struct bs_bench *b, uint32_t req, uint64_t *out);
int bench_vu_set(struct bs_bench *b, uint32_t req, const void *payload, uint32_t size,
                 const int *fds, int nfds);
int bench_vu_set_u64(struct bs_bench *b, uint32_t req, uint64_t v);
int bench_vu_set_state(struct bs_bench *b, uint32_t req, uint32_t index, uint32_t num);

#endif
