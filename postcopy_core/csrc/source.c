/* source.c - the source's byte lane: answers plain REQ_PAGES in C, and streams (or pushes) the
 * pages that the Python strategy picked (postcopy_core/strategies.py), requests first.
 *
 * A busy destination sends long runs of REQ_PAGES messages.  This lane decodes them with the one
 * return-path parser (wire.h, pch_rp_parse), answers the plain ones with one-page PAGES/ZERO frames sent in one
 * sendmsg, and stops at the first message of any other type, a partial one or a wrong one, which
 * postcopy_core/protocol.py's reader then parses again (the same parser) and acts on, errors included. */
#define _GNU_SOURCE
#include "pch.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "wire.h"

#define BATCH 256 /* pages per sendmsg: 2 iovecs each, under IOV_MAX */
#define SPIN_NS 20000u /* poll this long (yielding) for the next request before sleeping in poll */

/* a PAGES/ZERO header: n pages from page `first` */
static void frame_header(struct pch_frame_hdr *h, int zero, uint8_t flags, uint64_t first, uint64_t n,
                         uint64_t page_size)
{
    h->type = zero ? PCH_MSG_ZERO : PCH_MSG_PAGES;
    h->flags = flags;
    h->count = htobe16((uint16_t)n);
    h->payload_len = htobe32(zero ? 0 : (uint32_t)(n * page_size));
    h->offset = htobe64(first * page_size);
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

#define SPLICE_MIN (1u << 20) /* pages this big are handed to the socket by reference, not copied */

/* Send [p, p+len) of the image without copying it: vmsplice puts references to its pages in a pipe,
 * splice moves them into the socket (whose buffers then point at our pages; the receiver's recv is
 * the one copy).  Safe because the image does not change during postcopy.  -EOPNOTSUPP when this
 * kernel or socket cannot (nothing was sent: the caller copies); another -errno once bytes went out. */
static int splice_out(int fd, const uint8_t *p, uint64_t len)
{
    static int pipefd[2] = { -1, -1 }, broken;
    static uint64_t chunk;
    if (broken)
        return -EOPNOTSUPP;
    if (pipefd[0] < 0) {
        if (pipe2(pipefd, O_CLOEXEC)) {
            broken = 1;
            return -EOPNOTSUPP;
        }
        fcntl(pipefd[1], F_SETPIPE_SZ, 1 << 20); /* best effort: the default 64 KiB works too */
        int sz = fcntl(pipefd[1], F_GETPIPE_SZ);
        chunk = sz > 0 ? (uint64_t)sz : 65536;
    }
    int sent = 0;
    while (len) {
        struct iovec v = { (void *)p, len < chunk ? len : chunk };
        ssize_t in = vmsplice(pipefd[1], &v, 1, 0);
        if (in < 0) {
            if (errno == EINTR)
                continue;
            if (!sent) {
                broken = 1;
                return -EOPNOTSUPP;
            }
            return -errno;
        }
        while (in > 0) {
            ssize_t out = splice(pipefd[0], NULL, fd, NULL, (size_t)in, SPLICE_F_MOVE | SPLICE_F_MORE);
            if (out < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    struct pollfd w = { fd, POLLOUT, 0 };
                    poll(&w, 1, -1);
                    continue;
                }
                if (!sent) { /* the pages still sit in the pipe: drop them, the caller copies */
                    close(pipefd[0]);
                    close(pipefd[1]);
                    pipefd[0] = pipefd[1] = -1;
                    broken = 1;
                    return -EOPNOTSUPP;
                }
                return -errno;
            }
            sent = 1;
            in -= out;
            p += out;
            len -= (uint64_t)out;
        }
    }
    return 0;
}

/* One sendmsg's worth of one-page frames (header + data iovecs), sent when full or at the end. */
struct frames {
    struct pch_frame_hdr hdr[BATCH];
    struct iovec iov[2 * BATCH];
    int nh, ni;
};

