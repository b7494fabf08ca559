/* blkserve bench: configuration checks, feature negotiation with the
 * backend, the "guest RAM" memfd and the split rings laid out in it. */
#include "bench.h"

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
        return bench_fail(b, -EINVAL, "no socket path given");
    if (strlen(c->socket_path) >= sizeof(b->socket_path))
        return bench_fail(b, -ENAMETOOLONG, "socket path is longer than %zu bytes",
                    sizeof(b->socket_path) - 1);
    if (c->rw > BS_BENCH_RANDRW)
        return bench_fail(b, -EINVAL, "unknown workload %u", c->rw);
    if (c->rwmix_read > 100)
        return bench_fail(b, -EINVAL, "read percentage %u is above 100", c->rwmix_read);
    if (c->bs < SECTOR || c->bs % SECTOR || c->bs > MAX_BS)
        return bench_fail(b, -EINVAL, "block size %u is not a multiple of 512 in 512..%u",
                    c->bs, MAX_BS);
    if (c->iodepth < 1 || c->iodepth > MAX_DEPTH)
        return bench_fail(b, -EINVAL, "iodepth %u is not in 1..%u", c->iodepth, MAX_DEPTH);
    if (!c->indirect && c->iodepth * 3 > MAX_RING)
        return bench_fail(b, -EINVAL, "iodepth %u needs %u descriptors per queue; at most %u "
                    "without indirect descriptors", c->iodepth, c->iodepth * 3, MAX_RING);
    if (c->queues < 1 || c->queues > MAX_QUEUES)
        return bench_fail(b, -EINVAL, "queue count %u is not in 1..%u", c->queues, MAX_QUEUES);
    if (c->runtime_ns == 0)
        return bench_fail(b, -EINVAL, "runtime must be positive");
    if (c->size && c->size < c->bs)
        return bench_fail(b, -EINVAL, "size %llu is smaller than the block size %u",
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
    b->logfd = -1;
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
        b->cfg.seed = bench_now_ns() ^ ((uint64_t)getpid() << 32);
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
        return bench_fail(b, -EISCONN, "already connected");
    b->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (b->sock < 0)
        return bench_fail(b, -errno, "cannot create a unix socket: %s", strerror(errno));
    memcpy(sa.sun_path, b->socket_path, strlen(b->socket_path));
    if (connect(b->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        close(b->sock);
        b->sock = -1;
        return bench_fail(b, -e, "cannot connect to %s: %s", b->socket_path, strerror(e));
    }
    if (setsockopt(b->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
        setsockopt(b->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
        return bench_fail(b, -errno, "cannot set socket timeouts: %s", strerror(errno));
    return 0;
}

/* Feature negotiation in QEMU's order; fills b->info. */
static int negotiate(struct bs_bench *b)
{
    struct bs_bench_info *in = &b->info;
    uint64_t offered, want;
    int ret;

    ret = bench_vu_get_u64(b, VU_GET_FEATURES, &offered);
    if (ret)
        return ret;
    in->offered_features = offered;
    if (!(offered & BIT(F_VERSION_1)))
        return bench_fail(b, -ENOTSUP, "backend does not offer VIRTIO_F_VERSION_1 "
                    "(features %#llx)", (unsigned long long)offered);
    in->max_queues = 1;
    if (offered & BIT(F_PROTOCOL_FEATURES)) {
        uint64_t poffered;
        ret = bench_vu_get_u64(b, VU_GET_PROTOCOL_FEATURES, &poffered);
        if (ret)
            return ret;
        in->offered_protocol_features = poffered;
        want = poffered & (BIT(PF_MQ) | BIT(PF_REPLY_ACK) | BIT(PF_CONFIG));
        if (b->cfg.dirty_log)
            want |= poffered & BIT(PF_LOG_SHMFD);
        /* Sent before REPLY_ACK is in force: no ack asked. */
        ret = bench_vu_send(b, VU_SET_PROTOCOL_FEATURES, &want, sizeof(want), NULL, 0, 0);
        if (ret)
            return ret;
        in->protocol_features = want;
        if (want & BIT(PF_MQ)) {
            uint64_t nq;
            ret = bench_vu_get_u64(b, VU_GET_QUEUE_NUM, &nq);
            if (ret)
                return ret;
            if (nq < 1 || nq > 0xffff)
                return bench_fail(b, -EPROTO, "backend reports %llu queues",
                            (unsigned long long)nq);
            in->max_queues = (uint32_t)nq;
        }
    }
    if (b->nq > in->max_queues)
        return bench_fail(b, -EINVAL, "backend supports %u queue(s), %u requested",
                    in->max_queues, b->nq);
    if (b->nq > 1 && !(offered & BIT(F_BLK_MQ)))
        return bench_fail(b, -EINVAL, "backend does not offer VIRTIO_BLK_F_MQ, so only 1 queue "
                    "can be used");
    ret = bench_vu_set(b, VU_SET_OWNER, NULL, 0, NULL, 0);
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
        ret = bench_vu_send(b, VU_GET_CONFIG, req, sizeof(req), NULL, 0, 0);
        if (ret)
            return ret;
        ret = bench_vu_recv_reply(b, VU_GET_CONFIG, rep, &rsize);
        if (ret)
            return ret;
        if (rsize == 0 || rsize == 12)
            return bench_fail(b, -EIO, "backend refused GET_CONFIG for %u bytes", CONFIG_READ_LEN);
        memcpy(&off, rep, 4);
        memcpy(&len, rep + 4, 4);
        if (rsize != sizeof(rep) || off != 0 || len != CONFIG_READ_LEN)
            return bench_fail(b, -EPROTO, "backend's GET_CONFIG reply is %u bytes for offset %u "
                        "size %u, expected %zu bytes for offset 0 size %u",
                        rsize, off, len, sizeof(rep), CONFIG_READ_LEN);
        memcpy(&sectors, rep + 12, 8);
        if (sectors > UINT64_MAX / SECTOR)
            return bench_fail(b, -EPROTO, "backend reports an absurd capacity of %llu sectors",
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
                return bench_fail(b, -EINVAL, "device has %u queue(s), %u requested",
                            in->max_queues, b->nq);
        }
    }

    if ((offered & BIT(F_BLK_RO)) && rw_writes(b->cfg.rw))
        return bench_fail(b, -EROFS, "device is read-only: a write workload cannot run");
    if ((offered & BIT(F_BLK_RO)) && b->cfg.verify)
        return bench_fail(b, -EROFS, "device is read-only: --verify needs to write");
    if (b->cfg.indirect && !(offered & BIT(F_RING_INDIRECT)))
        return bench_fail(b, -EINVAL, "backend does not offer indirect descriptors (--indirect)");
    if (in->size_max && b->cfg.bs > in->size_max)
        return bench_fail(b, -EINVAL, "block size %u exceeds the device's segment size limit %u",
                    b->cfg.bs, in->size_max);
    if (b->cfg.bs % in->blk_size)
        return bench_fail(b, -EINVAL, "block size %u is not a multiple of the device's logical "
                    "block size %u", b->cfg.bs, in->blk_size);

    want = BIT(F_VERSION_1) | (offered & (BIT(F_RING_EVENT_IDX) | BIT(F_PROTOCOL_FEATURES) |
                                          BIT(F_BLK_MQ) | BIT(F_BLK_RO)));
    if (b->cfg.indirect)
        want |= BIT(F_RING_INDIRECT);
    if (b->cfg.dirty_log) {
        if (!(offered & BIT(F_LOG_ALL)) ||
            !(in->protocol_features & BIT(PF_LOG_SHMFD)))
            return bench_fail(b, -ENOTSUP, "backend does not offer VHOST_F_LOG_ALL with "
                              "LOG_SHMFD (--dirty-log)");
        want |= BIT(F_LOG_ALL);
    }
    ret = bench_vu_set_u64(b, VU_SET_FEATURES, want);
    if (ret)
        return ret;
    in->features = want;
    in->event_idx = !!(want & BIT(F_RING_EVENT_IDX));
    in->indirect = !!(want & BIT(F_RING_INDIRECT));
    in->reply_ack = !!(in->protocol_features & BIT(PF_REPLY_ACK));
    in->dirty_log = !!(want & BIT(F_LOG_ALL));

    if (in->capacity == 0 && !(in->protocol_features & BIT(PF_CONFIG))) {
        if (!b->cfg.size)
            return bench_fail(b, -EINVAL, "backend does not offer the CONFIG protocol feature: "
                        "give the device size with --size");
        in->capacity = b->cfg.size;
    }
    if (b->cfg.size > in->capacity)
        return bench_fail(b, -EINVAL, "size %llu exceeds the device capacity %llu",
                    (unsigned long long)b->cfg.size, (unsigned long long)in->capacity);
    if (!b->cfg.size)
        b->cfg.size = in->capacity;
    b->nblocks = b->cfg.size / b->cfg.bs;
    if (b->nblocks == 0)
        return bench_fail(b, -EINVAL, "the device (%llu bytes) is smaller than one block",
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
        return bench_fail(b, -EINVAL, "iodepth %u needs a ring larger than %u", b->depth, MAX_RING);
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
        return bench_fail(b, -E2BIG, "queues x iodepth x block size needs %llu MiB of buffers; "
                    "at most %llu MiB", (unsigned long long)(b->mem_size >> 20),
                    (unsigned long long)(MAX_MEM >> 20));

    b->memfd = memfd_create("blkserve-bench", MFD_CLOEXEC);
    if (b->memfd < 0)
        return bench_fail(b, -errno, "memfd_create failed: %s", strerror(errno));
    if (ftruncate(b->memfd, (off_t)b->mem_size) < 0)
        return bench_fail(b, -errno, "sizing the guest memory memfd failed: %s", strerror(errno));
    void *m = mmap(NULL, b->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   b->memfd, 0);
    if (m == MAP_FAILED)
        return bench_fail(b, -errno, "mapping %llu MiB of guest memory failed: %s",
                    (unsigned long long)(b->mem_size >> 20), strerror(errno));
    b->mem = m;

    b->q = calloc(b->nq, sizeof(*b->q));
    if (!b->q)
        return bench_fail(b, -ENOMEM, "out of memory");
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
            return bench_fail(b, -ENOMEM, "out of memory");
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
        return bench_fail(b, -EFAULT, "internal error: memory layout mismatch");

    if (b->cfg.verify && rw_writes(b->cfg.rw)) {
        b->written = calloc(b->nblocks / 8 + 1, 1);
        b->busy = calloc(b->nblocks, 1);
        if (!b->written || !b->busy)
            return bench_fail(b, -ENOMEM, "out of memory for the verify bitmaps");
    }
    b->writes_in_run = rw_writes(b->cfg.rw);
    return 0;
}

/* --dirty-log: a log of one bit per 4 KiB page of guest memory, handed over
 * as QEMU does when a migration starts (SET_LOG_BASE, then LOG_ALL in the
 * features and the log flag on every ring); the backend marks every page it
 * writes, which is what this measures.  Nobody reads or clears the log. */
static int setup_log(struct bs_bench *b)
{
    struct { uint64_t size, offset; } lb;
    uint64_t reply = 0;
    uint32_t rsize = sizeof(reply);
    int ret;

    b->log_size = align_up((b->mem_size / PAGE + 7) / 8, 8);
    b->logfd = memfd_create("blkserve-bench-log", MFD_CLOEXEC);
    if (b->logfd < 0)
        return bench_fail(b, -errno, "memfd_create (dirty log) failed: %s", strerror(errno));
    if (ftruncate(b->logfd, (off_t)b->log_size) < 0)
        return bench_fail(b, -errno, "sizing the dirty log failed: %s", strerror(errno));
    b->log = mmap(NULL, b->log_size, PROT_READ | PROT_WRITE, MAP_SHARED, b->logfd, 0);
    if (b->log == MAP_FAILED) {
        b->log = NULL;
        return bench_fail(b, -errno, "mapping the dirty log failed: %s", strerror(errno));
    }
    lb.size = b->log_size;
    lb.offset = 0;
    /* The backend always answers SET_LOG_BASE, REPLY_ACK or not; as QEMU,
     * only its size is looked at (libvhost-user echoes the log size back). */
    ret = bench_vu_send(b, VU_SET_LOG_BASE, &lb, sizeof(lb), &b->logfd, 1, 0);
    if (!ret)
        ret = bench_vu_recv_reply(b, VU_SET_LOG_BASE, &reply, &rsize);
    if (!ret && rsize != sizeof(reply))
        ret = bench_fail(b, -EPROTO, "the backend's reply to SET_LOG_BASE is %u bytes, "
                         "not 8", rsize);
    return ret;
}

static int setup_vrings(struct bs_bench *b)
{
    struct {
        uint32_t nregions, padding;
        uint64_t gpa, size, uva, mmap_offset;
    } mt = { 1, 0, 0, b->mem_size, (uint64_t)(uintptr_t)b->mem, 0 };
    int ret = bench_vu_set(b, VU_SET_MEM_TABLE, &mt, sizeof(mt), &b->memfd, 1);
    if (ret)
        return ret;
    if (b->info.dirty_log && (ret = setup_log(b)))
        return ret;

    for (uint32_t i = 0; i < b->nq; i++) {
        struct bq *q = &b->q[i];
        struct {
            uint32_t index, flags;
            uint64_t desc, used, avail, log;
        } addr = {
            i, b->info.dirty_log ? VRING_F_LOG : 0,
            (uint64_t)(uintptr_t)q->desc, (uint64_t)(uintptr_t)q->used,
            (uint64_t)(uintptr_t)q->avail,
            b->info.dirty_log ? (uint64_t)((uint8_t *)q->used - b->mem) : 0,
        };
        uint64_t v = i;

        q->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (q->kick_fd < 0 || q->call_fd < 0)
            return bench_fail(b, -errno, "eventfd failed: %s", strerror(errno));
        if (!b->info.event_idx)
            q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;   /* polling first */
        if ((ret = bench_vu_set_state(b, VU_SET_VRING_NUM, i, q->num)) ||
            (ret = bench_vu_set_state(b, VU_SET_VRING_BASE, i, 0)) ||
            (ret = bench_vu_set(b, VU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0)) ||
            (ret = bench_vu_set(b, VU_SET_VRING_KICK, &v, sizeof(v), &q->kick_fd, 1)) ||
            (ret = bench_vu_set(b, VU_SET_VRING_CALL, &v, sizeof(v), &q->call_fd, 1)))
            return ret;
        if (b->info.features & BIT(F_PROTOCOL_FEATURES)) {
            ret = bench_vu_set_state(b, VU_SET_VRING_ENABLE, i, 1);
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
        return bench_fail(b, -ENOTCONN, "not connected");
    if (b->set_up)
        return bench_fail(b, -EALREADY, "already set up");
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
    out->dirty_pages = 0;
    for (uint64_t i = 0; b->log && i < b->log_size; i++)
        out->dirty_pages += (uint64_t)__builtin_popcount(__atomic_load_n(&b->log[i],
                                                                         __ATOMIC_RELAXED));
    out->size = b->cfg.size;
    out->seed = b->cfg.seed;
    return 0;
}
