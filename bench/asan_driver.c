/* Standalone driver for native/bench.c, for running the frontend under
 * AddressSanitizer/UBSan/LeakSanitizer without Python (bench/asan.sh).
 *   asan_driver SOCKET RW QUEUES IODEPTH RUNTIME_MS SIZE VERIFY INDIRECT POLL_US
 * Exit: 0 ok, 1 run failed or request errors, 2 setup failed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "blkserve_native.h"

int main(int argc, char **argv)
{
    struct bs_bench_cfg c = { 0 };
    struct bs_bench_stats st;
    bs_bench *b = NULL;
    char err[256];
    int ret, rc = 0;

    if (argc != 10) {
        fprintf(stderr, "usage: %s SOCKET RW QUEUES IODEPTH RUNTIME_MS SIZE VERIFY "
                "INDIRECT POLL_US\n", argv[0]);
        return 2;
    }
    c.socket_path = argv[1];
    c.rw = (uint32_t)atoi(argv[2]);
    c.queues = (uint32_t)atoi(argv[3]);
    c.iodepth = (uint32_t)atoi(argv[4]);
    c.runtime_ns = strtoull(argv[5], NULL, 0) * 1000000ULL;
    c.size = strtoull(argv[6], NULL, 0);
    c.verify = atoi(argv[7]);
    c.indirect = atoi(argv[8]);
    c.poll_ns = strtoull(argv[9], NULL, 0) * 1000ULL;
    c.bs = 4096;
    c.rwmix_read = 50;

    ret = bs_bench_new(&c, &b);
    if (!ret)
        ret = bs_bench_connect(b);
    if (!ret)
        ret = bs_bench_setup(b);
    if (ret) {
        if (b) {
            bs_bench_error(b, err, sizeof(err));
            fprintf(stderr, "setup: %s\n", err);
        }
        bs_bench_free(b);
        return 2;
    }
    ret = bs_bench_run(b);
    if (ret) {
        bs_bench_error(b, err, sizeof(err));
        fprintf(stderr, "run: %s\n", err);
        rc = 1;
    }
    bs_bench_get_stats(b, -1, &st);
    for (uint32_t q = 0; q < c.queues; q++) {
        struct bs_bench_stats qs;
        bs_bench_get_stats(b, (int32_t)q, &qs);
    }
    printf("ios=%llu errors=%llu verify_errors=%llu p50=%llu p99=%llu rescue=%llu\n",
           (unsigned long long)st.ios, (unsigned long long)st.errors,
           (unsigned long long)st.verify_errors, (unsigned long long)st.lat_p50_ns,
           (unsigned long long)st.lat_p99_ns, (unsigned long long)st.rescue_kicks);
    if (st.errors)
        rc = 1;
    bs_bench_free(b);
    return rc;
}
