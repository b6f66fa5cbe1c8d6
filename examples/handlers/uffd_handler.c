/* uffd_handler.c - a small userfaultfd page server for snapshot restore, Firecracker's hand-off.
 *
 *   cc -O2 -o uffd_handler uffd_handler.c
 *   postcopy-harness run --handler ./uffd_handler --handoff firecracker --vcpus 64
 *
 * Started as `uffd_handler SOCKET MEMFILE`: it listens on SOCKET; each connection brings one
 * userfaultfd (SCM_RIGHTS) and a JSON list of the regions it covers (base_host_virt_addr, size,
 * offset into MEMFILE, page_size; older senders give page_size_kib). One poll loop serves the
 * listener and every uffd received so far: the harness connects once per vCPU process, because each
 * of them has a uffd of its own.
 *
 * Where the kernel bites (see docs/handler-protocol.md):
 *  - a copy through one uffd wakes only the threads waiting on that uffd. Another vCPU waiting on
 *    the same page has its own fault message queued on its own uffd: when we read it, the copy
 *    fails with EEXIST (the page is there already) and we must UFFDIO_WAKE that uffd, or it sleeps
 *    for ever. EEXIST is not success.
 *  - EAGAIN: the address space behind that uffd is changing (a REMOVE, fork, remap or unmap event is
 *    queued and not yet read). Nothing was placed; read the events first, then retry. Spinning on
 *    the copy without reading them never ends.
 *  - a copy may place fewer bytes than asked (uffdio_copy.copy): the rest is still missing.
 *  - ESRCH: the process behind that uffd is gone: forget the uffd.
 *  - a REMOVE event drops pages; a later fault there must get a zero page, not the file's bytes
 *    (the guest gave the page up, as a balloon does). The memory is shared: whichever uffd faults on
 *    that page next, it gets zeros.
 *  - a FORK event carries a new uffd, for the child's address space: serve it like the others.
 *  - a REMAP event (mremap) moves a piece of a region: its faults come at the new address now and
 *    are served from the same file offsets. An UNMAP event drops what we knew of the range; when it
 *    is mapped back and registered again on the same uffd, its faults are served as before.
 *
 * The broken_*.c files next to this one define one BROKEN_* macro and include this file: each
 * makes one of the mistakes above on purpose, so that the harness's checks can be seen to catch it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_UFFDS 8192
#define MAX_DEFERRED 65536

struct region {
    uint64_t base, size, offset, page_size;
};

#define MAX_MOVED 4

/* a piece of the region that mremap moved (UFFD_EVENT_REMAP): its pages now fault at base */
struct moved {
    uint64_t base, len, offset;
};

struct port {
    int fd;
    struct region r; /* one region per uffd here; a real VMM may send several */
    int nmoved;
    struct moved m[MAX_MOVED];
#ifdef BROKEN_UNMAP
    int ngone;
    uint64_t gone[MAX_MOVED][2]; /* the ranges UNMAP events took, taken as gone for good */
#endif
};

struct deferred {
    int port;
    uint64_t addr;
};

static struct port ports[MAX_UFFDS];
static int nports;
static const uint8_t *mem;
static uint64_t mem_size;
static uint8_t *removed; /* per 4 KiB of the memory file: dropped by a REMOVE event, zeros on its next fault */
static struct deferred later[MAX_DEFERRED];
static int nlater;

static void die(const char *what)
{
    fprintf(stderr, "uffd_handler: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* the value after "key": in a flat JSON object (enough for Firecracker's region mapping) */
static int json_u64(const char *json, const char *key, uint64_t *out)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(json, pat);
    if (!p)
        return -1;
    p = strchr(p + strlen(pat), ':');
    if (!p)
        return -1;
    *out = strtoull(p + 1, NULL, 10);
    return 0;
}

static void accept_uffd(int listener)
{
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0)
        return;
    char body[8192] = {0}, ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = body, .iov_len = sizeof body - 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    ssize_t n = recvmsg(conn, &m, MSG_CMSG_CLOEXEC);
    struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&m) : NULL;
    if (!c || c->cmsg_type != SCM_RIGHTS || nports == MAX_UFFDS) {
        fprintf(stderr, "uffd_handler: a connection without a uffd, dropped\n");
        close(conn);
        return;
    }
    struct port *p = &ports[nports];
    memcpy(&p->fd, CMSG_DATA(c), sizeof(int));
    uint64_t kib = 0;
    if (json_u64(body, "base_host_virt_addr", &p->r.base) || json_u64(body, "size", &p->r.size) ||
        json_u64(body, "offset", &p->r.offset)) {
        fprintf(stderr, "uffd_handler: region mapping without base_host_virt_addr/size/offset: %s\n", body);
        exit(1);
    }
    if (json_u64(body, "page_size", &p->r.page_size) && !json_u64(body, "page_size_kib", &kib))
        p->r.page_size = kib * 1024;
    if (!p->r.page_size || p->r.offset + p->r.size > mem_size) {
        fprintf(stderr, "uffd_handler: the region does not fit the memory file\n");
        exit(1);
    }
    fcntl(p->fd, F_SETFL, fcntl(p->fd, F_GETFL) | O_NONBLOCK); /* poll() on a uffd needs it */
    nports++;
    close(conn); /* the uffd is ours now; the sender keeps its own end of the socket */
}

