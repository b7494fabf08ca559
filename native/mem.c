/* Guest memory: regions mapped from the frontend's fds, and bounds-checked
 * translation of guest-physical and frontend-virtual addresses. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "internal.h"

/* ---- SIGBUS from memory the frontend can shrink ----
 * Guest RAM and the inflight region are files the frontend owns: it can
 * truncate them at any time, and the next touch of a page past the new end
 * raises SIGBUS in whichever thread touched it (default action: the whole
 * worker dies).  Every such mapping is registered here; the handler puts
 * an anonymous page where the missing one was (the access completes, on
 * zeroes) and raises the mapping's fault flag, which the queue threads
 * check once per loop and turn into a broken queue.  A fault anywhere else
 * goes to the handler that was there before.  This is process-wide state:
 * a signal handler can reach nothing else. */
#define GUARD_SLOTS 256
struct guard {
    uintptr_t start, end;    /* end == 0: free slot */
    uintptr_t page;          /* the mapping's page size (huge pages too) */
    int *flag;
};
static struct guard guards[GUARD_SLOTS];
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction guard_prev;
static int guard_installed;

static void guard_sigbus(int sig, siginfo_t *si, void *uc)
{
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        uintptr_t end = __atomic_load_n(&guards[i].end, __ATOMIC_ACQUIRE);
        if (!end || a < guards[i].start || a >= end)
            continue;
        void *pg = (void *)(a & ~(guards[i].page - 1));
        if (mmap(pg, guards[i].page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
            break;
        __atomic_store_n(guards[i].flag, 1, __ATOMIC_RELEASE);
        return;
    }
    if (guard_prev.sa_flags & SA_SIGINFO) {
        if (guard_prev.sa_sigaction) {
            guard_prev.sa_sigaction(sig, si, uc);
            return;
        }
    } else if (guard_prev.sa_handler != SIG_DFL && guard_prev.sa_handler != SIG_IGN) {
        guard_prev.sa_handler(sig);
        return;
    }
    /* not ours and nobody else's: the default action on the re-fault */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
}

int bs_guard_add(void *start, uint64_t len, uint64_t page, int *flag)
{
    int ret = -ENOSPC;
    pthread_mutex_lock(&guard_lock);
    if (!guard_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = guard_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &guard_prev) < 0) {
            ret = -errno;
            goto out;
        }
        guard_installed = 1;
    }
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (guards[i].end)
            continue;
        guards[i].start = (uintptr_t)start;
        guards[i].page = page >= 4096 && !(page & (page - 1)) ? page : 4096;
        guards[i].flag = flag;
        __atomic_store_n(&guards[i].end, (uintptr_t)start + len, __ATOMIC_RELEASE);
        ret = 0;
        break;
    }
out:
    pthread_mutex_unlock(&guard_lock);
    return ret;
}

void bs_guard_remove(void *start, int *flag)
{
    pthread_mutex_lock(&guard_lock);
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (guards[i].end && guards[i].start == (uintptr_t)start && guards[i].flag == flag) {
            __atomic_store_n(&guards[i].end, 0, __ATOMIC_RELEASE);
            break;
        }
    }
    pthread_mutex_unlock(&guard_lock);
}