static int send_frames(struct pch_source *s, struct frames *f)
{
    int rc = f->ni ? send_all(s->fd, f->iov, f->ni) : 0;
    f->nh = f->ni = 0;
    return rc;
}

/* Queue page p as a one-page frame on s->fd and mark it sent there; 0 or -errno. */
static int add_page(struct pch_source *s, struct frames *f, uint64_t p, uint8_t flags)
{
    s->sent[p] = PCH_SENT_URGENT;
    int zero = s->zero[p];
    struct pch_frame_hdr *h = &f->hdr[f->nh++];
    frame_header(h, zero, flags, p, 1, s->page_size);
    f->iov[f->ni++] = (struct iovec){ h, sizeof *h };
    s->bytes_sent += PCH_HDR_SIZE;
    if (zero) {
        s->pages_zero++;
    } else if (s->page_size >= SPLICE_MIN) { /* a huge page: the frames so far, then its bytes by reference */
        int rc = send_frames(s, f);
        if (rc)
            return rc;
        rc = splice_out(s->fd, s->image + p * s->page_size, s->page_size);
        if (rc == -EOPNOTSUPP) {
            struct iovec one = { (void *)(s->image + p * s->page_size), s->page_size };
            rc = send_all(s->fd, &one, 1);
        }
        if (rc)
            return rc;
        s->bytes_sent += s->page_size;
        return 0;
    } else {
        f->iov[f->ni++] = (struct iovec){ (void *)(s->image + p * s->page_size), s->page_size };
        s->bytes_sent += s->page_size;
    }
    return f->nh == BATCH ? send_frames(s, f) : 0;
}

int64_t pch_source_answer(struct pch_source *s, const uint8_t *buf, uint64_t len)
{
    struct frames f;
    f.nh = f.ni = 0;
    uint64_t pos = 0;
    if (!s->id_known)
        return 0; /* the Python reader holds part of a message, or no REQ_PAGES_ID came yet */
    for (;;) {
        struct pch_rp_msg m;
        int64_t n = pch_rp_parse(s->rp, buf + pos, len - pos, &m);
        if (n <= 0 || m.type != PCH_RP_REQ_PAGES)
            break; /* not the plain case: the Python reader takes it from here */
        pos += (uint64_t)n;
        uint64_t off = m.offset, length = m.length;
        s->requests++;
        if (s->requested && s->requested_len < s->requested_cap)
            s->requested[s->requested_len++] = (uint32_t)(off / s->page_size);
        for (uint64_t p = off / s->page_size; p < (off + length) / s->page_size; p++) {
            if (s->sent[p])
                s->requested_already_sent++;
            if (s->sent[p] == PCH_SENT_URGENT || (s->sent[p] && !s->resend_streamed))
                continue; /* on its way */
            s->pages_urgent++;
            int rc = add_page(s, &f, p, PCH_FLAG_URGENT);
            if (rc)
                return rc;
        }
    }
    int rc = send_frames(s, &f);
    return rc ? rc : (int64_t)pos;
}

int64_t pch_source_push(struct pch_source *s, const uint32_t *pages, uint64_t n)
{
    struct frames f;
    f.nh = f.ni = 0;
    uint64_t npages = s->ram_size / s->page_size, pushed = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (pages[i] >= npages)
            return -EINVAL;
        if (s->sent[pages[i]] == PCH_SENT_URGENT || (s->sent[pages[i]] && !s->resend_streamed))
            continue; /* like an answer: a small page on the stream may sit behind its backlog */
        pushed++;
        int rc = add_page(s, &f, pages[i], 0);
        if (rc)
            return rc;
    }
    int rc = send_frames(s, &f);
    s->pages_pushed += pushed;
    return rc ? rc : (int64_t)pushed;
}

#define GO_ON (-4096) /* serve_requests: nothing for the caller, keep pumping (below every -errno) */

