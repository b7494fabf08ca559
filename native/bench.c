/* blkserve bench: a vhost-user-blk *frontend* load generator.
 *
 * It plays the part QEMU and the guest driver play together: it owns the
 * "guest RAM" (one memfd), speaks the vhost-user control protocol on a unix
 * socket, lays out split virtqueues in that memory and keeps `iodepth`
 * virtio-blk requests in flight on each queue, one thread per queue.  It is
 * written against the vhost-user spec and the virtio spec only, so it drives
 * any vhost-user-blk backend (blkserve, qemu-storage-daemon, ...).
 *
 * The backend is untrusted: every reply is checked (request code, flags,
 * version, size) before it is used, every used-ring entry is checked against
 * the requests actually in flight, and the socket has a receive timeout, so a
 * broken backend ends the run with an error message, never a crash or a hang.
 *
 * Waiting for completions: a thread first busy-polls the used ring for up to
 * poll_ns (cheap when the backend answers within microseconds; the frontend
 * has a core of its own), then arms the notification (EVENT_IDX: used_event
 * = last seen used index) and sleeps in poll(2) on the call eventfd.  Sleeps
 * last at most 1 ms, so the deadline, a stop request and a backend hang-up
 * are noticed; after 10 ms without progress a "rescue" kick (counted) covers
 * a kick the backend may have lost.  Kicks honour avail_event (or
 * VRING_USED_F_NO_NOTIFY).
 *
 * No file-scope state: everything lives in struct bs_bench and struct bq.
 * Functions return 0 or -errno; a failure also leaves a sentence in
 * b->err for bs_bench_error().  Nothing here prints. */
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

#include "blkserve_native.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "blkserve bench assumes a little-endian host (virtio 1.x rings are LE)"
#endif

/* ---- protocol constants (vhost-user spec, virtio spec) ---- */

enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_SET_MEM_TABLE = 5,
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
#define F_RING_INDIRECT 28
#define F_RING_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32

#define PF_MQ 0
#define PF_REPLY_ACK 3
#define PF_CONFIG 9

#define BIT(n) (1ULL << (n))

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
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

/* ---- errors ---- */