int bs_mem_new(bs_mem **out)
{
    bs_mem *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    *out = m;
    return 0;
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

int bs_mem_add(bs_mem *m, int fd, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset)
{
    struct stat st;
    uint64_t end;

    if (m->nregions >= BS_MAX_REGIONS)
        return -ENOSPC;
    if (size == 0 || __builtin_add_overflow(gpa, size, &end) ||
        __builtin_add_overflow(uva, size, &end) ||
        __builtin_add_overflow(mmap_offset, size, &end) || end > SIZE_MAX)
        return -EINVAL;
    if (fstat(fd, &st) < 0)
        return -errno;
    /* A mapping past the end of a file would SIGBUS on first touch; block
     * devices and character devices report no size, so only trust files. */
    if (!S_ISREG(st.st_mode))
        return -EINVAL;
    if (end > (uint64_t)st.st_size)
        return -EINVAL;
    for (int i = 0; i < m->nregions; i++) {
        if (ranges_overlap(gpa, size, m->r[i].gpa, m->r[i].size) ||
            ranges_overlap(uva, size, m->r[i].uva, m->r[i].size))
            return -EINVAL;
    }
    /* Map from offset 0 so the mmap offset needs no page alignment.  The
     * length covers what the region needs, rounded up to the fd's block
     * size (the huge page size on hugetlbfs, which refuses partial pages)
     * as long as the file has that much: never past its end (SIGBUS). */
    uint64_t map_len = end;
    uint64_t blk = st.st_blksize > 0 ? (uint64_t)st.st_blksize : 4096;
    if (map_len % blk && map_len - map_len % blk + blk <= (uint64_t)st.st_size)
        map_len = map_len - map_len % blk + blk;
    void *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return -errno;
    madvise(base, map_len, MADV_DONTDUMP);
    int gerr = bs_guard_add(base, map_len, blk, &m->faulted);
    if (gerr) {
        munmap(base, map_len);
        return gerr;
    }
    struct bs_region *r = &m->r[m->nregions++];
    r->gpa = gpa;
    r->size = size;
    r->uva = uva;
    r->map_base = base;
    r->map_len = map_len;
    r->hva = (uint8_t *)base + mmap_offset;
    return 0;
}

int bs_mem_remove(bs_mem *m, uint64_t gpa, uint64_t size, uint64_t uva)
{
    if (__atomic_load_n(&m->users, __ATOMIC_ACQUIRE) > 0)
        return -EBUSY;
    for (int i = 0; i < m->nregions; i++) {
        struct bs_region *r = &m->r[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva) {
            bs_guard_remove(r->map_base, &m->faulted);
            munmap(r->map_base, r->map_len);
            m->r[i] = m->r[--m->nregions];
            return 0;
        }
    }
    return -ENOENT;
}

int bs_mem_count(bs_mem *m)
{
    return m->nregions;
}

static void free_logs(struct bs_mem *m, struct bs_log *lg)
{
    while (lg) {
        struct bs_log *next = lg->retired;
        bs_guard_remove(lg->bits, &m->faulted);
        free(lg);
        lg = next;
    }
}

int bs_mem_set_log(bs_mem *m, void *log, uint64_t size)
{
    struct bs_log *lg = NULL;
    if (log) {
        if (size == 0)
            return -EINVAL;
        lg = calloc(1, sizeof(*lg));
        if (!lg)
            return -ENOMEM;
        lg->bits = log;
        lg->size = size;
        /* the log is the frontend's file too: a shrink must not kill us */
        int ret = bs_guard_add(log, size, 4096, &m->faulted);
        if (ret) {
            free(lg);
            return ret;
        }
    }
    struct bs_log *old = __atomic_exchange_n(&m->log, lg, __ATOMIC_ACQ_REL);
    if (old) {
        /* a queue thread may still hold it: kept until no queue runs */
        old->retired = m->retired;
        m->retired = old;
    }
    if (__atomic_load_n(&m->users, __ATOMIC_ACQUIRE) == 0) {
        free_logs(m, m->retired);
        m->retired = NULL;
    }
    return 0;
}

void bs_log_write_slow(const struct bs_log *lg, const struct bs_mem *m, const void *p,
                       uint64_t len)
{
    uintptr_t a = (uintptr_t)p;
    while (len > 0) {
        const struct bs_region *hit = NULL;
        for (int i = 0; i < m->nregions; i++) {
            uintptr_t h = (uintptr_t)m->r[i].hva;
            if (a >= h && a - h < m->r[i].size) {
                hit = &m->r[i];
                break;
            }
        }
        if (!hit)
            return;     /* not guest memory: nothing the frontend migrates */
        uint64_t off = a - (uintptr_t)hit->hva;
        uint64_t n = hit->size - off < len ? hit->size - off : len;
        uint64_t first = (hit->gpa + off) / 4096, last = (hit->gpa + off + n - 1) / 4096;
        for (uint64_t pg = first; pg <= last; pg++) {
            /* safe: a page past the log (a log too small) is not marked */
            if (pg / 8 >= lg->size)
                break;
            __atomic_fetch_or(&lg->bits[pg / 8], (uint8_t)(1u << (pg % 8)), __ATOMIC_RELAXED);
        }
        a += n;
        len -= n;
    }
}

int bs_mem_free(bs_mem *m)
{
    if (!m)
        return 0;
    if (__atomic_load_n(&m->users, __ATOMIC_ACQUIRE) > 0)
        return -EBUSY;
    free_logs(m, __atomic_load_n(&m->log, __ATOMIC_ACQUIRE));
    free_logs(m, m->retired);
    for (int i = 0; i < m->nregions; i++) {
        bs_guard_remove(m->r[i].map_base, &m->faulted);
        munmap(m->r[i].map_base, m->r[i].map_len);
    }
    free(m);
    return 0;
}

void *bs_mem_gpa(const struct bs_mem *m, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < m->nregions; i++) {
        const struct bs_region *r = &m->r[i];
        /* gpa - r->gpa cannot wrap once gpa >= r->gpa */
        if (gpa >= r->gpa && gpa - r->gpa < r->size &&
            len <= r->size - (gpa - r->gpa))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

void *bs_mem_uva(const struct bs_mem *m, uint64_t uva, uint64_t len)
{
    for (int i = 0; i < m->nregions; i++) {
        const struct bs_region *r = &m->r[i];
        if (uva >= r->uva && uva - r->uva < r->size &&
            len <= r->size - (uva - r->uva))
            return r->hva + (uva - r->uva);
    }
    return NULL;
}

int bs_mem_iov(const struct bs_mem *m, uint64_t gpa, uint32_t len,
               struct iovec *iov, int max)
{
    int n = 0;
    uint64_t end;

    if (__builtin_add_overflow(gpa, (uint64_t)len, &end))
        return -EFAULT;
    while (len > 0) {
        const struct bs_region *hit = NULL;
        for (int i = 0; i < m->nregions; i++) {
            const struct bs_region *r = &m->r[i];
            if (gpa >= r->gpa && gpa - r->gpa < r->size) {
                hit = r;
                break;
            }
        }
        if (!hit)
            return -EFAULT;
        if (n >= max)
            return -E2BIG;
        uint64_t off = gpa - hit->gpa;
        uint64_t chunk = hit->size - off;
        if (chunk > len)
            chunk = len;
        /* safe: [off, off+chunk) lies inside this region (chunk <= size-off) */
        iov[n].iov_base = hit->hva + off;
        iov[n].iov_len = chunk;
        n++;
        gpa += chunk;
        len -= (uint32_t)chunk;
    }
    return n;
}
