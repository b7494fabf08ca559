/* libFuzzer harness: descriptor-chain validation and virtio-blk parsing.
 *
 * One input is a whole guest: a memory layout of 1-3 regions, the rings'
 * addresses, sparse writes of guest RAM (descriptor tables, headers), the
 * head index, split or packed ring, and the backing's capacity, block size
 * and read-only flag.  The harness maps the layout through the engine's own
 * bs_mem_add, maps the ring with bs_vring_map, walks the chain with
 * bs_vring_chain (or bs_vring_packed_chain) and parses it with bs_blk_parse
 * -- what engine.c does for each request -- then checks the promises those
 * functions make and touches every byte range they hand out, so ASan sees
 * any that is outside guest memory.
 *
 * Input format (little-endian, missing bytes read as zero), see
 * native/fuzz/gen_corpus.py which writes the seeds:
 *   u8  flags   bits 0-1: regions-1 (3 -> 1); bit 2: regions GPA-contiguous;
 *               bit 3: read-only target; bit 4: regions UVA-contiguous;
 *               bit 5: 4096-byte logical blocks (else 512); bit 6: packed
 *               ring; bit 7: the packed ring's avail wrap counter
 *   u64 capacity (rounded down to a logical block)
 *   u8  queue size: v < 16: 1 << v; 255: 65536; else v - 16
 *   u16 head (split) or ring position modulo the size (packed)
 *   3 x { u64 gpa; u32 size (low 16 bits + 1); u64 uva; u16 mmap_offset }
 *   3 x { u8 region; u32 offset }   desc, avail, used: uva = region's uva + offset
 *   then records until the end: { u8 region; u16 offset; u16 len; len bytes }
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../internal.h"

#define MAX_REGIONS 3
#define REGION_MAX 0x10000u
/* The one file every region maps (bs_mem_add wants a regular file).  It is
 * smaller than the largest mmap_offset + size the format can express, so
 * bs_mem_add's "region beyond the end of the file" check is fuzzed too. */
#define MEMFD_SIZE (REGION_MAX + REGION_MAX / 2)

/* -DFUZZ_CHAIN_TRACE prints what each input reached (to check the seeds). */
#ifdef FUZZ_CHAIN_TRACE
#define TRACE(...) fprintf(stderr, "fuzz_chain: " __VA_ARGS__)
#else
#define TRACE(...) do { } while (0)
#endif

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "fuzz_chain: invariant failed at %s:%d: %s\n", \
            __FILE__, __LINE__, #cond); abort(); } } while (0)

struct cursor {
    const uint8_t *p;
    size_t left;
};

static uint64_t take(struct cursor *c, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (c->left) {
            v |= (uint64_t)*c->p << (8 * i);
            c->p++;
            c->left--;
        }
    }
    return v;
}

struct region_in {
    uint64_t gpa, size, uva, mmap_offset;
};

struct guest {
    bs_mem *mem;
    int n;                      /* regions bs_mem_add accepted */
    struct region_in in[MAX_REGIONS];
    uint8_t *buf[MAX_REGIONS];  /* heap stand-in of each accepted region */
    void *block[MAX_REGIONS];   /* its allocation */
};

static int memfd_get(void)
{
    static int fd = -1;

    if (fd < 0) {
        fd = memfd_create("fuzz-guest", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, MEMFD_SIZE)) {
            perror("fuzz_chain: memfd");
            abort();
        }
    }
    return fd;
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Would bs_mem_add have to refuse region r next to the accepted ones? */
static int region_invalid(const struct guest *g, const struct region_in *r)
{
    uint64_t end;

    if (__builtin_add_overflow(r->gpa, r->size, &end) ||
        __builtin_add_overflow(r->uva, r->size, &end) ||
        r->mmap_offset + r->size > MEMFD_SIZE)
        return 1;
    for (int i = 0; i < g->n; i++)
        if (overlaps(r->gpa, r->size, g->in[i].gpa, g->in[i].size) ||
            overlaps(r->uva, r->size, g->in[i].uva, g->in[i].size))
            return 1;
    return 0;
}

/* Index of the region holding host range [p, p+len), or -1. */
static int region_of(const struct guest *g, const void *p, uint64_t len)
{
    uintptr_t b = (uintptr_t)p;

    for (int i = 0; i < g->n; i++) {
        uintptr_t lo = (uintptr_t)g->buf[i];
        if (b >= lo && b - lo < g->in[i].size && len <= g->in[i].size - (b - lo))
            return i;
    }
    return -1;
}

