/* The Xen blkif transport: grants (persistent ones kept in a small open
 * addressing table, the others mapped per request) and request parsing,
 * from a copy of a ring entry to a struct bs_io for the request core. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "blkif.h"

/* ---- grants ---- */

static uint32_t pg_hash(uint32_t gref)
{
    return (gref * 2654435761u) & (PGRANT_BUCKETS - 1);
}

/* The persistent mapping of gref, mapped now if there is room; NULL if the
 * table is full (the caller maps it for this request only) or on failure
 * (*err set). */
static void *pg_get(struct bs_blkif *b, uint32_t gref, int *err)
{
    uint32_t h = pg_hash(gref);
    for (uint32_t n = 0; n < PGRANT_BUCKETS; n++, h = (h + 1) & (PGRANT_BUCKETS - 1)) {
        struct pgrant *p = &b->pg[h];
        if (p->gref == gref)
            return p->addr;
        if (p->gref != PGRANT_NONE)
            continue;
        /* keep the table at most half full: probes stay short */
        if (b->npg >= PGRANT_BUCKETS / 2)
            return NULL;
        uint32_t ref = gref;
        void *a = b->ops.map_domain_grant_refs(b->ops.gnttab, 1, b->cfg.domid, &ref,
                                               PROT_READ | PROT_WRITE);
        if (!a) {
            *err = -EFAULT;
            return NULL;
        }
        p->gref = gref;
        p->addr = a;
        b->npg++;
        return a;
    }
    return NULL;
}

void bs_blkif_pg_release_all(struct bs_blkif *b)
{
    if (!b->pg)
        return;
    for (uint32_t i = 0; i < PGRANT_BUCKETS; i++)
        if (b->pg[i].gref != PGRANT_NONE)
            b->ops.unmap(b->ops.gnttab, b->pg[i].addr, 1);
    free(b->pg);
    b->pg = NULL;
    b->npg = 0;
}

/* Map the data pages of segs[0..n) (validated) and fill the slot's iovecs;
 * the data length goes to *len.  Returns 0 or -errno (the request gets an
 * error). */
