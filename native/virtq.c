/* Split virtqueue: ring mapping and descriptor-chain walking.  Every field
 * read from guest memory is copied once into a local before it is checked,
 * so a guest rewriting descriptors concurrently cannot pass a check with one
 * value and be used with another. */
#include <errno.h>
#include <string.h>

#include "internal.h"

static int map_packed(struct bs_vring *vr, const struct bs_mem *m,
                      const struct bs_vring_cfg *cfg)
{
    if ((cfg->desc_uva & 15) || (cfg->avail_uva & 3) || (cfg->used_uva & 3))
        return -EINVAL;
    vr->pdesc = bs_mem_uva(m, cfg->desc_uva, 16ULL * cfg->num);
    vr->driver_evt = bs_mem_uva(m, cfg->avail_uva, sizeof(struct bs_pevent));
    vr->device_evt = bs_mem_uva(m, cfg->used_uva, sizeof(struct bs_pevent));
    if (!vr->pdesc || !vr->driver_evt || !vr->device_evt)
        return -EFAULT;
    /* Aligned frontend addresses can still land misaligned in our mapping
     * (a region's mmap offset is the frontend's choice): atomics need it. */
    if (((uintptr_t)vr->pdesc & 15) || ((uintptr_t)vr->driver_evt & 3) ||
        ((uintptr_t)vr->device_evt & 3))
        return -EINVAL;
    return 0;
}

int bs_vring_map(struct bs_vring *vr, const struct bs_mem *m,
                 const struct bs_vring_cfg *cfg)
{
    uint32_t num = cfg->num;

    memset(vr, 0, sizeof(*vr));
    if (num == 0 || num > BS_MAX_QUEUE_SIZE)
        return -EINVAL;
    vr->num = num;
    vr->packed = !!cfg->packed;
    if (vr->packed)
        return map_packed(vr, m, cfg);
    if (num & (num - 1))
        return -EINVAL;
    if ((cfg->desc_uva & 15) || (cfg->avail_uva & 1) || (cfg->used_uva & 3))
        return -EINVAL;
    /* Sizes include the event-index words; they are part of the layout
     * whether or not EVENT_IDX is negotiated. */
    uint64_t desc_sz = 16ULL * num;
    uint64_t avail_sz = 4 + 2ULL * num + 2;
    uint64_t used_sz = 4 + 8ULL * num + 2;
    vr->desc = bs_mem_uva(m, cfg->desc_uva, desc_sz);
    vr->avail = bs_mem_uva(m, cfg->avail_uva, avail_sz);
    vr->used = bs_mem_uva(m, cfg->used_uva, used_sz);
    if (!vr->desc || !vr->avail || !vr->used)
        return -EFAULT;
    if (((uintptr_t)vr->desc & 15) || ((uintptr_t)vr->avail & 1) || ((uintptr_t)vr->used & 3))
        return -EINVAL;     /* see map_packed */
    return 0;
}

int bs_add_buffer(const struct bs_mem *m, struct bs_chain *c,
                      const struct bs_vring_desc *d)
{
    int writable = !!(d->flags & BS_VRING_DESC_F_WRITE);
    int n;

    if (d->len == 0)
        return 0;
    /* Readable buffers must all come before writable ones. */
    if (!writable && c->niov > c->nout)
        return -EINVAL;
    n = bs_mem_iov(m, d->addr, d->len, &c->iov[c->niov], BS_MAX_IOV - c->niov);
    if (n < 0)
        return n;
    c->niov += n;
    if (writable) {
        c->in_len += d->len;
    } else {
        c->nout += n;
        c->out_len += d->len;
    }
    return 0;
}

/* The status byte of a chain whose buffers were bad: the last byte of its
 * last descriptor, if that one is device-writable and inside guest memory. */
static uint8_t *fault_status(const struct bs_mem *m, uint64_t addr, uint32_t len,
                             uint16_t flags)
{
    if (!(flags & BS_VRING_DESC_F_WRITE) || len == 0 || addr + len - 1 < addr)
        return NULL;
    /* safe: bs_mem_gpa checks the byte lies inside a mapped region */
    return bs_mem_gpa(m, addr + len - 1, 1);
}

/* Walk a chain inside a descriptor table of tlen entries starting at idx.
 * A bad buffer does not end the walk (the links are still followed, to find
 * the last descriptor); a bad link or table does. */
static int walk(const struct bs_mem *m, const struct bs_vring_desc *table,
                uint32_t tlen, uint16_t idx, int indirect_ok,
                struct bs_chain *c)
{
    uint32_t visited = 0;
    int err = 0;

