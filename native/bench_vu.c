/* blkserve bench: the vhost-user control messages the frontend sends, and
 * the checks on every reply (the backend is untrusted). */
#include "bench.h"

/* ---- errors ---- */

/* Record the first failure's message; returns err (negative errno). */
int bench_fail(struct bs_bench *b, int err, const char *fmt, ...)
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

int bench_aborted(const struct bs_bench *b)
{
    return __atomic_load_n(&b->abort_err, __ATOMIC_RELAXED) != 0;
}

int bench_stopped(const struct bs_bench *b)
{
    return __atomic_load_n(&b->stop, __ATOMIC_RELAXED) != 0;
}

uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

const char *bench_req_name(uint32_t req)
{
    switch (req) {
    case VU_GET_FEATURES: return "GET_FEATURES";
    case VU_SET_FEATURES: return "SET_FEATURES";
    case VU_SET_OWNER: return "SET_OWNER";
    case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VU_SET_LOG_BASE: return "SET_LOG_BASE";
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

int bench_vu_send(struct bs_bench *b, uint32_t req, const void *payload,
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
        return bench_fail(b, -EINVAL, "internal error: %s message too large", bench_req_name(req));
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
                return bench_fail(b, -ETIMEDOUT, "backend did not accept %s within %d s",
                            bench_req_name(req), VU_TIMEOUT_S);
            if (e == EPIPE || e == ECONNRESET)
                return bench_fail(b, -ECONNRESET, "backend closed the connection before %s "
                            "could be sent", bench_req_name(req));
            return bench_fail(b, -e, "sending %s to the backend failed: %s",
                        bench_req_name(req), strerror(e));
        }
        off += (size_t)n;
    }
    return 0;
}

/* Read exactly len bytes; any fds the backend attaches are closed (no reply
 * this frontend reads carries one). */
int bench_vu_read(struct bs_bench *b, uint32_t req, void *buf, size_t len)
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
                return bench_fail(b, -ETIMEDOUT, "backend did not answer %s within %d s",
                            bench_req_name(req), VU_TIMEOUT_S);
            if (e == ECONNRESET)
                return bench_fail(b, -ECONNRESET, "backend closed the connection instead of "
                            "answering %s", bench_req_name(req));
            return bench_fail(b, -e, "reading the reply to %s failed: %s",
                        bench_req_name(req), strerror(e));
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
            return bench_fail(b, -ECONNRESET, "backend closed the connection instead of "
                        "answering %s", bench_req_name(req));
        off += (size_t)n;
    }
    return 0;
}

/* Receive the reply to req.  *size is the buffer size on entry and the
 * payload size on return; a payload larger than the buffer is an error. */
int bench_vu_recv_reply(struct bs_bench *b, uint32_t req, void *payload, uint32_t *size)
{
    struct vu_hdr h;
    int ret = bench_vu_read(b, req, &h, sizeof(h));
    if (ret)
        return ret;
    if (h.request != req)
        return bench_fail(b, -EPROTO, "backend answered %s with message type %u",
                    bench_req_name(req), h.request);
    if ((h.flags & VU_VERSION_MASK) != VU_VERSION)
        return bench_fail(b, -EPROTO, "backend's reply to %s has protocol version %u, "
                    "expected %u", bench_req_name(req), h.flags & VU_VERSION_MASK, VU_VERSION);
    if (!(h.flags & VU_FLAG_REPLY))
        return bench_fail(b, -EPROTO, "backend's reply to %s lacks the reply flag (flags %#x)",
                    bench_req_name(req), h.flags);
    if (h.size > *size)
        return bench_fail(b, -EPROTO, "backend's reply to %s is %u bytes, at most %u expected",
                    bench_req_name(req), h.size, *size);
    ret = bench_vu_read(b, req, payload, h.size);
    if (ret)
        return ret;
    *size = h.size;
    return 0;
}

/* A request whose reply is one u64. */
int bench_vu_get_u64(struct bs_bench *b, uint32_t req, uint64_t *out)
{
    uint32_t size = sizeof(*out);
    int ret = bench_vu_send(b, req, NULL, 0, NULL, 0, 0);
    if (ret)
        return ret;
    ret = bench_vu_recv_reply(b, req, out, &size);
    if (ret)
        return ret;
    if (size != sizeof(*out))
        return bench_fail(b, -EPROTO, "backend's reply to %s is %u bytes, expected 8",
                    bench_req_name(req), size);
    return 0;
}

/* A request without a reply of its own: with REPLY_ACK it asks for the ack
 * and checks it is zero (success). */
int bench_vu_set(struct bs_bench *b, uint32_t req, const void *payload, uint32_t size,
                        const int *fds, int nfds)
{
    int ack = !!(b->info.protocol_features & BIT(PF_REPLY_ACK));
    uint64_t code = 0;
    uint32_t rsize = sizeof(code);
    int ret = bench_vu_send(b, req, payload, size, fds, nfds, ack);
    if (ret || !ack)
        return ret;
    ret = bench_vu_recv_reply(b, req, &code, &rsize);
    if (ret)
        return ret;
    if (rsize != sizeof(code))
        return bench_fail(b, -EPROTO, "backend's ack of %s is %u bytes, expected 8",
                    bench_req_name(req), rsize);
    if (code != 0)
        return bench_fail(b, -EIO, "backend rejected %s (ack code %llu)", bench_req_name(req),
                    (unsigned long long)code);
    return 0;
}

int bench_vu_set_u64(struct bs_bench *b, uint32_t req, uint64_t v)
{
    return bench_vu_set(b, req, &v, sizeof(v), NULL, 0);
}

int bench_vu_set_state(struct bs_bench *b, uint32_t req, uint32_t index, uint32_t num)
{
    uint32_t p[2] = { index, num };
    return bench_vu_set(b, req, p, sizeof(p), NULL, 0);
}
