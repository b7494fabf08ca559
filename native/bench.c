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
#include "bench.h"

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

/* ---- the queue thread ---- */

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
            *is_read = (bench_rng(&q->rng) % 100) < b->cfg.rwmix_read;
            break;
        }
        *block = bench_rng(&q->rng) % b->nblocks;
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
        q->hist[bench_hist_bucket(lat)]++;
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
        return bench_fail(b, -EPROTO, "queue %u: backend moved the used index by %u with only "
                    "%u request(s) in flight", q->index, n, inflight);
    uint64_t t = bench_now_ns();
    for (uint16_t i = 0; i < n; i++) {
        struct vused_elem e;
        memcpy(&e, &q->used->ring[(uint16_t)(q->last_used + i) & q->mask], sizeof(e));
        uint32_t si = b->cfg.indirect ? e.id : e.id / 3;
        if (e.id >= q->num || (!b->cfg.indirect && e.id % 3) || si >= b->depth ||
            !q->slots[si].inflight)
            return bench_fail(b, -EPROTO, "queue %u: backend completed descriptor %u, which is "
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
        return bench_fail(q->b, -errno, "queue %u: kicking the backend failed: %s",
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
        uint64_t until = bench_now_ns() + b->cfg.poll_ns;
        for (unsigned i = 1;; i++) {
            if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) != q->last_used)
                return 0;
            bench_cpu_relax();
            if ((i & 63) == 0) {
                if (bench_now_ns() >= until)
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
            return bench_fail(b, -errno, "queue %u: poll failed: %s", q->index, strerror(errno));
        if (r > 0 && (p[0].revents & POLLIN)) {
            uint64_t v;
            if (read(q->call_fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
                q->st.calls++;
        }
        if (r > 0 && (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR)))
            return bench_fail(b, -ECONNRESET, "backend closed the connection during the run");
        if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == q->last_used) {
            /* no progress, whatever woke us (a backend signalling without
             * publishing anything must not keep us here forever) */
            uint64_t t = bench_now_ns();
            if (t - *last_progress > b->cfg.timeout_ns)
                return bench_fail(b, -ETIMEDOUT, "queue %u: no request completed for %.1f s "
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
    uint64_t now = bench_now_ns();
    uint64_t last_progress = now;
    int exhausted = 0;

    q->seq_next = q->share_begin;
    for (;;) {
        if (bench_aborted(b))
            return -ECANCELED;
        if (!exhausted && (bench_stopped(b) || (ph == PH_RUN && now >= deadline))) {
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
            uint64_t w0 = bench_now_ns();
            int ret = wait_used(q, &last_progress);
            if (ph == PH_RUN)
                q->st.wait_ns += bench_now_ns() - w0;
            if (ret)
                return ret;
            n = reap(q, ph);
            if (n < 0)
                return n;
        }
        now = bench_now_ns();
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
        if (active && !bench_aborted(b) && !bench_stopped(b)) {
            if (ph == PH_RUN) {
                uint64_t t0 = bench_now_ns();
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
    if (b->sock >= 0 && b->set_up && !bench_aborted(b)) {
        for (uint32_t i = 0; i < b->nq; i++) {
            uint32_t st[2] = { i, 0 }, rep[2];
            uint32_t size = sizeof(rep);
            if (bench_vu_send(b, VU_GET_VRING_BASE, st, sizeof(st), NULL, 0, 0) ||
                bench_vu_recv_reply(b, VU_GET_VRING_BASE, rep, &size))
                break;
            if (size != sizeof(rep) || rep[0] != i) {
                bench_fail(b, -EPROTO, "backend's GET_VRING_BASE reply for queue %u is malformed", i);
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
        return bench_fail(b, -ENOTCONN, "not set up");
    if (b->ran)
        return bench_fail(b, -EALREADY, "a bench context runs once");
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
        bench_fail(b, -ret, "cannot start a queue thread: %s", strerror(ret));
    if (started > 0) {
        ret = pthread_barrier_init(&b->barrier, NULL, started);
        if (ret)
            bench_fail(b, -ret, "pthread_barrier_init failed: %s", strerror(ret));
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
    if (b->log)
        munmap(b->log, b->log_size);
    if (b->logfd >= 0)
        close(b->logfd);
    free(b->written);
    free(b->busy);
    pthread_mutex_destroy(&b->err_lock);
    pthread_mutex_destroy(&b->gate_lock);
    pthread_cond_destroy(&b->gate_cond);
    free(b);
}