/* Read and write the first and last byte: ASan traps if either lies
 * outside the region's heap buffer. */
static void touch(void *p, size_t len)
{
    volatile uint8_t *b = p;

    if (len == 0)
        return;
    b[0] = b[0];
    b[len - 1] = b[len - 1];
}

static void guest_fini(struct guest *g)
{
    for (int i = 0; i < g->n; i++)
        free(g->block[i]);
    if (g->mem)
        CHECK(bs_mem_free(g->mem) == 0);
}

static void check_chain(const struct guest *g, const struct bs_chain *c)
{
    uint64_t out = 0, in = 0;

    CHECK(c->niov >= 0 && c->niov <= BS_MAX_IOV);
    CHECK(c->nout >= 0 && c->nout <= c->niov);
    for (int i = 0; i < c->niov; i++) {
        CHECK(c->iov[i].iov_len > 0);
        CHECK(region_of(g, c->iov[i].iov_base, c->iov[i].iov_len) >= 0);
        touch(c->iov[i].iov_base, c->iov[i].iov_len);
        if (i < c->nout)
            out += c->iov[i].iov_len;
        else
            in += c->iov[i].iov_len;
    }
    CHECK(out == c->out_len);
    CHECK(in == c->in_len);
}

/* Is p aligned for the type T that engine.c accesses it as? */
#define ALIGNED(p, T) ((uintptr_t)(p) % _Alignof(T) == 0)

/* A mapped ring lies inside guest memory, and is aligned in host memory for
 * the types engine.c reads and writes it through (plain and atomic member
 * accesses: UB when misaligned, and a misaligned atomic traps on arm64). */
static void check_ring(const struct guest *g, const struct bs_vring *vr,
                       const struct bs_vring_cfg *vc)
{
    CHECK(vr->num == vc->num && vr->packed == !!vc->packed);
    if (vr->packed) {
        CHECK(region_of(g, vr->pdesc, 16ULL * vr->num) >= 0);
        CHECK(region_of(g, vr->driver_evt, sizeof(struct bs_pevent)) >= 0);
        CHECK(region_of(g, vr->device_evt, sizeof(struct bs_pevent)) >= 0);
        CHECK(ALIGNED(vr->pdesc, struct bs_pdesc));
        CHECK(ALIGNED(vr->driver_evt, struct bs_pevent));
        CHECK(ALIGNED(vr->device_evt, struct bs_pevent));
    } else {
        CHECK(vr->num && !(vr->num & (vr->num - 1)));
        CHECK(region_of(g, vr->desc, 16ULL * vr->num) >= 0);
        CHECK(region_of(g, vr->avail, 6 + 2ULL * vr->num) >= 0);
        CHECK(region_of(g, vr->used, 6 + 8ULL * vr->num) >= 0);
        CHECK(ALIGNED(vr->desc, struct bs_vring_desc));
        CHECK(ALIGNED(vr->avail, struct bs_vring_avail));
        CHECK(ALIGNED(vr->used, struct bs_vring_used));
    }
}

static uint64_t iov_sum(const struct iovec *iov, int n)
{
    uint64_t s = 0;
    for (int i = 0; i < n; i++)
        s += iov[i].iov_len;
    return s;
}

