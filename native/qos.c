/* QoS: IOPS and bandwidth limits as GCRA token buckets in shared memory
 * (the semantics are in blkserve_native.h, struct bs_qos).  Every queue
 * thread of every volume under a limit updates the same 64-bit bucket
 * states with compare-and-swap, so a limit holds across queues and across
 * the worker processes of a group without a lock. */
#include "internal.h"

#define QOS_MAGIC 0x534f5142u
/* The tolerance without a burst: how far a volume may run ahead of its
 * rate after an idle spell, and how late a queue's wake-up may be without
 * costing it budget (as QEMU's default bucket, a tenth of a second). */
#define SLICE_NS 100000000ULL
#define NS_PER_S 1000000000ULL
#define FAR_NS (1ULL << 60)             /* a wait that saturated */

static inline uint64_t ld(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* ns per UNITS at RATE units/s, saturating */
static uint64_t cost_ns(uint64_t units, uint64_t rate)
{
    unsigned __int128 v = (unsigned __int128)units * NS_PER_S / rate;
    return v > FAR_NS ? FAR_NS : (uint64_t)v;
}

/* GCRA: 0 if the bucket lets a request start at now, else the wait. */
static uint64_t bucket_wait(const uint64_t *tat, uint64_t tolerance, uint64_t now)
{
    uint64_t t = ld(tat);
    return t <= now + tolerance ? 0 : t - tolerance - now;
}

static void bucket_take(uint64_t *tat, uint64_t inc, uint64_t now)
{
    uint64_t t = ld(tat), n;
    do {
        n = (t > now ? t : now) + inc;
    } while (!__atomic_compare_exchange_n(tat, &t, n, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}

struct charge {
    struct bs_qos_limit *l;
    uint64_t inc, inc_burst;    /* inc_burst: 0 when no burst bucket */
};

/* The limits of q a request of op and bytes counts in: their waits into
 * *wait (the largest), their charges appended to ch. */
static int collect(struct bs_qos *q, int op, uint64_t bytes, uint64_t now, uint64_t *wait,
                   struct charge *ch, int n)
{
    static const int kinds_read[] = { BS_QOS_IOPS_TOTAL, BS_QOS_IOPS_READ,
                                      BS_QOS_BPS_TOTAL, BS_QOS_BPS_READ };
    static const int kinds_write[] = { BS_QOS_IOPS_TOTAL, BS_QOS_IOPS_WRITE,
                                       BS_QOS_BPS_TOTAL, BS_QOS_BPS_WRITE };
    const int *kinds = op == BS_OP_READ ? kinds_read : kinds_write;
    /* discard / write-zeroes: the iops limits only */
    int nk = op == BS_OP_READ || op == BS_OP_WRITE ? 4 : 2;

    for (int i = 0; i < nk; i++) {
        struct bs_qos_limit *l = &q->lim[kinds[i]];
        uint64_t rate = ld(&l->rate);
        if (!rate)
            continue;
        uint64_t units = kinds[i] >= BS_QOS_BPS_TOTAL ? bytes : 1;
        uint64_t burst = ld(&l->burst_rate), burst_ms = ld(&l->burst_ms);
        uint64_t tol = SLICE_NS;
        int bursty = burst > rate && burst_ms;
        if (bursty) {
            /* the credit of running at burst for burst_ms on top of rate */
            unsigned __int128 c = (unsigned __int128)(burst - rate) * burst_ms * 1000000ULL / rate;
            uint64_t credit = c > FAR_NS ? FAR_NS : (uint64_t)c;
            if (credit > tol)
                tol = credit;
        }
        uint64_t w = bucket_wait(&l->tat, tol, now);
        if (bursty) {
            uint64_t wb = bucket_wait(&l->tat_burst, SLICE_NS, now);
            if (wb > w)
                w = wb;
        }
        if (w > *wait)
            *wait = w;
        ch[n].l = l;
        ch[n].inc = cost_ns(units, rate);
        ch[n].inc_burst = bursty ? cost_ns(units, burst) : 0;
        n++;
    }
    return n;
}

uint64_t bs_qos_admit(bs_target *t, int op, uint64_t bytes, uint64_t now, int *by_group,
                      int force)
{
    if (op != BS_OP_READ && op != BS_OP_WRITE && op != BS_OP_DISCARD &&
        op != BS_OP_WRITE_ZEROES)
        return 0;
    struct bs_qos *vol = __atomic_load_n(&t->qos_vol, __ATOMIC_ACQUIRE);
    struct bs_qos *grp = __atomic_load_n(&t->qos_grp, __ATOMIC_ACQUIRE);
    struct charge ch[8];
    uint64_t wait = 0, wait_grp = 0;
    int n = 0;

    if (vol)
        n = collect(vol, op, bytes, now, &wait, ch, n);
    if (grp)
        n = collect(grp, op, bytes, now, &wait_grp, ch, n);
    *by_group = wait_grp > 0;
    if (wait_grp > wait)
        wait = wait_grp;
    if (wait && !force)
        return wait;
    for (int i = 0; i < n; i++) {
        bucket_take(&ch[i].l->tat, ch[i].inc, now);
        if (ch[i].inc_burst)
            bucket_take(&ch[i].l->tat_burst, ch[i].inc_burst, now);
    }
    return 0;
}

static void count(struct bs_qos *q, uint64_t wait)
{
    __atomic_fetch_add(&q->throttled, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&q->wait_ns, wait, __ATOMIC_RELAXED);
    __atomic_fetch_add(&q->wait_hist[bs_lat_bucket(wait)], 1, __ATOMIC_RELAXED);
}

void bs_qos_account(bs_target *t, uint64_t wait, int by_group)
{
    struct bs_qos *vol = __atomic_load_n(&t->qos_vol, __ATOMIC_ACQUIRE);
    struct bs_qos *grp = __atomic_load_n(&t->qos_grp, __ATOMIC_ACQUIRE);
    if (vol)
        count(vol, wait);
    if (grp && by_group)
        count(grp, wait);
}

void bs_target_set_qos(bs_target *t, struct bs_qos *vol, struct bs_qos *grp)
{
    __atomic_store_n(&t->qos_vol, vol, __ATOMIC_RELEASE);
    __atomic_store_n(&t->qos_grp, grp, __ATOMIC_RELEASE);
    __atomic_store_n(&t->qos_on, vol || grp, __ATOMIC_RELEASE);
}

static void rebase(uint64_t *tat, uint64_t now)
{
    uint64_t t = ld(tat);
    while (t > now &&
           !__atomic_compare_exchange_n(tat, &t, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

void bs_qos_rebase(struct bs_qos *q, int32_t kind)
{
    uint64_t now = bs_now_ns();
    for (int k = 0; k < BS_QOS_KINDS; k++) {
        if (kind >= 0 && k != kind)
            continue;
        rebase(&q->lim[k].tat, now);
        rebase(&q->lim[k].tat_burst, now);
    }
    if (q->magic != QOS_MAGIC) {
        q->size = sizeof(*q);
        __atomic_store_n(&q->magic, QOS_MAGIC, __ATOMIC_RELEASE);
    }
}