static int fail(struct bs_bench *b, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Record the first failure's message; returns err (negative errno). */
static int fail(struct bs_bench *b, int err, const char *fmt, ...)
{
    va_list ap;
    int expected = 0;

    pthread_mutex_lock(&b->err_lock);
    if (b->err[0] == '\0') {
        va_start(ap, fmt);
        vsnprintf(b->err, sizeof(b->err), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&b->err_lock);
    __atomic_compare_exchange_n(&b->abort_err, &expected, err, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return err;
}

static int aborted(const struct bs_bench *b)
{
    return __atomic_load_n(&b->abort_err, __ATOMIC_RELAXED) != 0;
}

static int stopped(const struct bs_bench *b)
{
    return __atomic_load_n(&b->stop, __ATOMIC_RELAXED) != 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static const char *req_name(uint32_t req)
{
    switch (req) {
    case VU_GET_FEATURES: return "GET_FEATURES";
    case VU_SET_FEATURES: return "SET_FEATURES";
    case VU_SET_OWNER: return "SET_OWNER";
    case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VU_SET_VRING_NUM: return "SET_VRING_NUM";
    case VU_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VU_SET_VRING_BASE: return "SET_VRING_BASE";
    case VU_GET_VRING_BASE: return "GET_VRING_BASE";
    case VU_SET_VRING_KICK: return "SET_VRING_KICK";
    case VU_SET_VRING_CALL: return "SET_VRING_CALL";
    case VU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VU_GET_CONFIG: return "GET_CONFIG";
    default: return "request";
    }
}

/* ---- vhost-user messages ---- */

struct vu_hdr {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
};

static int vu_send(struct bs_bench *b, uint32_t req, const void *payload,
                   uint32_t size, const int *fds, int nfds, int need_reply)
{
    struct vu_hdr h = {
        .request = req,
        .flags = VU_VERSION | (need_reply ? VU_FLAG_NEED_REPLY : 0),
        .size = size,
    };
    uint8_t buf[sizeof(h) + VU_MAX_PAYLOAD];
    union {
        char b[CMSG_SPACE(sizeof(int) * 8)];
        struct cmsghdr align;
    } ctl;
    size_t len = sizeof(h) + size, off = 0;

    if (size > VU_MAX_PAYLOAD || nfds > 8)
        return fail(b, -EINVAL, "internal error: %s message too large", req_name(req));
    memcpy(buf, &h, sizeof(h));
    if (size)
        memcpy(buf + sizeof(h), payload, size);
    while (off < len) {
        struct iovec iov = { .iov_base = buf + off, .iov_len = len - off };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (off == 0 && nfds > 0) {
            struct cmsghdr *c;
            memset(&ctl, 0, sizeof(ctl));
            msg.msg_control = ctl.b;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
        }
        ssize_t n = sendmsg(b->sock, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return fail(b, -ETIMEDOUT, "backend did not accept %s within %d s",
                            req_name(req), VU_TIMEOUT_S);
            if (e == EPIPE || e == ECONNRESET)
                return fail(b, -ECONNRESET, "backend closed the connection before %s "
                            "could be sent", req_name(req));
            return fail(b, -e, "sending %s to the backend failed: %s",
                        req_name(req), strerror(e));
        }
        off += (size_t)n;
    }
    return 0;
}

/* Read exactly len bytes; any fds the backend attaches are closed (no reply
 * this frontend reads carries one). */
static int vu_read(struct bs_bench *b, uint32_t req, void *buf, size_t len)
{
    size_t off = 0;

    while (off < len) {
        struct iovec iov = { .iov_base = (uint8_t *)buf + off, .iov_len = len - off };
        union {
            char b[CMSG_SPACE(sizeof(int) * 8)];
            struct cmsghdr align;
        } ctl;
        struct msghdr msg = {
            .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = ctl.b, .msg_controllen = sizeof(ctl.b),
        };
        ssize_t n = recvmsg(b->sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return fail(b, -ETIMEDOUT, "backend did not answer %s within %d s",
                            req_name(req), VU_TIMEOUT_S);
            if (e == ECONNRESET)
                return fail(b, -ECONNRESET, "backend closed the connection instead of "
                            "answering %s", req_name(req));
            return fail(b, -e, "reading the reply to %s failed: %s",
                        req_name(req), strerror(e));
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < nfd; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    close(fd);
                }
            }
        }
        if (n == 0)
            return fail(b, -ECONNRESET, "backend closed the connection instead of "
                        "answering %s", req_name(req));
        off += (size_t)n;
    }
    return 0;
}

/* Receive the reply to req.  *size is the buffer size on entry and the
 * payload size on return; a payload larger than the buffer is an error. */
static int vu_recv_reply(struct bs_bench *b, uint32_t req, void *payload, uint32_t *size)
{
    struct vu_hdr h;
    int ret = vu_read(b, req, &h, sizeof(h));
    if (ret)
        return ret;
    if (h.request != req)
        return fail(b, -EPROTO, "backend answered %s with message type %u",
                    req_name(req), h.request);
    if ((h.flags & VU_VERSION_MASK) != VU_VERSION)
        return fail(b, -EPROTO, "backend's reply to %s has protocol version %u, "
                    "expected %u", req_name(req), h.flags & VU_VERSION_MASK, VU_VERSION);
    if (!(h.flags & VU_FLAG_REPLY))
        return fail(b, -EPROTO, "backend's reply to %s lacks the reply flag (flags %#x)",
                    req_name(req), h.flags);
    if (h.size > *size)
        return fail(b, -EPROTO, "backend's reply to %s is %u bytes, at most %u expected",
                    req_name(req), h.size, *size);
    ret = vu_read(b, req, payload, h.size);
    if (ret)
        return ret;
    *size = h.size;
    return 0;
}

/* A request whose reply is one u64. */
static int vu_get_u64(struct bs_bench *b, uint32_t req, uint64_t *out)
{
    uint32_t size = sizeof(*out);
    int ret = vu_send(b, req, NULL, 0, NULL, 0, 0);
    if (ret)
        return ret;
    ret = vu_recv_reply(b, req, out, &size);
    if (ret)
        return ret;
    if (size != sizeof(*out))
        return fail(b, -EPROTO, "backend's reply to %s is %u bytes, expected 8",
                    req_name(req), size);
    return 0;
}

/* A request without a reply of its own: with REPLY_ACK it asks for the ack
 * and checks it is zero (success). */
static int vu_set(struct bs_bench *b, uint32_t req, const void *payload, uint32_t size,
                  const int *fds, int nfds)
{
    int ack = !!(b->info.protocol_features & BIT(PF_REPLY_ACK));
    uint64_t code = 0;
    uint32_t rsize = sizeof(code);
    int ret = vu_send(b, req, payload, size, fds, nfds, ack);
    if (ret || !ack)
        return ret;
    ret = vu_recv_reply(b, req, &code, &rsize);
    if (ret)
        return ret;
    if (rsize != sizeof(code))
        return fail(b, -EPROTO, "backend's ack of %s is %u bytes, expected 8",
                    req_name(req), rsize);
    if (code != 0)
        return fail(b, -EIO, "backend rejected %s (ack code %llu)", req_name(req),
                    (unsigned long long)code);
    return 0;
}

static int vu_set_u64(struct bs_bench *b, uint32_t req, uint64_t v)
{
    return vu_set(b, req, &v, sizeof(v), NULL, 0);
}

static int vu_set_state(struct bs_bench *b, uint32_t req, uint32_t index, uint32_t num)
{
    uint32_t p[2] = { index, num };
    return vu_set(b, req, p, sizeof(p), NULL, 0);
}

/* ---- configuration checks ---- */

static int is_pow2(uint64_t x)
{
    return x && !(x & (x - 1));
}

static int rw_writes(uint32_t rw)
{
    return rw == BS_BENCH_WRITE || rw == BS_BENCH_RANDWRITE || rw == BS_BENCH_RANDRW;
}

static int check_cfg(struct bs_bench *b, const struct bs_bench_cfg *c)
{
    if (!c->socket_path || !c->socket_path[0])
        return fail(b, -EINVAL, "no socket path given");
    if (strlen(c->socket_path) >= sizeof(b->socket_path))
        return fail(b, -ENAMETOOLONG, "socket path is longer than %zu bytes",
                    sizeof(b->socket_path) - 1);
    if (c->rw > BS_BENCH_RANDRW)
        return fail(b, -EINVAL, "unknown workload %u", c->rw);
    if (c->rwmix_read > 100)
        return fail(b, -EINVAL, "read percentage %u is above 100", c->rwmix_read);
    if (c->bs < SECTOR || c->bs % SECTOR || c->bs > MAX_BS)
        return fail(b, -EINVAL, "block size %u is not a multiple of 512 in 512..%u",
                    c->bs, MAX_BS);
    if (c->iodepth < 1 || c->iodepth > MAX_DEPTH)
        return fail(b, -EINVAL, "iodepth %u is not in 1..%u", c->iodepth, MAX_DEPTH);
    if (!c->indirect && c->iodepth * 3 > MAX_RING)
        return fail(b, -EINVAL, "iodepth %u needs %u descriptors per queue; at most %u "
                    "without indirect descriptors", c->iodepth, c->iodepth * 3, MAX_RING);
    if (c->queues < 1 || c->queues > MAX_QUEUES)
        return fail(b, -EINVAL, "queue count %u is not in 1..%u", c->queues, MAX_QUEUES);
    if (c->runtime_ns == 0)
        return fail(b, -EINVAL, "runtime must be positive");
    if (c->size && c->size < c->bs)
        return fail(b, -EINVAL, "size %llu is smaller than the block size %u",
                    (unsigned long long)c->size, c->bs);
    return 0;
}

/* ---- lifecycle ---- */

int bs_bench_new(const struct bs_bench_cfg *cfg, bs_bench **out)
{
    struct bs_bench *b = calloc(1, sizeof(*b));
    int ret;

    if (!b)
        return -ENOMEM;
    b->sock = -1;
    b->memfd = -1;
    pthread_mutex_init(&b->err_lock, NULL);
    pthread_mutex_init(&b->gate_lock, NULL);
    pthread_cond_init(&b->gate_cond, NULL);
    *out = b;
    ret = check_cfg(b, cfg);
    if (ret)
        return ret;          /* the caller reads the message, then frees */
    b->cfg = *cfg;
    snprintf(b->socket_path, sizeof(b->socket_path), "%s", cfg->socket_path);
    b->cfg.socket_path = NULL;   /* the caller's string need not outlive us */
    if (b->cfg.timeout_ns == 0)
        b->cfg.timeout_ns = 30ULL * 1000000000ULL;
    if (b->cfg.seed == 0)
        b->cfg.seed = now_ns() ^ ((uint64_t)getpid() << 32);
    b->seed_a = b->cfg.seed | 1;
    b->seed_b = b->seed_a ^ 0x5bd1e995a5a5a5a4ULL;
    b->depth = cfg->iodepth;
    b->nq = cfg->queues;
    return 0;
}

int bs_bench_connect(bs_bench *b)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct timeval tv = { .tv_sec = VU_TIMEOUT_S };

    if (b->sock >= 0)
        return fail(b, -EISCONN, "already connected");
    b->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (b->sock < 0)
        return fail(b, -errno, "cannot create a unix socket: %s", strerror(errno));
    memcpy(sa.sun_path, b->socket_path, strlen(b->socket_path));
    if (connect(b->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        close(b->sock);
        b->sock = -1;
        return fail(b, -e, "cannot connect to %s: %s", b->socket_path, strerror(e));
    }
    if (setsockopt(b->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
        setsockopt(b->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
        return fail(b, -errno, "cannot set socket timeouts: %s", strerror(errno));
    return 0;
}

/* Feature negotiation in QEMU's order; fills b->info. */
static int negotiate(struct bs_bench *b)
{
    struct bs_bench_info *in = &b->info;
    uint64_t offered, want;
    int ret;

    ret = vu_get_u64(b, VU_GET_FEATURES, &offered);
    if (ret)
        return ret;
    in->offered_features = offered;
    if (!(offered & BIT(F_VERSION_1)))
        return fail(b, -ENOTSUP, "backend does not offer VIRTIO_F_VERSION_1 "
                    "(features %#llx)", (unsigned long long)offered);
    in->max_queues = 1;
    if (offered & BIT(F_PROTOCOL_FEATURES)) {
        uint64_t poffered;
        ret = vu_get_u64(b, VU_GET_PROTOCOL_FEATURES, &poffered);
        if (ret)
            return ret;
        in->offered_protocol_features = poffered;
        want = poffered & (BIT(PF_MQ) | BIT(PF_REPLY_ACK) | BIT(PF_CONFIG));
        /* Sent before REPLY_ACK is in force: no ack asked. */
        ret = vu_send(b, VU_SET_PROTOCOL_FEATURES, &want, sizeof(want), NULL, 0, 0);
        if (ret)
            return ret;
        in->protocol_features = want;
        if (want & BIT(PF_MQ)) {
            uint64_t nq;
            ret = vu_get_u64(b, VU_GET_QUEUE_NUM, &nq);
            if (ret)
                return ret;
            if (nq < 1 || nq > 0xffff)
                return fail(b, -EPROTO, "backend reports %llu queues",
                            (unsigned long long)nq);
            in->max_queues = (uint32_t)nq;
        }
    }
    if (b->nq > in->max_queues)
        return fail(b, -EINVAL, "backend supports %u queue(s), %u requested",
                    in->max_queues, b->nq);
    if (b->nq > 1 && !(offered & BIT(F_BLK_MQ)))
        return fail(b, -EINVAL, "backend does not offer VIRTIO_BLK_F_MQ, so only 1 queue "
                    "can be used");
    ret = vu_set(b, VU_SET_OWNER, NULL, 0, NULL, 0);
    if (ret)
        return ret;

    in->blk_size = SECTOR;
    in->size_max = 0;
    if (in->protocol_features & BIT(PF_CONFIG)) {
        uint8_t req[12 + CONFIG_READ_LEN] = { 0 };
        uint8_t rep[12 + CONFIG_READ_LEN];
        uint32_t rsize = sizeof(rep), off, len;
        uint32_t hdr[3] = { 0, CONFIG_READ_LEN, 0 };
        uint64_t sectors;
        memcpy(req, hdr, sizeof(hdr));
        ret = vu_send(b, VU_GET_CONFIG, req, sizeof(req), NULL, 0, 0);
        if (ret)
            return ret;
        ret = vu_recv_reply(b, VU_GET_CONFIG, rep, &rsize);
        if (ret)
            return ret;
        if (rsize == 0 || rsize == 12)
            return fail(b, -EIO, "backend refused GET_CONFIG for %u bytes", CONFIG_READ_LEN);
        memcpy(&off, rep, 4);
        memcpy(&len, rep + 4, 4);
        if (rsize != sizeof(rep) || off != 0 || len != CONFIG_READ_LEN)
            return fail(b, -EPROTO, "backend's GET_CONFIG reply is %u bytes for offset %u "
                        "size %u, expected %zu bytes for offset 0 size %u",
                        rsize, off, len, sizeof(rep), CONFIG_READ_LEN);
        memcpy(&sectors, rep + 12, 8);
        if (sectors > UINT64_MAX / SECTOR)
            return fail(b, -EPROTO, "backend reports an absurd capacity of %llu sectors",
                        (unsigned long long)sectors);
        in->capacity = sectors * SECTOR;
        if (offered & BIT(F_BLK_SIZE_MAX))
            memcpy(&in->size_max, rep + 12 + 8, 4);
        if (offered & BIT(F_BLK_BLK_SIZE)) {
            uint32_t bsz;
            memcpy(&bsz, rep + 12 + 20, 4);
            if (bsz >= SECTOR && bsz <= (1u << 16) && is_pow2(bsz))
                in->blk_size = bsz;
        }
        if (offered & BIT(F_BLK_MQ)) {
            uint16_t nq;
            memcpy(&nq, rep + 12 + 34, 2);
            if (nq >= 1 && nq < in->max_queues)
                in->max_queues = nq;
            if (b->nq > in->max_queues)
                return fail(b, -EINVAL, "device has %u queue(s), %u requested",
                            in->max_queues, b->nq);
        }
    }

    if ((offered & BIT(F_BLK_RO)) && rw_writes(b->cfg.rw))
        return fail(b, -EROFS, "device is read-only: a write workload cannot run");
    if ((offered & BIT(F_BLK_RO)) && b->cfg.verify)
        return fail(b, -EROFS, "device is read-only: --verify needs to write");
    if (b->cfg.indirect && !(offered & BIT(F_RING_INDIRECT)))
        return fail(b, -EINVAL, "backend does not offer indirect descriptors (--indirect)");
    if (in->size_max && b->cfg.bs > in->size_max)
        return fail(b, -EINVAL, "block size %u exceeds the device's segment size limit %u",
                    b->cfg.bs, in->size_max);
    if (b->cfg.bs % in->blk_size)
        return fail(b, -EINVAL, "block size %u is not a multiple of the device's logical "
                    "block size %u", b->cfg.bs, in->blk_size);

    want = BIT(F_VERSION_1) | (offered & (BIT(F_RING_EVENT_IDX) | BIT(F_PROTOCOL_FEATURES) |
                                          BIT(F_BLK_MQ) | BIT(F_BLK_RO)));
    if (b->cfg.indirect)
        want |= BIT(F_RING_INDIRECT);
    ret = vu_set_u64(b, VU_SET_FEATURES, want);
    if (ret)
        return ret;
    in->features = want;
    in->event_idx = !!(want & BIT(F_RING_EVENT_IDX));
    in->indirect = !!(want & BIT(F_RING_INDIRECT));
    in->reply_ack = !!(in->protocol_features & BIT(PF_REPLY_ACK));

    if (in->capacity == 0 && !(in->protocol_features & BIT(PF_CONFIG))) {
        if (!b->cfg.size)
            return fail(b, -EINVAL, "backend does not offer the CONFIG protocol feature: "
                        "give the device size with --size");
        in->capacity = b->cfg.size;
    }
    if (b->cfg.size > in->capacity)
        return fail(b, -EINVAL, "size %llu exceeds the device capacity %llu",
                    (unsigned long long)b->cfg.size, (unsigned long long)in->capacity);
    if (!b->cfg.size)
        b->cfg.size = in->capacity;
    b->nblocks = b->cfg.size / b->cfg.bs;
    if (b->nblocks == 0)
        return fail(b, -EINVAL, "the device (%llu bytes) is smaller than one block",
                    (unsigned long long)in->capacity);
    return 0;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

/* Lay out every queue's rings, request headers and buffers in one memfd. */
static int setup_memory(struct bs_bench *b)
{
    uint32_t need = b->cfg.indirect ? b->depth : 3 * b->depth;
    uint32_t num = 128;
    uint64_t off = 0;

    while (num < need)
        num <<= 1;
    if (num > MAX_RING)
        return fail(b, -EINVAL, "iodepth %u needs a ring larger than %u", b->depth, MAX_RING);
    b->info.queue_size = num;

    /* Per queue: desc table, avail ring, used ring (each page aligned),
     * then per slot a 64-byte header/status line, a 3-entry indirect table
     * and a page-aligned data buffer (O_DIRECT-friendly). */
    uint64_t ring_bytes = align_up(16ULL * num, PAGE) + align_up(6 + 2ULL * num, PAGE) +
                          align_up(6 + 8ULL * num, PAGE);
    uint64_t slot_bytes = align_up((uint64_t)b->depth * (META_STRIDE + 64), PAGE) +
                          (uint64_t)b->depth * align_up(b->cfg.bs, PAGE);
    b->mem_size = (ring_bytes + slot_bytes) * b->nq;
    if (b->mem_size > MAX_MEM)
        return fail(b, -E2BIG, "queues x iodepth x block size needs %llu MiB of buffers; "
                    "at most %llu MiB", (unsigned long long)(b->mem_size >> 20),
                    (unsigned long long)(MAX_MEM >> 20));

    b->memfd = memfd_create("blkserve-bench", MFD_CLOEXEC);
    if (b->memfd < 0)
        return fail(b, -errno, "memfd_create failed: %s", strerror(errno));
    if (ftruncate(b->memfd, (off_t)b->mem_size) < 0)
        return fail(b, -errno, "sizing the guest memory memfd failed: %s", strerror(errno));
    void *m = mmap(NULL, b->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   b->memfd, 0);
    if (m == MAP_FAILED)
        return fail(b, -errno, "mapping %llu MiB of guest memory failed: %s",
                    (unsigned long long)(b->mem_size >> 20), strerror(errno));
    b->mem = m;

    b->q = calloc(b->nq, sizeof(*b->q));
    if (!b->q)
        return fail(b, -ENOMEM, "out of memory");
    for (uint32_t i = 0; i < b->nq; i++) {
        struct bq *q = &b->q[i];
        q->b = b;
        q->index = i;
        q->num = num;
        q->mask = (uint16_t)(num - 1);
        q->kick_fd = -1;
        q->call_fd = -1;
        q->desc_off = off;
        off += align_up(16ULL * num, PAGE);
        q->avail_off = off;
        off += align_up(6 + 2ULL * num, PAGE);
        q->used_off = off;
        off += align_up(6 + 8ULL * num, PAGE);
        q->desc = (struct vdesc *)(b->mem + q->desc_off);
        q->avail = (struct vavail *)(b->mem + q->avail_off);
        q->used = (struct vused *)(b->mem + q->used_off);
        q->used_event = &q->avail->ring[num];
        q->avail_event = (uint16_t *)&q->used->ring[num];

        uint64_t meta_off = off;
        uint64_t ind_off = meta_off + (uint64_t)b->depth * META_STRIDE;
        off += align_up((uint64_t)b->depth * (META_STRIDE + 64), PAGE);
        q->slots = calloc(b->depth, sizeof(*q->slots));
        q->free_list = calloc(b->depth, sizeof(*q->free_list));
        if (!q->slots || !q->free_list)
            return fail(b, -ENOMEM, "out of memory");
        for (uint32_t s = 0; s < b->depth; s++) {
            struct slot *sl = &q->slots[s];
            uint64_t m_gpa = meta_off + (uint64_t)s * META_STRIDE;
            uint64_t d_gpa = off;
            off += align_up(b->cfg.bs, PAGE);
            sl->meta = b->mem + m_gpa;
            sl->data = b->mem + d_gpa;
            if (b->cfg.indirect) {
                uint64_t t_gpa = ind_off + (uint64_t)s * 64;
                sl->chain = (struct vdesc *)(b->mem + t_gpa);
                sl->head = (uint16_t)s;
                q->desc[s] = (struct vdesc){ .addr = t_gpa, .len = 3 * sizeof(struct vdesc),
                                             .flags = VRING_DESC_F_INDIRECT };
                sl->chain[0] = (struct vdesc){ m_gpa, 16, VRING_DESC_F_NEXT, 1 };
                sl->chain[1] = (struct vdesc){ d_gpa, b->cfg.bs, VRING_DESC_F_NEXT, 2 };
                sl->chain[2] = (struct vdesc){ m_gpa + 16, 1, VRING_DESC_F_WRITE, 0 };
            } else {
                uint16_t h = (uint16_t)(3 * s);
                sl->chain = &q->desc[h];
                sl->head = h;
                sl->chain[0] = (struct vdesc){ m_gpa, 16, VRING_DESC_F_NEXT, (uint16_t)(h + 1) };
                sl->chain[1] = (struct vdesc){ d_gpa, b->cfg.bs, VRING_DESC_F_NEXT,
                                               (uint16_t)(h + 2) };
                sl->chain[2] = (struct vdesc){ m_gpa + 16, 1, VRING_DESC_F_WRITE, 0 };
            }
            q->free_list[s] = s;
        }
        q->nfree = b->depth;
        q->st.first_bad_offset = -1;
        q->rng = b->cfg.seed ^ (0x9e3779b97f4a7c15ULL * (i + 1));
        q->share_begin = b->nblocks * i / b->nq;
        q->share_end = b->nblocks * (i + 1) / b->nq;
    }
    if (off != b->mem_size)
        return fail(b, -EFAULT, "internal error: memory layout mismatch");

    if (b->cfg.verify && rw_writes(b->cfg.rw)) {
        b->written = calloc(b->nblocks / 8 + 1, 1);
        b->busy = calloc(b->nblocks, 1);
        if (!b->written || !b->busy)
            return fail(b, -ENOMEM, "out of memory for the verify bitmaps");
    }
    b->writes_in_run = rw_writes(b->cfg.rw);
    return 0;
}

static int setup_vrings(struct bs_bench *b)
{
    struct {
        uint32_t nregions, padding;
        uint64_t gpa, size, uva, mmap_offset;
    } mt = { 1, 0, 0, b->mem_size, (uint64_t)(uintptr_t)b->mem, 0 };
    int ret = vu_set(b, VU_SET_MEM_TABLE, &mt, sizeof(mt), &b->memfd, 1);
    if (ret)
        return ret;

    for (uint32_t i = 0; i < b->nq; i++) {
        struct bq *q = &b->q[i];
        struct {
            uint32_t index, flags;
            uint64_t desc, used, avail, log;
        } addr = {
            i, 0,
            (uint64_t)(uintptr_t)q->desc, (uint64_t)(uintptr_t)q->used,
            (uint64_t)(uintptr_t)q->avail, 0,
        };
        uint64_t v = i;

        q->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (q->kick_fd < 0 || q->call_fd < 0)
            return fail(b, -errno, "eventfd failed: %s", strerror(errno));
        if (!b->info.event_idx)
            q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;   /* polling first */
        if ((ret = vu_set_state(b, VU_SET_VRING_NUM, i, q->num)) ||
            (ret = vu_set_state(b, VU_SET_VRING_BASE, i, 0)) ||
            (ret = vu_set(b, VU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0)) ||
            (ret = vu_set(b, VU_SET_VRING_KICK, &v, sizeof(v), &q->kick_fd, 1)) ||
            (ret = vu_set(b, VU_SET_VRING_CALL, &v, sizeof(v), &q->call_fd, 1)))
            return ret;
        if (b->info.features & BIT(F_PROTOCOL_FEATURES)) {
            ret = vu_set_state(b, VU_SET_VRING_ENABLE, i, 1);
            if (ret)
                return ret;
        }
    }
    return 0;
}

int bs_bench_setup(bs_bench *b)
{
    int ret;

    if (b->sock < 0)
        return fail(b, -ENOTCONN, "not connected");
    if (b->set_up)
        return fail(b, -EALREADY, "already set up");
    ret = negotiate(b);
    if (!ret)
        ret = setup_memory(b);
    if (!ret)
        ret = setup_vrings(b);
    if (!ret)
        b->set_up = 1;
    return ret;
}

int bs_bench_get_info(bs_bench *b, struct bs_bench_info *out)
{
    *out = b->info;
    out->size = b->cfg.size;
    out->seed = b->cfg.seed;
    return 0;
}

/* ---- data pattern (--verify) ---- */

/* Every 512-byte sector holds its own LBA, the pass's seed and 62 words
 * derived from both, so a misplaced, stale, torn or zeroed sector shows. */
static inline uint64_t pat_word(uint64_t lba, uint64_t seed, unsigned k)
{
    uint64_t x = (lba + k) * 0x9e3779b97f4a7c15ULL ^ seed;
    x ^= x >> 31;
    return x * 0xbf58476d1ce4e5b9ULL;
}

static void pat_fill(uint8_t *buf, uint64_t offset, uint32_t len, uint64_t seed)
{
    for (uint32_t s = 0; s < len / SECTOR; s++) {
        uint64_t *w = (uint64_t *)(void *)(buf + (size_t)s * SECTOR);
        uint64_t lba = offset / SECTOR + s;
        w[0] = lba;
        w[1] = seed;
        for (unsigned k = 2; k < SECTOR / 8; k++)
            w[k] = pat_word(lba, seed, k);
    }
}

/* 0 if every sector carries the pattern of seed, else the byte offset + 1
 * of the first bad sector. */
static uint64_t pat_check(const uint8_t *buf, uint64_t offset, uint32_t len, uint64_t seed)
{
    for (uint32_t s = 0; s < len / SECTOR; s++) {
        const uint64_t *w = (const uint64_t *)(const void *)(buf + (size_t)s * SECTOR);
        uint64_t lba = offset / SECTOR + s;
        int ok = w[0] == lba && w[1] == seed;
        for (unsigned k = 2; ok && k < SECTOR / 8; k++)
            ok = w[k] == pat_word(lba, seed, k);
        if (!ok)
            return lba * SECTOR + 1;
    }
    return 0;
}

/* ---- histogram ---- */

static inline unsigned hist_bucket(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    if (e >= HIST_MAX_EXP)
        return HIST_N - 1;
    unsigned m = (unsigned)(v >> (e - HIST_SUB_BITS));   /* HIST_SUB..2*HIST_SUB-1 */
    return HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + (m - HIST_SUB);
}

/* Midpoint of a bucket (exact for the first HIST_SUB). */
static uint64_t hist_value(unsigned idx)
{
    if (idx < HIST_SUB)
        return idx;
    unsigned e = (idx - HIST_SUB) / HIST_SUB + HIST_SUB_BITS;
    uint64_t m = (idx - HIST_SUB) % HIST_SUB + HIST_SUB;
    uint64_t width = 1ULL << (e - HIST_SUB_BITS);
    return m * width + width / 2;
}

static uint64_t hist_percentile(const uint64_t *h, uint64_t total, double p)
{
    uint64_t want, seen = 0;

    if (total == 0)
        return 0;
    want = (uint64_t)(p * (double)total + 0.999999);
    if (want < 1)
        want = 1;
    for (unsigned i = 0; i < HIST_N; i++) {
        seen += h[i];
        if (seen >= want)
            return hist_value(i);
    }
    return hist_value(HIST_N - 1);
}

/* ---- the queue thread ---- */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* With --verify and writes, a block has at most one request in flight (any
 * queue), so a read never races a write of the same block: it must then see
 * exactly the last pattern written. */
static int block_trylock(struct bs_bench *b, uint64_t block)
{
    uint8_t expected = 0;
    return __atomic_compare_exchange_n(&b->busy[block], &expected, 1, 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static void block_unlock(struct bs_bench *b, uint64_t block)
{
    __atomic_store_n(&b->busy[block], 0, __ATOMIC_RELEASE);
}

static int pick_op(struct bq *q, enum phase ph, int *is_read, uint64_t *block);

/* Pick the next request of a phase: 0 and (*is_read, *block); 1 when the
 * phase has nothing more to issue; 2 when nothing can be issued right now
 * (every block tried is busy with another request). */
static int next_op(struct bq *q, enum phase ph, int *is_read, uint64_t *block)
{
    struct bs_bench *b = q->b;

    if (ph != PH_RUN || !b->busy)
        return pick_op(q, ph, is_read, block);
    for (int tries = 0; tries < 16; tries++) {
        int ret = pick_op(q, ph, is_read, block);
        if (ret || block_trylock(b, *block))
            return ret;
    }
    return 2;
}

static int pick_op(struct bq *q, enum phase ph, int *is_read, uint64_t *block)
{
    struct bs_bench *b = q->b;

    switch (ph) {
    case PH_PREFILL:
    case PH_VERIFY:
        if (q->seq_next >= q->share_end)
            return 1;
        *is_read = ph == PH_VERIFY;
        *block = q->seq_next++;
        return 0;
    case PH_RUN:
    default:
        switch (b->cfg.rw) {
        case BS_BENCH_READ:
        case BS_BENCH_WRITE:
            if (q->seq_next >= b->nblocks)
                q->seq_next = 0;
            *block = q->seq_next++;
            *is_read = b->cfg.rw == BS_BENCH_READ;
            return 0;
        case BS_BENCH_RANDREAD:
            *is_read = 1;
            break;
        case BS_BENCH_RANDWRITE:
            *is_read = 0;
            break;
        default:
            *is_read = (rng_next(&q->rng) % 100) < b->cfg.rwmix_read;
            break;
        }
        *block = rng_next(&q->rng) % b->nblocks;
        return 0;
    }
}

static void prepare(struct bq *q, struct slot *s, enum phase ph, int is_read, uint64_t block)
{
    struct bs_bench *b = q->b;
    struct blk_hdr h = {
        .type = is_read ? BLK_T_IN : BLK_T_OUT,
        .sector = block * b->cfg.bs / SECTOR,
    };

    s->offset = block * b->cfg.bs;
    s->is_read = (uint8_t)is_read;
    memcpy(s->meta, &h, sizeof(h));
    s->meta[16] = STATUS_UNSET;   /* a backend that never writes it is caught */
    s->chain[1].flags = (uint16_t)(VRING_DESC_F_NEXT | (is_read ? VRING_DESC_F_WRITE : 0));
    if (b->cfg.verify) {
        if (is_read)
            memset(s->data, 0, b->cfg.bs);   /* stale data must not pass */
        else
            pat_fill(s->data, s->offset, b->cfg.bs, ph == PH_RUN ? b->seed_b : b->seed_a);
    }
}

static void note_bad(struct bq *q, uint64_t offset)
{
    if (q->st.first_bad_offset < 0)
        q->st.first_bad_offset = (int64_t)offset;
}

static void complete(struct bq *q, struct slot *s, enum phase ph, uint64_t t)
{
    struct bs_bench *b = q->b;
    uint8_t status = __atomic_load_n(&s->meta[16], __ATOMIC_RELAXED);
    uint64_t block = s->offset / b->cfg.bs;

    if (status != 0) {
        q->st.io_errors++;
        q->st.errors++;
        note_bad(q, s->offset);
    } else if (b->cfg.verify && s->is_read) {
        /* The block's last write completed before this read was issued
         * (block lock, or the phases' barrier): exactly one pattern fits. */
        uint64_t seed = b->seed_a;
        if (b->written && (__atomic_load_n(&b->written[block / 8], __ATOMIC_ACQUIRE) &
                           (1u << (block % 8))))
            seed = b->seed_b;
        uint64_t bad = pat_check(s->data, s->offset, b->cfg.bs, seed);
        if (bad) {
            q->st.verify_errors++;
            q->st.errors++;
            note_bad(q, bad - 1);
        }
    } else if (!s->is_read && b->written && ph == PH_RUN) {
        __atomic_fetch_or(&b->written[block / 8], (uint8_t)(1u << (block % 8)),
                          __ATOMIC_RELEASE);
    }
    if (ph == PH_RUN && b->busy)
        block_unlock(b, block);
    if (ph == PH_RUN)
        q->st.ios_all++;
    if (ph == PH_RUN && t >= q->t_count_from && t <= q->t_count_to) {
        uint64_t lat = t - s->t_submit;
        q->st.ios++;
        if (s->is_read)
            q->st.ios_read++;
        else
            q->st.ios_write++;
        q->st.bytes += b->cfg.bs;
        q->lat_sum += lat;
        if (lat < q->st.lat_min_ns || q->st.ios == 1)
            q->st.lat_min_ns = lat;
        if (lat > q->st.lat_max_ns)
            q->st.lat_max_ns = lat;
        q->hist[hist_bucket(lat)]++;
    }
    s->inflight = 0;
    q->free_list[q->nfree++] = (uint32_t)(s - q->slots);
}

/* Consume new used entries.  Returns how many, or -EPROTO (with a message)
 * if the backend published something that is not a request in flight. */
static int reap(struct bq *q, enum phase ph)
{
    struct bs_bench *b = q->b;
    uint16_t used_idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(used_idx - q->last_used);
    uint32_t inflight = b->depth - q->nfree;

    if (n == 0)
        return 0;
    if (n > inflight)
        return fail(b, -EPROTO, "queue %u: backend moved the used index by %u with only "
                    "%u request(s) in flight", q->index, n, inflight);
    uint64_t t = now_ns();
    for (uint16_t i = 0; i < n; i++) {
        struct vused_elem e;
        memcpy(&e, &q->used->ring[(uint16_t)(q->last_used + i) & q->mask], sizeof(e));
        uint32_t si = b->cfg.indirect ? e.id : e.id / 3;
        if (e.id >= q->num || (!b->cfg.indirect && e.id % 3) || si >= b->depth ||
            !q->slots[si].inflight)
            return fail(b, -EPROTO, "queue %u: backend completed descriptor %u, which is "
                        "not the head of a request in flight", q->index, e.id);
        complete(q, &q->slots[si], ph, t);
    }
    q->last_used = used_idx;
    return n;
}

static int kick(struct bq *q)
{
    uint64_t one = 1;
    q->st.kicks++;
    if (write(q->kick_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return fail(q->b, -errno, "queue %u: kicking the backend failed: %s",
                    q->index, strerror(errno));
    return 0;
}

/* Whether the backend wants a kick for entries old..avail_idx (call after a
 * full barrier that follows the avail->idx store). */
static int need_kick(struct bq *q, uint16_t old)
{
    if (q->b->info.event_idx) {
        uint16_t ev = __atomic_load_n(q->avail_event, __ATOMIC_RELAXED);
        return (uint16_t)(q->avail_idx - ev - 1) < (uint16_t)(q->avail_idx - old);
    }
    return !(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
}

/* Nothing completed: spin on the used ring for poll_ns, then arm the
 * notification and sleep on the call eventfd for at most RESCUE_MS. */
static int wait_used(struct bq *q, uint64_t *last_progress)
{
    struct bs_bench *b = q->b;
    uint16_t *used_idx = &q->used->idx;

    if (b->cfg.poll_ns) {
        uint64_t until = now_ns() + b->cfg.poll_ns;
        for (unsigned i = 1;; i++) {
            if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) != q->last_used)
                return 0;
            cpu_relax();
            if ((i & 63) == 0) {
                if (now_ns() >= until)
                    break;
                /* Queue threads may share the frontend's core: let a woken
                 * sibling run instead of spinning over it. */
                if (b->nq > 1)
                    sched_yield();
            }
        }
    }

    if (b->info.event_idx)
        __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&q->avail->flags, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == q->last_used) {
        struct pollfd p[2] = {
            { .fd = q->call_fd, .events = POLLIN },
            { .fd = b->sock, .events = POLLRDHUP },
        };
        int r = poll(p, 2, SLEEP_MS);
        q->st.sleeps++;
        if (r < 0 && errno != EINTR)
            return fail(b, -errno, "queue %u: poll failed: %s", q->index, strerror(errno));
        if (r > 0 && (p[0].revents & POLLIN)) {
            uint64_t v;
            if (read(q->call_fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
                q->st.calls++;
        }
        if (r > 0 && (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR)))
            return fail(b, -ECONNRESET, "backend closed the connection during the run");
        if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == q->last_used) {
            /* no progress, whatever woke us (a backend signalling without
             * publishing anything must not keep us here forever) */
            uint64_t t = now_ns();
            if (t - *last_progress > b->cfg.timeout_ns)
                return fail(b, -ETIMEDOUT, "queue %u: no request completed for %.1f s "
                            "(%u in flight)", q->index, (double)(t - *last_progress) / 1e9,
                            b->depth - q->nfree);
            /* A kick may have been lost (a backend that publishes
             * avail_event without a full barrier before re-reading
             * avail->idx can miss one): kick again if it has not consumed
             * everything we published.  Rare with a healthy backend; a
             * busy one merely gets an extra wake-up. */
            uint64_t rescue = RESCUE_MS * 1000000ULL;
            if (t - *last_progress >= rescue && t - q->last_rescue >= rescue &&
                (!b->info.event_idx ||
                 __atomic_load_n(q->avail_event, __ATOMIC_RELAXED) != q->avail_idx)) {
                q->last_rescue = t;
                q->st.rescue_kicks++;
                int ret = kick(q);
                if (ret)
                    return ret;
            }
        }
    }
    if (!b->info.event_idx)
        __atomic_store_n(&q->avail->flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
    return 0;
}

/* Run one phase on a queue: keep depth requests in flight until the phase
 * has nothing more to issue (or the run's deadline), then drain. */
static int run_phase(struct bq *q, enum phase ph, uint64_t deadline)
{
    struct bs_bench *b = q->b;
    uint64_t now = now_ns();
    uint64_t last_progress = now;
    int exhausted = 0;

    q->seq_next = q->share_begin;
    for (;;) {
        if (aborted(b))
            return -ECANCELED;
        if (!exhausted && (stopped(b) || (ph == PH_RUN && now >= deadline))) {
            exhausted = 1;
            if (ph == PH_RUN)
                q->t_count_to = now < deadline ? now : deadline;
        }
        uint16_t old = q->avail_idx;
        while (!exhausted && q->nfree) {
            int is_read, op;
            uint64_t block;
            op = next_op(q, ph, &is_read, &block);
            if (op == 2)
                break;          /* retry after some completions */
            if (op) {
                exhausted = 1;
                break;
            }
            struct slot *s = &q->slots[q->free_list[--q->nfree]];
            prepare(q, s, ph, is_read, block);
            s->inflight = 1;
            s->t_submit = now;
            q->avail->ring[q->avail_idx & q->mask] = s->head;
            q->avail_idx++;
        }
        if (q->avail_idx != old) {
            __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (need_kick(q, old)) {
                int ret = kick(q);
                if (ret)
                    return ret;
            }
        }
        if (exhausted && q->nfree == b->depth)
            return 0;
        int n = reap(q, ph);
        if (n < 0)
            return n;
        if (n == 0) {
            uint64_t w0 = now_ns();
            int ret = wait_used(q, &last_progress);
            if (ph == PH_RUN)
                q->st.wait_ns += now_ns() - w0;
            if (ret)
                return ret;
            n = reap(q, ph);
            if (n < 0)
                return n;
        }
        now = now_ns();
        if (n > 0)
            last_progress = now;
    }
}

static void *queue_thread(void *arg)
{
    struct bq *q = arg;
    struct bs_bench *b = q->b;
    uint64_t ramp = b->cfg.ramp_ns, runtime = b->cfg.runtime_ns;
    int gate;

    pthread_mutex_lock(&b->gate_lock);
    while (!(gate = b->gate))
        pthread_cond_wait(&b->gate_cond, &b->gate_lock);
    pthread_mutex_unlock(&b->gate_lock);
    if (gate < 0)
        return NULL;   /* no barrier: the run never started */

    for (int ph = 0; ph < PH_COUNT; ph++) {
        /* prefill and the final read-back pass exist only with --verify;
         * the read-back only when the run phase wrote */
        int active = ph == PH_RUN ||
                     (ph == PH_PREFILL && b->cfg.verify) ||
                     (ph == PH_VERIFY && b->cfg.verify && b->writes_in_run);
        if (active && !aborted(b) && !stopped(b)) {
            if (ph == PH_RUN) {
                uint64_t t0 = now_ns();
                q->t_count_from = t0 + ramp;
                q->t_count_to = t0 + ramp + runtime;
                run_phase(q, PH_RUN, t0 + ramp + runtime);
            } else {
                run_phase(q, (enum phase)ph, UINT64_MAX);
            }
        }
        /* every thread passes every barrier, even after an abort */
        pthread_barrier_wait(&b->barrier);
    }
    return NULL;
}

/* Stop the rings (GET_VRING_BASE, as QEMU does on VM stop) and hang up. */
static void teardown(struct bs_bench *b)
{
    if (b->sock >= 0 && b->set_up && !aborted(b)) {
        for (uint32_t i = 0; i < b->nq; i++) {
            uint32_t st[2] = { i, 0 }, rep[2];
            uint32_t size = sizeof(rep);
            if (vu_send(b, VU_GET_VRING_BASE, st, sizeof(st), NULL, 0, 0) ||
                vu_recv_reply(b, VU_GET_VRING_BASE, rep, &size))
                break;
            if (size != sizeof(rep) || rep[0] != i) {
                fail(b, -EPROTO, "backend's GET_VRING_BASE reply for queue %u is malformed", i);
                break;
            }
        }
    }
    if (b->sock >= 0) {
        close(b->sock);
        b->sock = -1;
    }
}

int bs_bench_run(bs_bench *b)
{
    uint32_t started = 0;
    int ret = 0;

    if (!b->set_up)
        return fail(b, -ENOTCONN, "not set up");
    if (b->ran)
        return fail(b, -EALREADY, "a bench context runs once");
    b->ran = 1;
    for (; started < b->nq; started++) {
        struct bq *q = &b->q[started];
        ret = pthread_create(&q->thread, NULL, queue_thread, q);
        if (ret)
            break;
    }
    /* The threads wait at the gate until the barrier is sized for the
     * threads that actually exist; a missing one aborts the run. */
    if (started < b->nq)
        fail(b, -ret, "cannot start a queue thread: %s", strerror(ret));
    if (started > 0) {
        ret = pthread_barrier_init(&b->barrier, NULL, started);
        if (ret)
            fail(b, -ret, "pthread_barrier_init failed: %s", strerror(ret));
    }
    pthread_mutex_lock(&b->gate_lock);
    b->gate = ret ? -1 : 1;
    pthread_cond_broadcast(&b->gate_cond);
    pthread_mutex_unlock(&b->gate_lock);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(b->q[i].thread, NULL);
    if (started > 0 && !ret)
        pthread_barrier_destroy(&b->barrier);
    teardown(b);
    return __atomic_load_n(&b->abort_err, __ATOMIC_SEQ_CST);
}

void bs_bench_stop(bs_bench *b)
{
    __atomic_store_n(&b->stop, 1, __ATOMIC_SEQ_CST);
}

static void finish_stats(struct bs_bench_stats *st, const uint64_t *hist, uint64_t lat_sum)
{
    st->lat_mean_ns = st->ios ? lat_sum / st->ios : 0;
    st->lat_p50_ns = hist_percentile(hist, st->ios, 0.50);
    st->lat_p90_ns = hist_percentile(hist, st->ios, 0.90);
    st->lat_p99_ns = hist_percentile(hist, st->ios, 0.99);
    st->lat_p999_ns = hist_percentile(hist, st->ios, 0.999);
}

int bs_bench_get_stats(bs_bench *b, int32_t queue, struct bs_bench_stats *out)
{
    if (!b->q || queue < -1 || queue >= (int32_t)b->nq)
        return -EINVAL;
    if (queue >= 0) {
        struct bq *q = &b->q[queue];
        *out = q->st;
        out->elapsed_ns = q->t_count_to > q->t_count_from ? q->t_count_to - q->t_count_from : 0;
        finish_stats(out, q->hist, q->lat_sum);
        return 0;
    }

    uint64_t *hist = calloc(HIST_N, sizeof(*hist));
    uint64_t lat_sum = 0;
    if (!hist)
        return -ENOMEM;
    memset(out, 0, sizeof(*out));
    out->first_bad_offset = -1;
    for (uint32_t i = 0; i < b->nq; i++) {
        struct bq *q = &b->q[i];
        struct bs_bench_stats *s = &q->st;
        uint64_t el = q->t_count_to > q->t_count_from ? q->t_count_to - q->t_count_from : 0;
        if (s->ios && (out->ios == 0 || s->lat_min_ns < out->lat_min_ns))
            out->lat_min_ns = s->lat_min_ns;
        if (s->lat_max_ns > out->lat_max_ns)
            out->lat_max_ns = s->lat_max_ns;
        out->ios += s->ios;
        out->ios_read += s->ios_read;
        out->ios_write += s->ios_write;
        out->bytes += s->bytes;
        out->errors += s->errors;
        out->io_errors += s->io_errors;
        out->verify_errors += s->verify_errors;
        out->kicks += s->kicks;
        out->calls += s->calls;
        out->sleeps += s->sleeps;
        out->rescue_kicks += s->rescue_kicks;
        out->ios_all += s->ios_all;
        out->wait_ns += s->wait_ns;
        if (el > out->elapsed_ns)
            out->elapsed_ns = el;
        if (s->first_bad_offset >= 0 &&
            (out->first_bad_offset < 0 || s->first_bad_offset < out->first_bad_offset))
            out->first_bad_offset = s->first_bad_offset;
        lat_sum += q->lat_sum;
        for (unsigned k = 0; k < HIST_N; k++)
            hist[k] += q->hist[k];
    }
    finish_stats(out, hist, lat_sum);
    free(hist);
    return 0;
}

int bs_bench_error(bs_bench *b, char *buf, uint32_t len)
{
    if (!len)
        return -EINVAL;
    pthread_mutex_lock(&b->err_lock);
    snprintf(buf, len, "%s", b->err);
    pthread_mutex_unlock(&b->err_lock);
    return 0;
}

void bs_bench_free(bs_bench *b)
{
    if (!b)
        return;
    if (b->sock >= 0)
        close(b->sock);
    if (b->q) {
        for (uint32_t i = 0; i < b->nq; i++) {
            struct bq *q = &b->q[i];
            if (q->kick_fd >= 0)
                close(q->kick_fd);
            if (q->call_fd >= 0)
                close(q->call_fd);
            free(q->slots);
            free(q->free_list);
        }
        free(b->q);
    }
    if (b->mem)
        munmap(b->mem, b->mem_size);
    if (b->memfd >= 0)
        close(b->memfd);
    free(b->written);
    free(b->busy);
    pthread_mutex_destroy(&b->err_lock);
    pthread_mutex_destroy(&b->gate_lock);
    pthread_cond_destroy(&b->gate_cond);
    free(b);
}
