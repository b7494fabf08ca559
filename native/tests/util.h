/* Helpers shared by the engine's C tests. */
#ifndef BS_TEST_UTIL_H
#define BS_TEST_UTIL_H

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* Lines of the io_uring overflow list of every ring this process has
 * (fdinfo "CqOverflowList:"): CQEs the kernel holds because nobody reaped. */
static inline int cq_overflow_entries(void)
{
    int total = 0;
    for (int fd = 0; fd < 1024; fd++) {
        char path[64], link[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, link, sizeof(link) - 1);
        if (n <= 0)
            continue;
        link[n] = 0;
        if (!strstr(link, "io_uring"))
            continue;
        snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
        FILE *fp = fopen(path, "r");
        if (!fp)
            continue;
        char line[256];
        int in_list = 0;
        while (fgets(line, sizeof(line), fp)) {
            if (strncmp(line, "CqOverflowList:", 15) == 0)
                in_list = 1;
            else if (in_list && strstr(line, "user_data"))
                total++;
        }
        fclose(fp);
    }
    return total;
}

/* No more than a few CQEs left in the kernel's overflow lists (a loop
 * that reaps as it goes leaves none); says how many when there are. */
static inline int cq_overflow_small(void)
{
    int n = cq_overflow_entries();
    if (n >= 64)
        fprintf(stderr, "io_uring overflow list: %d entries\n", n);
    return n < 64;
}

#endif
