/* Dirty logging in the virtqueue transport (live migration, VHOST_F_LOG_ALL):
 * what the device wrote into guest memory, marked in the frontend's log
 * after the write and before the used entry that makes it visible
 * (mem.c keeps the log and turns host addresses into guest pages). */
#include "queue.h"

/* Dirty logging: the guest memory a finished request made the device
 * write (read data, the GET_ID serial), before its used entry is pushed.
 * A read's data iovecs are what its last transfer filled: the pieces of a
 * short transfer before it were marked as they came (bs_q_log_partial). */
void bs_q_log_request(struct bs_queue *q, const struct bs_io *io)
{
    const struct bs_chain *c = &io->chain;
    if (io->req.type == BS_BLK_T_GET_ID) {
        for (int i = c->nout; i < c->niov; i++)
            bs_log_write(q->mem, c->iov[i].iov_base, c->iov[i].iov_len);
    } else if (io->req.op == BS_OP_READ) {
        for (int i = io->req.iov_first; i < io->req.iov_first + io->req.iov_count; i++)
            bs_log_write(q->mem, c->iov[i].iov_base, c->iov[i].iov_len);
    }
}

/* Dirty logging: a read's short transfer put BYTES into the front of its
 * data iovecs, which the core is about to move past: mark them now (the
 * data is in guest memory; its used entry comes later). */
void bs_q_log_partial(struct bs_queue *q, const struct bs_io *io, size_t bytes)
{
    const struct iovec *v = &io->chain.iov[io->req.iov_first];
    for (int i = 0; i < io->req.iov_count && bytes > 0; i++) {
        size_t n = v[i].iov_len < bytes ? v[i].iov_len : bytes;
        bs_log_write(q->mem, v[i].iov_base, n);
        bytes -= n;
    }
}

/* Dirty logging: the ring memory the device writes (split: the used ring
 * with avail_event; packed: the descriptors written back and the device
 * event area), marked after the writes. */
void bs_q_log_rings(struct bs_queue *q)
{
    if (__builtin_expect(__atomic_load_n(&q->mem->log, __ATOMIC_ACQUIRE) == NULL, 1))
        return;
    if (q->vr.packed) {
        bs_log_write(q->mem, q->vr.pdesc, sizeof(struct bs_pdesc) * q->vr.num);
        bs_log_write(q->mem, q->vr.device_evt, sizeof(struct bs_pevent));
    } else {
        bs_log_write(q->mem, q->vr.used, 4 + 8ULL * q->vr.num + 2);
    }
}
