/* virtio-blk request parsing: from a validated descriptor chain to the one
 * operation the engine must perform (or the status to answer at once). */
#include <string.h>

#include "internal.h"

struct blk_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* Gather len bytes from the front of iov[0..n) into dst; returns bytes copied. */
static size_t iov_gather(const struct iovec *iov, int n, void *dst, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        size_t k = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy((uint8_t *)dst + done, iov[i].iov_base, k);
        done += k;
    }
    return done;
}

static size_t iov_scatter(const struct iovec *iov, int n, const void *src, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        size_t k = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(iov[i].iov_base, (const uint8_t *)src + done, k);
        done += k;
    }
    return done;
}

/* Drop the first skip bytes of iov[*first .. *first + *count). */
static void iov_skip(struct iovec *iov, int *first, int *count, size_t skip)
{
    while (skip > 0 && *count > 0) {
        struct iovec *v = &iov[*first];
        if (v->iov_len > skip) {
            v->iov_base = (uint8_t *)v->iov_base + skip;
            v->iov_len -= skip;
            return;
        }
        skip -= v->iov_len;
        (*first)++;
        (*count)--;
    }
}

static void fail(struct bs_blk_req *r, uint8_t status)
{
    r->op = BS_OP_NONE;
    r->status = status;
}

int bs_range_ok(const struct bs_target_cfg *t, uint64_t sector, uint64_t len)
{
    uint64_t bs = t->block_size ? t->block_size : BS_SECTOR;
    /* may grow at run time (bs_target_set_capacity): read it once */
    uint64_t cap = __atomic_load_n(&t->capacity, __ATOMIC_RELAXED);
    /* sector * 512 may overflow: compare in sectors first. */
    if (sector > cap / BS_SECTOR)
        return 0;
    if ((sector * BS_SECTOR) % bs || len % bs)
        return 0;
    return len <= cap - sector * BS_SECTOR;
}

struct dwz_seg {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* DISCARD / WRITE_ZEROES: an array of segments after the header. */
static void parse_dwz(const struct bs_target_cfg *t, struct bs_chain *c,
                      int first, int count, uint64_t len, struct bs_blk_req *r)
{
    int discard = r->type == BS_BLK_T_DISCARD;
    struct dwz_seg segs[BS_MAX_DWZ_SEG];
    size_t nseg = len / sizeof(segs[0]);

    if (c->in_len != 0 || t->read_only || len % sizeof(segs[0]) || nseg == 0 ||
        nseg > BS_MAX_DWZ_SEG)
        return;     /* IOERR */
    /* One copy out of guest memory, then only the copy is looked at. */
    iov_gather(&c->iov[first], count, segs, len);
    for (size_t i = 0; i < nseg; i++) {
        const struct dwz_seg seg = segs[i];
        if (seg.flags & ~(uint32_t)BS_BLK_WZ_F_UNMAP ||
            (discard && (seg.flags & BS_BLK_WZ_F_UNMAP))) {
            fail(r, BS_BLK_S_UNSUPP);
            return;
        }
        uint64_t bytes = (uint64_t)seg.num_sectors * BS_SECTOR;
        if (seg.num_sectors > BS_MAX_DWZ_SECTORS || !bs_range_ok(t, seg.sector, bytes)) {
            fail(r, BS_BLK_S_IOERR);
            return;
        }
        if (bytes == 0)
            continue;
        struct bs_range *rg = &r->ranges[r->nranges++];
        rg->offset = seg.sector * BS_SECTOR;
        rg->len = bytes;
        rg->unmap = !!(seg.flags & BS_BLK_WZ_F_UNMAP);
        r->len += bytes;
    }
    r->op = r->nranges ? (discard ? BS_OP_DISCARD : BS_OP_WRITE_ZEROES) : BS_OP_NONE;
    r->status = BS_BLK_S_OK;
}

void bs_blk_parse(const struct bs_target_cfg *t, struct bs_chain *c,
                  struct bs_blk_req *r)
{
    struct blk_hdr h = { 0, 0, 0 };

    memset(r, 0, sizeof(*r));
    fail(r, BS_BLK_S_IOERR);
    if (c->in_len == 0)
        return;             /* no writable byte for the status: caller logs */

    /* The status is the last writable byte; take it off the chain. */
    struct iovec *last = &c->iov[c->niov - 1];
    /* safe: in_len > 0 means the last iovec is writable and non-empty */
    r->status_ptr = (uint8_t *)last->iov_base + last->iov_len - 1;
    last->iov_len--;
    if (last->iov_len == 0)
        c->niov--;
    c->in_len--;
    r->used_len = 1;

    if (c->out_len < sizeof(h))
        return;
    iov_gather(c->iov, c->nout, &h, sizeof(h));
    r->type = h.type;

    int out_first = 0, out_count = c->nout;
    iov_skip(c->iov, &out_first, &out_count, sizeof(h));
    uint64_t out_data = c->out_len - sizeof(h);

    switch (h.type) {
    case BS_BLK_T_IN:
        if (out_data != 0)
            return;         /* a device-readable data buffer on a read */
        r->op = BS_OP_READ;
        r->iov_first = c->nout;
        r->iov_count = c->niov - c->nout;
        r->len = c->in_len;
        break;
    case BS_BLK_T_OUT:
        if (c->in_len != 0 || t->read_only)
            return;         /* a device-writable data buffer on a write */
        r->op = BS_OP_WRITE;
        r->iov_first = out_first;
        r->iov_count = out_count;
        r->len = out_data;
        break;
    case BS_BLK_T_FLUSH:
        if (t->read_only) {
            fail(r, BS_BLK_S_OK);
            return;
        }
        r->op = BS_OP_FLUSH;
        return;
    case BS_BLK_T_DISCARD:
    case BS_BLK_T_WRITE_ZEROES:
        parse_dwz(t, c, out_first, out_count, out_data, r);
        return;
    case BS_BLK_T_GET_ID: {
        size_t n = iov_scatter(&c->iov[c->nout], c->niov - c->nout, t->serial,
                               c->in_len < BS_BLK_ID_BYTES ? c->in_len
                                                           : BS_BLK_ID_BYTES);
        r->used_len += (uint32_t)n;
        fail(r, BS_BLK_S_OK);
        return;
    }
    default:
        fail(r, BS_BLK_S_UNSUPP);
        return;
    }

    /* READ or WRITE */
    if (r->len % BS_SECTOR || r->len > UINT32_MAX - 1 ||
        !bs_range_ok(t, h.sector, r->len)) {
        fail(r, BS_BLK_S_IOERR);
        return;
    }
    r->offset = h.sector * BS_SECTOR;
    if (r->op == BS_OP_READ)
        r->used_len += (uint32_t)r->len;
    if (r->len == 0)
        fail(r, BS_BLK_S_OK);
}