/* Read what the return path has and answer it: GO_ON, a PCH_SERVE_* to return, or -errno. */
static int serve_requests(struct pch_source *s, struct pch_pump *p)
{
    uint8_t buf[1 << 16];
    ssize_t n = recv(p->rp_fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? GO_ON : -errno;
    if (n == 0)
        return PCH_SERVE_EOF;
    int64_t used = pch_source_answer(s, buf, (uint64_t)n);
    if (used < 0)
        return (int)used;
    if (used < n) {
        p->rest_len = (uint64_t)(n - used);
        memcpy(p->rest, buf + used, p->rest_len);
        return PCH_SERVE_REST;
    }
    return GO_ON;
}

/* The next stream frame: consecutive unsent pages of one kind from order[pos..], into p->part. */
static int next_frame(struct pch_source *s, struct pch_pump *p)
{
    while (p->pos < p->norder && s->sent[p->order[p->pos]])
        p->pos++;
    if (p->pos >= p->norder)
        return 0;
    uint64_t first = p->order[p->pos], n = 0, npages = s->ram_size / s->page_size;
    if (first >= npages)
        return -EINVAL;
    int zero = s->zero[first];
    while (p->pos < p->norder && n < p->max_run) {
        uint64_t pg = p->order[p->pos];
        if (pg != first + n || s->sent[pg] || s->zero[pg] != zero)
            break;
        s->sent[pg] = PCH_SENT_STREAM;
        n++;
        p->pos++;
    }
    frame_header(&p->hdr, zero, 0, first, n, s->page_size);
    p->part[0] = (const uint8_t *)&p->hdr;
    p->part_len[0] = sizeof p->hdr;
    p->part[1] = s->image + first * s->page_size;
    p->part_len[1] = zero ? 0 : n * s->page_size;
    s->pages_stream += n;
    if (zero)
        s->pages_zero += n;
    s->bytes_sent += PCH_HDR_SIZE + p->part_len[1];
    return 1;
}

/* The stream's big payloads by reference too (see splice_out), without blocking: bytes taken into
 * the pipe but not yet into the socket wait there for the next call (the frame is not done, so no
 * other frame starts).  1 when the payload is all in the socket, 0 when the socket is full,
 * -EOPNOTSUPP (nothing of it taken) to copy instead. */
static struct { int fd[2], broken, worked; uint64_t in_pipe, chunk; } stream_pipe = { { -1, -1 }, 0, 0, 0, 0 };

static int splice_part(struct pch_pump *p)
{
    typeof(stream_pipe) *sp = &stream_pipe;
    if (sp->broken)
        return -EOPNOTSUPP;
    if (sp->fd[0] < 0) {
        if (pipe2(sp->fd, O_CLOEXEC)) {
            sp->broken = 1;
            return -EOPNOTSUPP;
        }
        fcntl(sp->fd[1], F_SETPIPE_SZ, 1 << 20);
        int sz = fcntl(sp->fd[1], F_GETPIPE_SZ);
        sp->chunk = sz > 0 ? (uint64_t)sz : 65536;
    }
    for (;;) {
        if (sp->in_pipe) {
            ssize_t out = splice(sp->fd[0], NULL, p->stream_fd, NULL, (size_t)sp->in_pipe,
                                 SPLICE_F_MOVE | SPLICE_F_MORE | SPLICE_F_NONBLOCK);
            if (out < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    return 0;
                if (sp->worked)
                    return -errno;
                /* never worked here: take the bytes back from the pipe's count, copy instead */
                p->part[1] -= sp->in_pipe;
                p->part_len[1] += sp->in_pipe;
                sp->in_pipe = 0;
                close(sp->fd[0]);
                close(sp->fd[1]);
                sp->fd[0] = sp->fd[1] = -1;
                sp->broken = 1;
                return -EOPNOTSUPP;
            }
            sp->worked = 1;
            sp->in_pipe -= (uint64_t)out;
            continue;
        }
        if (!p->part_len[1])
            return 1;
        struct iovec v = { (void *)p->part[1], p->part_len[1] < sp->chunk ? p->part_len[1] : sp->chunk };
        ssize_t in = vmsplice(sp->fd[1], &v, 1, 0);
        if (in < 0) {
            if (errno == EINTR)
                continue;
            if (sp->worked)
                return -errno;
            sp->broken = 1;
            return -EOPNOTSUPP;
        }
        p->part[1] += in;
        p->part_len[1] -= (uint64_t)in;
        sp->in_pipe += (uint64_t)in;
    }
}

/* Write as much of the current frame as the stream socket takes; 1 when it went whole. */
static int write_part(struct pch_pump *p)
{
    while (p->part_len[0] + p->part_len[1] + stream_pipe.in_pipe) {
        if (!p->part_len[0] && (stream_pipe.in_pipe || p->part_len[1] >= SPLICE_MIN)) {
            int rc = splice_part(p);
            if (rc != -EOPNOTSUPP)
                return rc;
        }
        struct iovec iov[2];
        int n = 0;
        for (int i = 0; i < 2; i++)
            if (p->part_len[i])
                iov[n++] = (struct iovec){ (void *)p->part[i], p->part_len[i] };
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(p->stream_fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 0 : -errno;
        }
        for (int i = 0; i < 2 && w > 0; i++) {
            uint64_t k = (uint64_t)w < p->part_len[i] ? (uint64_t)w : p->part_len[i];
            p->part[i] += k;
            p->part_len[i] -= k;
            w -= (ssize_t)k;
        }
    }
    return 1;
}

int pch_pump_finish(struct pch_pump *p)
{
    for (;;) {
        int rc = write_part(p);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        struct pollfd pfd = { p->stream_fd, POLLOUT, 0 };
        if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
            return -errno;
    }
}

int pch_source_pump(struct pch_source *s, struct pch_pump *p)
{
    if (p->cap < (1 << 16))
        return -EINVAL;
    for (;;) {
        int pending = p->part_len[0] + p->part_len[1] + stream_pipe.in_pipe > 0;
        if (!pending && p->order && p->pos >= p->norder)
            return PCH_SERVE_MORE;
        int streaming = p->order != NULL;
        struct pollfd fds[3] = { { p->rp_fd, POLLIN, 0 }, { p->ctl_fd, POLLIN, 0 }, { p->stream_fd, POLLOUT, 0 } };
        /* Demand paging, the next request is usually a few microseconds away: look for it a while
         * before sleeping, as the handler does for faults, so that neither waits for the other's
         * CPU to wake from idle (unpinned, 1 vCPU: p50 25 -> 18 us).  sched_yield between looks:
         * a vCPU or the handler on this CPU goes first.  Not with a stream due: the spin took CPU
         * from the vCPUs and the stream (prepage/preempt tests saw the difference). */
        int ready = 0;
        if (p->spin && !streaming)
            for (uint64_t until = pch_now_ns() + SPIN_NS; !(ready = poll(fds, 2, 0)) && pch_now_ns() < until;)
                sched_yield();
        if (!ready && poll(fds, streaming ? 3 : 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[0].revents) { /* requests first: an urgent page must not wait for the stream */
            /* one channel: the answer queues behind the frame in flight, never inside it */
            int rc = s->fd == p->stream_fd ? pch_pump_finish(p) : 0;
            if (rc < 0)
                return rc;
            rc = serve_requests(s, p);
            if (rc != GO_ON)
                return rc;
            if (s->requested_len)
                return PCH_SERVE_REQUESTS;
        }
        if (fds[1].revents)
            return PCH_SERVE_CONTROL;
        if (streaming && fds[2].revents) {
            /* one frame per turn, so the return path is looked at between frames */
            if (!pending) {
                int rc = next_frame(s, p);
                if (rc < 0)
                    return rc;
                if (rc == 0)
                    continue;
            }
            int rc = write_part(p);
            if (rc < 0)
                return rc;
        }
    }
}
