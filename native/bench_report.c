/* blkserve bench: results, per queue or summed (latency percentiles from
 * the log-linear histograms the queue threads fill). */
#include "bench.h"

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

void bench_finish_stats(struct bs_bench_stats *st, const uint64_t *hist, uint64_t lat_sum)
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
        bench_finish_stats(out, q->hist, q->lat_sum);
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
    bench_finish_stats(out, hist, lat_sum);
    free(hist);
    return 0;
}