/* a forked child's uffd: the child's address space is a copy of its parent's, same regions, same moves */
static void add_forked(int fd, const struct port *parent)
{
    if (nports == MAX_UFFDS) {
        fprintf(stderr, "uffd_handler: too many uffds\n");
        exit(1);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    ports[nports] = *parent; /* its regions and moved pieces too */
    ports[nports++].fd = fd;
}

static void forget(int i)
{
    if (ports[i].fd >= 0)
        close(ports[i].fd);
    ports[i].fd = -1;
}

static void defer(int i, uint64_t addr)
{
    if (nlater == MAX_DEFERRED) {
        fprintf(stderr, "uffd_handler: too many deferred faults\n");
        exit(1);
    }
    later[nlater++] = (struct deferred){i, addr};
}

/* the memory file offset behind addr in port i's address space, or -1 if nothing of ours is there */
static int64_t file_offset(const struct port *p, uint64_t addr)
{
    for (int k = 0; k < p->nmoved; k++) /* a moved piece: it left a hole at its old place */
        if (addr >= p->m[k].base && addr < p->m[k].base + p->m[k].len)
            return (int64_t)(p->m[k].offset + (addr - p->m[k].base));
#ifdef BROKEN_UNMAP
    for (int k = 0; k < p->ngone; k++)
        if (addr >= p->gone[k][0] && addr < p->gone[k][1])
            return -1; /* "unmapped, so not ours any more": the range mapped back and registered again starves */
#endif
    if (addr >= p->r.base && addr < p->r.base + p->r.size)
        return (int64_t)(p->r.offset + (addr - p->r.base));
    return -1;
}

/* UFFD_EVENT_REMAP: [from, from + len) now lives at to (the registration moved with it) */
static void remapped(struct port *p, uint64_t from, uint64_t to, uint64_t len)
{
    int64_t off = file_offset(p, from);
    if (off < 0)
        return;
    for (int k = 0; k < p->nmoved; k++)
        if (p->m[k].base == from) { /* moved again */
            p->m[k] = (struct moved){to, len, (uint64_t)off};
            return;
        }
    if (p->nmoved == MAX_MOVED) {
        fprintf(stderr, "uffd_handler: too many moved pieces\n");
        exit(1);
    }
    p->m[p->nmoved++] = (struct moved){to, len, (uint64_t)off};
}

/* UFFD_EVENT_UNMAP: [start, end) is no longer mapped. A moved piece there is gone; a range of the
 * region comes back, if at all, mapped again at the same address and file offset and registered
 * again (docs/handler-protocol.md), so its later faults are served as before. Faults put off there
 * are dropped: nothing waits on an address that is not mapped. */
static void unmapped(int i, uint64_t start, uint64_t end)
{
    struct port *p = &ports[i];
    int keep = 0;
    for (int k = 0; k < p->nmoved; k++)
        if (p->m[k].base >= end || p->m[k].base + p->m[k].len <= start)
            p->m[keep++] = p->m[k];
    p->nmoved = keep;
    keep = 0;
    for (int k = 0; k < nlater; k++)
        if (later[k].port != i || later[k].addr < start || later[k].addr >= end)
            later[keep++] = later[k];
    nlater = keep;
#ifdef BROKEN_UNMAP
    if (p->ngone < MAX_MOVED)
        p->gone[p->ngone][0] = start, p->gone[p->ngone++][1] = end;
#endif
}

/* place the page holding addr through port i; 0 done, 1 try again after reading events */
static int serve(int i, uint64_t addr)
{
    struct port *p = &ports[i];
    uint64_t ps = p->r.page_size;
    int64_t at = file_offset(p, addr);
    if (at < 0) {
        fprintf(stderr, "uffd_handler: a fault at 0x%llx, in no region of this uffd: left unserved\n",
                (unsigned long long)addr);
        return 0;
    }
    uint64_t src_off = (uint64_t)at / ps * ps, dst = addr / ps * ps;
    int via = i;
#ifdef BROKEN_OFFSET
    src_off = p->r.offset + ((src_off - p->r.offset) / ps + 1) % (p->r.size / ps) * ps; /* the page after */
#endif
#ifdef BROKEN_EAGAIN
    via = (i + 1) % nports; /* copy through another vCPU's uffd (the memfd is shared), then wake the faulter */
#endif
#ifndef BROKEN_REMOVE
    if (removed[src_off / 4096]) { /* the guest dropped it: it reads zeros now, not the file */
        struct uffdio_zeropage z = {.range = {.start = dst, .len = ps}};
        int rc = ioctl(p->fd, UFFDIO_ZEROPAGE, &z);
        if (rc == 0 || errno == EEXIST) {
            if (rc) {
                struct uffdio_range w = {.start = dst, .len = ps};
                ioctl(p->fd, UFFDIO_WAKE, &w);
            }
            removed[src_off / 4096] = 0;
            return 0;
        }
        if (errno == EAGAIN)
            return 1;
        if (errno == ESRCH) {
            forget(i);
            return 0;
        }
        die("UFFDIO_ZEROPAGE");
    }
#endif
    uint64_t done = 0;
    while (done < ps) {
        if (ports[via].fd < 0)
            via = i;
        struct uffdio_copy cp = {.dst = dst + done, .src = (uint64_t)(uintptr_t)(mem + src_off + done),
                                 .len = ps - done, .mode = via == i ? 0 : UFFDIO_COPY_MODE_DONTWAKE};
        if (ioctl(ports[via].fd, UFFDIO_COPY, &cp) == 0) {
            done += (uint64_t)cp.copy;
            continue;
        }
        if (cp.copy > 0) /* a partial copy: the rest is still missing */
            done += (uint64_t)cp.copy;
        if (errno == EEXIST) {
#ifdef BROKEN_EEXIST
            return 0; /* "already there, nothing to do": the faulter is never woken */
#endif
            break; /* someone placed it: wake our waiter below */
        }
        if (errno == EAGAIN) {
#ifdef BROKEN_EAGAIN
            return 0; /* dropped: nothing placed, nobody woken */
#endif
            if (done)
                break; /* part is in: the faulter refaults on the rest */
            return 1;
        }
        if (errno == ESRCH) {
            forget(via);
            return via == i ? 0 : serve(i, addr);
        }
        die("UFFDIO_COPY");
    }
    struct uffdio_range w = {.start = dst, .len = ps};
    if (via != i || done < ps) /* the copy woke only its own uffd's waiters, or none (EEXIST) */
        if (ioctl(p->fd, UFFDIO_WAKE, &w) && errno == ESRCH)
            forget(i);
    return 0;
}

static void read_port(int i)
{
    struct uffd_msg msgs[64];
    for (;;) {
        ssize_t n = read(ports[i].fd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN) /* poll said readable, another read got there first */
                return;
            forget(i);
            return;
        }
        for (ssize_t k = 0; k < n / (ssize_t)sizeof msgs[0]; k++) {
            struct uffd_msg *msg = &msgs[k];
            if (msg->event == UFFD_EVENT_PAGEFAULT) {
                if (serve(i, msg->arg.pagefault.address))
                    defer(i, msg->arg.pagefault.address);
            } else if (msg->event == UFFD_EVENT_REMOVE) {
#ifndef BROKEN_REMOVE
                struct port *p = &ports[i];
                for (uint64_t a = msg->arg.remove.start; a < msg->arg.remove.end; a += p->r.page_size) {
                    int64_t off = file_offset(p, a);
                    if (off >= 0)
                        removed[off / 4096] = 1;
                }
#endif
            } else if (msg->event == UFFD_EVENT_FORK) {
#ifdef BROKEN_FORK
                (void)add_forked; /* the child's uffd is left open and never read */
#else
                add_forked((int)msg->arg.fork.ufd, &ports[i]);
#endif
            } else if (msg->event == UFFD_EVENT_REMAP) {
#ifdef BROKEN_UNMAP
                (void)remapped; /* the moved piece is not followed */
#else
                remapped(&ports[i], msg->arg.remap.from, msg->arg.remap.to, msg->arg.remap.len);
#endif
            } else if (msg->event == UFFD_EVENT_UNMAP) {
                unmapped(i, msg->arg.remove.start, msg->arg.remove.end);
            }
        }
        if (ports[i].fd < 0)
            return;
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MEMFILE\n", argv[0]);
        return 2;
    }
    int mfd = open(argv[2], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (mfd < 0 || fstat(mfd, &st))
        die(argv[2]);
    mem_size = (uint64_t)st.st_size;
    mem = mmap(NULL, mem_size, PROT_READ, MAP_PRIVATE, mfd, 0);
    if (mem == MAP_FAILED)
        die("mmap(memory file)");
    if (!(removed = calloc(mem_size / 4096 + 1, 1)))
        die("calloc");
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    unlink(argv[1]);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4096))
        die(argv[1]);
    static struct pollfd pfd[MAX_UFFDS + 1];
    for (;;) {
        pfd[0] = (struct pollfd){.fd = ls, .events = POLLIN};
        for (int i = 0; i < nports; i++)
            pfd[i + 1] = (struct pollfd){.fd = ports[i].fd, .events = POLLIN};
        if (poll(pfd, (nfds_t)nports + 1, nlater ? 1 : -1) < 0 && errno != EINTR)
            die("poll");
        if (pfd[0].revents & POLLIN)
            accept_uffd(ls);
        for (int i = 0; i < nports; i++)
            if (ports[i].fd >= 0 && pfd[i + 1].revents & (POLLIN | POLLERR | POLLHUP))
                read_port(i);
        int keep = 0; /* events are read now: retry what EAGAIN put off */
        int todo = nlater;
        nlater = 0;
        for (int k = 0; k < todo; k++)
            if (ports[later[k].port].fd >= 0 && serve(later[k].port, later[k].addr))
                later[keep++] = later[k];
        nlater = keep;
    }
}