static void check_req(const struct guest *g, const struct bs_target_cfg *t,
                      const struct bs_chain *before, const struct bs_chain *c,
                      const struct bs_blk_req *r)
{
    uint64_t bs = t->block_size ? t->block_size : BS_SECTOR;

    CHECK(c->niov >= 0 && c->niov <= before->niov);
    CHECK(c->nout == before->nout && c->nout <= c->niov);
    if (before->in_len == 0) {
        CHECK(r->status_ptr == NULL && r->op == BS_OP_NONE);
        return;
    }
    /* The status byte is the last byte of the last (writable) buffer. */
    const struct iovec *last = &before->iov[before->niov - 1];
    CHECK(before->niov > before->nout);
    CHECK(r->status_ptr == (uint8_t *)last->iov_base + last->iov_len - 1);
    CHECK(region_of(g, r->status_ptr, 1) >= 0);
    CHECK(r->used_len >= 1);

    switch (r->op) {
    case BS_OP_NONE:
        CHECK(r->status == BS_BLK_S_OK || r->status == BS_BLK_S_IOERR ||
              r->status == BS_BLK_S_UNSUPP);
        CHECK(r->used_len <= 1 + BS_BLK_ID_BYTES);
        CHECK(r->used_len - 1 <= before->in_len - 1);
        break;
    case BS_OP_READ:
    case BS_OP_WRITE:
        CHECK(r->iov_first >= 0 && r->iov_count >= 1 &&
              r->iov_first + r->iov_count <= c->niov);
        if (r->op == BS_OP_READ) {
            CHECK(r->iov_first >= c->nout);
            CHECK(r->len == before->in_len - 1);
            CHECK(r->used_len == 1 + r->len);
        } else {
            CHECK(!t->read_only);
            CHECK(r->iov_first + r->iov_count <= c->nout);
            CHECK(r->len == before->out_len - 16);
            CHECK(r->used_len == 1);
        }
        CHECK(r->len > 0 && r->len % BS_SECTOR == 0 && r->len <= UINT32_MAX);
        CHECK(r->offset % bs == 0 && r->len % bs == 0);
        CHECK(r->offset <= t->capacity && r->len <= t->capacity - r->offset);
        CHECK(iov_sum(&c->iov[r->iov_first], r->iov_count) == r->len);
        for (int i = r->iov_first; i < r->iov_first + r->iov_count; i++) {
            CHECK(c->iov[i].iov_len > 0);
            CHECK(region_of(g, c->iov[i].iov_base, c->iov[i].iov_len) >= 0);
            /* (Data buffers may alias the status byte or each other: the
             * guest chose the addresses, and it only hurts the guest.) */
            touch(c->iov[i].iov_base, c->iov[i].iov_len);
        }
        break;
    case BS_OP_FLUSH:
        CHECK(!t->read_only);
        break;
    case BS_OP_DISCARD:
    case BS_OP_WRITE_ZEROES: {
        uint64_t sum = 0;
        CHECK(!t->read_only && before->in_len == 1 && r->used_len == 1);
        CHECK(r->nranges >= 1 && r->nranges <= BS_MAX_DWZ_SEG);
        for (int i = 0; i < r->nranges; i++) {
            const struct bs_range *rg = &r->ranges[i];
            CHECK(rg->len > 0 && rg->len <= (uint64_t)BS_MAX_DWZ_SECTORS * BS_SECTOR);
            CHECK(rg->offset % bs == 0 && rg->len % bs == 0);
            CHECK(rg->offset <= t->capacity && rg->len <= t->capacity - rg->offset);
            CHECK(!rg->unmap || r->op == BS_OP_WRITE_ZEROES);
            sum += rg->len;
        }
        CHECK(sum == r->len);
        break;
    }
    default:
        CHECK(!"unknown op");
    }
    /* What engine.c's complete() does with it. */
    *r->status_ptr = r->op == BS_OP_NONE ? r->status : BS_BLK_S_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor cur = { data, size };
    struct guest g;
    struct region_in want[MAX_REGIONS];
    struct bs_target_cfg t;
    struct bs_vring_cfg vc;
    struct bs_vring vr;
    static struct bs_chain c, before;
    struct bs_blk_req r;
    int ret;

    memset(&g, 0, sizeof(g));
    memset(&t, 0, sizeof(t));
    memset(&vc, 0, sizeof(vc));

    uint8_t flags = (uint8_t)take(&cur, 1);
    int nreg = 1 + (flags & 3) % 3;
    t.read_only = !!(flags & 8);
    t.block_size = flags & 32 ? 4096 : 512;
    t.capacity = take(&cur, 8) & ~((uint64_t)t.block_size - 1);
    memcpy(t.serial, "fuzz-serial", 11);
    uint8_t qsz = (uint8_t)take(&cur, 1);
    vc.num = qsz < 16 ? 1u << qsz : qsz == 255 ? 1u << 16 : qsz - 16u;
    vc.packed = !!(flags & 64);
    int wrap = !!(flags & 128);
    uint16_t head = (uint16_t)take(&cur, 2);
    for (int i = 0; i < MAX_REGIONS; i++) {
        want[i].gpa = take(&cur, 8);
        want[i].size = (take(&cur, 4) & (REGION_MAX - 1)) + 1;
        want[i].uva = take(&cur, 8);
        want[i].mmap_offset = take(&cur, 2);
        if (i > 0 && (flags & 4))
            want[i].gpa = want[i - 1].gpa + want[i - 1].size;
        if (i > 0 && (flags & 16))
            want[i].uva = want[i - 1].uva + want[i - 1].size;
    }
    uint64_t ring_uva[3];
    for (int i = 0; i < 3; i++) {
        int sel = (int)(take(&cur, 1) % (uint64_t)nreg);
        ring_uva[i] = want[sel].uva + take(&cur, 4);
    }

    /* Guest memory through the engine's own validation. */
    CHECK(bs_mem_new(&g.mem) == 0);
    for (int i = 0; i < nreg; i++) {
        const struct region_in *w = &want[i];
        int invalid = region_invalid(&g, w);
        ret = bs_mem_add(g.mem, memfd_get(), w->gpa, w->size, w->uva, w->mmap_offset);
        CHECK(ret == 0 || ret == -EINVAL);
        CHECK((ret == 0) == !invalid);
        if (ret)
            continue;
        CHECK(bs_mem_count(g.mem) == g.n + 1);
        /* ASan cannot see past the end of an mmap: point the region at a
         * heap buffer ending exactly where it does, so one byte beyond is
         * a redzone, and starting at the same offset from 16-byte
         * alignment as the real mapping (page-aligned base + mmap_offset).
         * Unmapping still uses map_base. */
        size_t pad = (size_t)(w->mmap_offset & 15);
        CHECK(posix_memalign(&g.block[g.n], 16, pad + w->size) == 0);
        memset(g.block[g.n], 0, pad + w->size);
        g.buf[g.n] = (uint8_t *)g.block[g.n] + pad;
        CHECK(g.mem->r[g.n].hva == (uint8_t *)g.mem->r[g.n].map_base + w->mmap_offset);
        g.mem->r[g.n].hva = g.buf[g.n];
        g.in[g.n] = *w;
        g.n++;
    }
    TRACE("%d of %d region(s) mapped\n", g.n, nreg);
    if (g.n == 0)
        goto out;

    /* Sparse writes of guest RAM. */
    while (cur.left) {
        int ri = (int)(take(&cur, 1) % (uint64_t)g.n);
        uint64_t off = take(&cur, 2);
        uint64_t len = take(&cur, 2);
        if (len > cur.left)
            len = cur.left;
        if (off < g.in[ri].size) {
            uint64_t k = len < g.in[ri].size - off ? len : g.in[ri].size - off;
            memcpy(g.buf[ri] + off, cur.p, k);
        }
        cur.p += len;
        cur.left -= len;
    }

    vc.desc_uva = ring_uva[0];
    vc.avail_uva = ring_uva[1];
    vc.used_uva = ring_uva[2];
    ret = bs_vring_map(&vr, g.mem, &vc);
    CHECK(ret == 0 || ret == -EINVAL || ret == -EFAULT);
    TRACE("bs_vring_map(num=%u, packed=%d) = %d\n", vc.num, vc.packed, ret);
    if (ret)
        goto out;
    check_ring(&g, &vr, &vc);

    if (vr.packed) {
        uint16_t pos = (uint16_t)(head % vr.num), id = 0, ndesc = 0;
        /* engine.c walks a chain only once its first descriptor is available */
        int avail = bs_vring_packed_avail(&vr, pos, wrap);
        TRACE("bs_vring_packed_avail(pos=%u, wrap=%d) = %d\n", pos, wrap, avail);
        if (!avail)
            goto out;
        ret = bs_vring_packed_chain(&vr, g.mem, pos, &c, &id, &ndesc);
        CHECK(ret == 0 || ret == -EINVAL || ret == -EFAULT || ret == -E2BIG);
        CHECK(ndesc <= vr.num);
        CHECK(ndesc > 0 || ret == -EINVAL);
        TRACE("bs_vring_packed_chain(pos=%u) = %d, id %u, %u descriptor(s)\n",
              pos, ret, id, ndesc);
    } else {
        ret = bs_vring_chain(&vr, g.mem, head, &c);
        CHECK(ret == 0 || ret == -EINVAL || ret == -EFAULT || ret == -E2BIG);
        CHECK(ret != 0 || head < vr.num);
        TRACE("bs_vring_chain(head=%u) = %d\n", head, ret);
    }
    if (ret)
        goto out;
    check_chain(&g, &c);

    memcpy(&before, &c, sizeof(c));
    bs_blk_parse(&t, &c, &r);
    TRACE("niov=%d nout=%d out_len=%llu in_len=%llu -> op=%d status=%u len=%llu\n",
          before.niov, before.nout, (unsigned long long)before.out_len,
          (unsigned long long)before.in_len, r.op, r.status, (unsigned long long)r.len);
    check_req(&g, &t, &before, &c, &r);
out:
    guest_fini(&g);
    return 0;
}
