/* source.c - the source's hot path: answer a run of plain REQ_PAGES messages in C.
 *
 * A busy destination sends long runs of identical REQ_PAGES messages (be16 type 4, be16 len 12,
 * be64 offset, be32 length).  This lane answers exactly those, with one-page PAGES/ZERO frames
 * sent in one sendmsg, and stops at the first message of any other shape (or a partial one),
 * which the Python parser (postcopy_core/protocol.py) then handles, errors included. */
#define _GNU_SOURCE
#include "pch.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define REQ_SIZE 16
#define HDR_SIZE 16
#define BATCH 256 /* pages per sendmsg: 2 iovecs each, under IOV_MAX */

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

static void put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = v & 0xff;
}

/* send every byte of iov[0..n), waiting for room when the socket is full */
static int send_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -errno;
            struct pollfd p = { fd, POLLOUT, 0 };
            poll(&p, 1, -1);
            continue;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

int64_t pch_source_answer(struct pch_source *s, const uint8_t *buf, uint64_t len)
{
    uint8_t hdr[BATCH][HDR_SIZE];
    struct iovec iov[2 * BATCH];
    int nh = 0, ni = 0;
    uint64_t pos = 0;
    for (; len - pos >= REQ_SIZE; pos += REQ_SIZE) {
        const uint8_t *m = buf + pos;
        uint64_t off = be(m + 4, 8), length = be(m + 12, 4);
        if (be(m, 2) != 4 || be(m + 2, 2) != 12 || off % s->page_size || !length || length % s->page_size ||
            off + length > s->ram_size || off + length < off)
            break; /* not the plain case: the Python parser takes it from here */
        s->requests++;
        for (uint64_t p = off / s->page_size; p < (off + length) / s->page_size; p++) {
            if (s->sent[p]) {
                s->requested_already_sent++; /* already on its way in the background stream */
                continue;
            }
            s->sent[p] = 1;
            int zero = s->zero[p];
            uint8_t *h = hdr[nh++];
            h[0] = zero ? 3 : 2; /* ZERO or PAGES */
            h[1] = 1;            /* URGENT */
            put_be(h + 2, 1, 2);
            put_be(h + 4, zero ? 0 : s->page_size, 4);
            put_be(h + 8, p * s->page_size, 8);
            iov[ni++] = (struct iovec){ h, HDR_SIZE };
            s->bytes_sent += HDR_SIZE;
            s->pages_urgent++;
            if (zero) {
                s->pages_zero++;
            } else {
                iov[ni++] = (struct iovec){ (void *)(s->image + p * s->page_size), s->page_size };
                s->bytes_sent += s->page_size;
            }
            if (nh == BATCH) {
                int rc = send_all(s->fd, iov, ni);
                if (rc)
                    return rc;
                nh = ni = 0;
            }
        }
    }
    if (ni) {
        int rc = send_all(s->fd, iov, ni);
        if (rc)
            return rc;
    }
    return (int64_t)pos;
}

/* Serve the return path in C while there is nothing else to do (no background stream): poll the
 * return path and the control socket, answer plain REQ_PAGES runs.  Returns
 *   PCH_SERVE_CONTROL  the control socket is readable (Python reads the command)
 *   PCH_SERVE_REST     bytes the lane does not take (a partial or other message) are in rest[0..*rest_len)
 *   PCH_SERVE_EOF      the destination closed the return path
 * or -errno. */
int pch_source_serve(struct pch_source *s, int rp_fd, int ctl_fd, uint8_t *rest, uint64_t cap, uint64_t *rest_len)
{
    uint8_t buf[1 << 16];
    if (cap < sizeof buf)
        return -EINVAL;
    for (;;) {
        struct pollfd p[2] = { { rp_fd, POLLIN, 0 }, { ctl_fd, POLLIN, 0 } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents)
            return PCH_SERVE_CONTROL;
        if (!p[0].revents)
            continue;
        ssize_t n = recv(rp_fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return PCH_SERVE_EOF;
        int64_t used = pch_source_answer(s, buf, (uint64_t)n);
        if (used < 0)
            return (int)used;
        if (used < n) {
            *rest_len = (uint64_t)(n - used);
            memcpy(rest, buf + used, *rest_len);
            return PCH_SERVE_REST;
        }
    }
}