    for (;;) {
        struct bs_vring_desc d;

        if (idx >= tlen)
            return -EINVAL;
        /* Bounded by the table size: a chain that loops runs out here. */
        if (++visited > tlen)
            return -EINVAL;
        /* safe: idx < tlen, and table spans tlen entries (mapped by caller) */
        memcpy(&d, (const void *)&table[idx], sizeof(d));
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        c->ndesc++;

        if (d.flags & BS_VRING_DESC_F_INDIRECT) {
            /* Only as the sole descriptor of a chain from the ring itself. */
            if (!indirect_ok || (d.flags & BS_VRING_DESC_F_NEXT) || c->niov || err)
                return -EINVAL;
            if (d.len == 0 || (d.len % sizeof(struct bs_vring_desc)) ||
                d.len / sizeof(struct bs_vring_desc) > BS_MAX_QUEUE_SIZE)
                return -EINVAL;
            const struct bs_vring_desc *it = bs_mem_gpa(m, d.addr, d.len);
            if (!it)
                return -EFAULT;
            return walk(m, it, d.len / sizeof(struct bs_vring_desc), 0, 0, c);
        }
        if (!err)
            err = bs_add_buffer(m, c, &d);
        if (!(d.flags & BS_VRING_DESC_F_NEXT)) {
            if (err)
                c->fault_status = fault_status(m, d.addr, d.len, d.flags);
            return err;
        }
        idx = d.next;
    }
}

int bs_vring_chain(const struct bs_vring *vr, const struct bs_mem *m,
                   uint16_t head, struct bs_chain *c)
{
    c->niov = 0;
    c->nout = 0;
    c->out_len = 0;
    c->in_len = 0;
    c->ndesc = 0;
    c->fault_status = NULL;
    return walk(m, vr->desc, vr->num, head, 1, c);
}

int bs_vring_packed_avail(const struct bs_vring *vr, uint16_t pos, int wrap)
{
    /* safe: pos < num, checked by the caller's position arithmetic */
    uint16_t flags = __atomic_load_n(&vr->pdesc[pos].flags, __ATOMIC_ACQUIRE);
    return !!(flags & BS_PDESC_F_AVAIL) == !!wrap && !!(flags & BS_PDESC_F_USED) != !!wrap;
}

int bs_vring_packed_chain(const struct bs_vring *vr, const struct bs_mem *m,
                          uint16_t pos, struct bs_chain *c, uint16_t *id,
                          uint16_t *ndesc)
{
    int err = 0;

    c->niov = 0;
    c->nout = 0;
    c->out_len = 0;
    c->in_len = 0;
    c->ndesc = 0;
    c->fault_status = NULL;
    *ndesc = 0;
    uint64_t last_addr = 0;     /* the chain's last buffer, for fault_status */
    uint32_t last_len = 0;
    uint16_t last_flags = 0;
    int located = 1;            /* its last buffer is known */
    /* The chain is the run of ring descriptors linked by NEXT; its extent
     * must be known even if a buffer is bad, so keep walking on errors. */
    for (uint32_t n = 0; n < vr->num; n++) {
        struct bs_pdesc d;
        /* safe: pos < num always (wrapped below) */
        memcpy(&d, (const void *)&vr->pdesc[pos], sizeof(d));
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        if (d.flags & BS_VRING_DESC_F_INDIRECT) {
            /* only as the sole descriptor of its chain */
            if (n != 0 || (d.flags & BS_VRING_DESC_F_NEXT)) {
                err = err ? err : -EINVAL;
                located = 0;
            } else if (d.len == 0 || d.len % sizeof(struct bs_pdesc) ||
                       d.len / sizeof(struct bs_pdesc) > BS_MAX_QUEUE_SIZE) {
                err = -EINVAL;
                located = 0;
            } else {
                const struct bs_pdesc *t = bs_mem_gpa(m, d.addr, d.len);
                if (!t) {
                    err = -EFAULT;
                    located = 0;
                } else {
                    /* indirect entries follow each other; NEXT is ignored */
                    for (uint32_t i = 0; i < d.len / sizeof(*t); i++) {
                        struct bs_pdesc e;
                        memcpy(&e, (const void *)&t[i], sizeof(e));
                        c->ndesc++;
                        if (e.flags & BS_VRING_DESC_F_INDIRECT) {
                            err = -EINVAL;
                            located = 0;
                            break;
                        }
                        struct bs_vring_desc sd = { e.addr, e.len, e.flags, 0 };
                        if (!err)
                            err = bs_add_buffer(m, c, &sd);
                        last_addr = e.addr;
                        last_len = e.len;
                        last_flags = e.flags;
                    }
                }
            }
        } else {
            struct bs_vring_desc sd = { d.addr, d.len, d.flags, 0 };
            if (!err)
                err = bs_add_buffer(m, c, &sd);
            last_addr = d.addr;
            last_len = d.len;
            last_flags = d.flags;
        }
        c->ndesc++;
        *id = d.id;
        pos = (uint16_t)((uint32_t)pos + 1 == vr->num ? 0 : pos + 1);
        if (!(d.flags & BS_VRING_DESC_F_NEXT)) {
            *ndesc = (uint16_t)(n + 1);
            if (err && located)
                c->fault_status = fault_status(m, last_addr, last_len, last_flags);
            return err;
        }
    }
    return -EINVAL;     /* NEXT all around the ring: extent unknown */
}