static int map_segments(struct bs_blkif *b, struct bslot *s,
                        const struct blkif_request_segment *segs, uint32_t n,
                        int device_writes, uint64_t *len)
{
    uint32_t refs[BS_MAX_IOV];
    uint32_t tmp_idx[BS_MAX_IOV];
    uint32_t ntmp = 0;
    struct bs_chain *c = &s->io.chain;
    uint64_t total = 0;
    int err = 0;

    /* segments were validated by the caller */
    if (n == 0 || n > BS_MAX_IOV)
        return -E2BIG;
    for (uint32_t i = 0; i < n; i++)
        total += (uint64_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512;
    for (uint32_t i = 0; i < n; i++) {
        void *a = NULL;
        if (b->cfg.persistent) {
            a = pg_get(b, segs[i].gref, &err);
            if (err)
                return err;
        }
        if (!a)
            tmp_idx[ntmp++] = i;
        c->iov[i].iov_base = a;
    }
    if (ntmp) {
        for (uint32_t k = 0; k < ntmp; k++)
            refs[k] = segs[tmp_idx[k]].gref;
        /* a read writes into the guest's pages: it granted them writable */
        int prot = device_writes ? PROT_READ | PROT_WRITE : PROT_READ;
        uint8_t *m = b->ops.map_domain_grant_refs(b->ops.gnttab, ntmp, b->cfg.domid, refs, prot);
        if (!m)
            return -EFAULT;
        s->map = m;
        s->nmap = ntmp;
        for (uint32_t k = 0; k < ntmp; k++)
            c->iov[tmp_idx[k]].iov_base = m + (size_t)k * XPAGE;
    }
    for (uint32_t i = 0; i < n; i++) {
        c->iov[i].iov_base = (uint8_t *)c->iov[i].iov_base + segs[i].first_sect * 512u;
        c->iov[i].iov_len = (size_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512u;
    }
    c->niov = (int)n;
    *len = total;
    return 0;
}

/* The segment array of an indirect request, copied out of its granted
 * pages (mapped read-only for the copy). */
static int indirect_segments(struct bs_blkif *b, const struct blkif_request_indirect *ind,
                             uint32_t nseg, struct blkif_request_segment *out)
{
    uint32_t npages = (nseg + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
    uint32_t refs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    for (uint32_t i = 0; i < npages; i++)
        refs[i] = ind->indirect_grefs[i];
    uint8_t *m = b->ops.map_domain_grant_refs(b->ops.gnttab, npages, b->cfg.domid, refs,
                                              PROT_READ);
    if (!m)
        return -EFAULT;
    memcpy(out, m, nseg * sizeof(*out));
    b->ops.unmap(b->ops.gnttab, m, npages);
    return 0;
}

/* ---- requests ---- */

/* Read or write of segs[0..nseg): fill the slot's request. */
static void parse_rw(struct bs_blkif *b, struct bslot *s, int write, uint64_t sector,
                     const struct blkif_request_segment *segs, uint32_t nseg)
{
    struct bs_blk_req *r = &s->io.req;
    const struct bs_target_cfg *t = &b->target->cfg;
    uint64_t len = 0;

    r->type = write ? BS_BLK_T_OUT : BS_BLK_T_IN;
    if (write && t->read_only) {
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_IOERR;
        return;
    }
    if (nseg == 0) {
        bs_blkif_req_fault(b, r, -EINVAL);
        return;
    }
    /* range first: nothing is mapped for a request that is refused */
    uint64_t want = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        if (segs[i].first_sect > segs[i].last_sect || segs[i].last_sect >= SECTORS_PER_PAGE) {
            bs_blkif_req_fault(b, r, -EINVAL);
            return;
        }
        want += (uint64_t)(segs[i].last_sect - segs[i].first_sect + 1) * 512;
    }
    if (!bs_range_ok(t, sector, want)) {
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_IOERR;
        return;
    }
    int err = map_segments(b, s, segs, nseg, !write, &len);
    if (err) {
        bs_blkif_req_fault(b, r, err);
        return;
    }
    r->op = write ? BS_OP_WRITE : BS_OP_READ;
    r->offset = sector * BS_SECTOR;
    r->len = len;
    r->iov_first = 0;
    r->iov_count = (int)nseg;
}

void bs_blkif_parse(struct bs_blkif *b, struct bslot *s, const union blkif_any *q)
{
    struct bs_blk_req *r = &s->io.req;
    const struct bs_target_cfg *t = &b->target->cfg;
    struct blkif_request_segment segs[BS_MAX_IOV];

    memset(r, 0, sizeof(*r));
    r->status = BS_BLK_S_OK;
    switch (q->rw.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
        if (q->rw.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            r->type = q->rw.operation == BLKIF_OP_WRITE ? BS_BLK_T_OUT : BS_BLK_T_IN;
            bs_blkif_req_fault(b, r, -E2BIG);
            return;
        }
        parse_rw(b, s, q->rw.operation == BLKIF_OP_WRITE, q->rw.sector_number, q->rw.seg,
                 q->rw.nr_segments);
        return;
    case BLKIF_OP_WRITE_BARRIER:
        /* earlier requests are complete (the caller held it until then);
         * with data it is a write made durable (FUA), without a flush */
        if (q->rw.nr_segments == 0) {
            r->type = BS_BLK_T_FLUSH;
            r->op = t->read_only ? BS_OP_NONE : BS_OP_FLUSH;
            return;
        }
        if (q->rw.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            r->type = BS_BLK_T_OUT;
            bs_blkif_req_fault(b, r, -E2BIG);
            return;
        }
        parse_rw(b, s, 1, q->rw.sector_number, q->rw.seg, q->rw.nr_segments);
        r->fua = 1;
        return;
    case BLKIF_OP_FLUSH_DISKCACHE:
        r->type = BS_BLK_T_FLUSH;
        r->op = t->read_only ? BS_OP_NONE : BS_OP_FLUSH;
        return;
    case BLKIF_OP_DISCARD: {
        r->type = BS_BLK_T_DISCARD;
        uint64_t n = q->discard.nr_sectors;
        if (!b->cfg.discard || (q->discard.flag & BLKIF_DISCARD_SECURE)) {
            r->op = BS_OP_NONE;     /* secure discard is never advertised */
            r->status = BS_BLK_S_UNSUPP;
            return;
        }
        if (t->read_only || n > (1ULL << 40) || !bs_range_ok(t, q->discard.sector_number, n * 512)) {
            r->op = BS_OP_NONE;
            r->status = BS_BLK_S_IOERR;
            return;
        }
        if (n == 0)
            return;                 /* nothing to do: OK */
        r->op = BS_OP_DISCARD;
        r->nranges = 1;
        r->ranges[0].offset = q->discard.sector_number * BS_SECTOR;
        r->ranges[0].len = n * BS_SECTOR;
        r->len = n * BS_SECTOR;
        return;
    }
    case BLKIF_OP_INDIRECT: {
        const struct blkif_request_indirect *ind = &q->indirect;
        int write = ind->indirect_op == BLKIF_OP_WRITE;
        uint32_t nseg = ind->nr_segments;
        r->type = write ? BS_BLK_T_OUT : BS_BLK_T_IN;
        if (!b->cfg.max_indirect) {
            r->type = BLKIF_T_OTHER;
            r->op = BS_OP_NONE;
            r->status = BS_BLK_S_UNSUPP;
            return;
        }
        if ((ind->indirect_op != BLKIF_OP_READ && !write) || nseg == 0 ||
            nseg > b->cfg.max_indirect || nseg > BS_MAX_IOV) {
            bs_blkif_req_fault(b, r, -EINVAL);
            return;
        }
        int err = indirect_segments(b, ind, nseg, segs);
        if (err) {
            bs_blkif_req_fault(b, r, err);
            return;
        }
        parse_rw(b, s, write, ind->sector_number, segs, nseg);
        return;
    }
    default:
        r->type = BLKIF_T_OTHER;
        r->op = BS_OP_NONE;
        r->status = BS_BLK_S_UNSUPP;
        return;
    }
}
