/* dest.c - the destination's loop and its protocol steps (API in dest.h).
 *
 * What lives in C, and why: the whole per-fault path, loop included.  pch_dest_run is one loop; a
 * turn waits for the fds (spinning briefly first), serves the uffds and the urgent channel, then
 * takes one step of the stream, and every step returns to it: a receive stops between stream
 * frames (and after a big frame) and leaves the rest held in its buffer for the next turn.  The
 * steps, one function each: read_faults, request_page, place_page, place_zero, wake_sharers,
 * discard, send_received_map, resume.  In C because a fault is served in a few microseconds, about
 * what one trip through the interpreter and cffi costs, and a loop split between the two languages
 * would make that trip per fault and per page; the GIL is not held while it runs.
 * Python (postcopy_core/handler.py) keeps what is not per fault: it sets up the fds and the
 * epoll sets, chooses the policy (struct pch_dest_policy, DestPolicy there), ships the event
 * records, watches the clock and the control line, and drives recovery. */
#define _GNU_SOURCE
#include "dest.h"
#include "pch.h"
#include "wire.h"

#include <endian.h>
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct waiter { int32_t port, next; };

/* a page channel's receive buffer: unread bytes in [start, end) */
struct rxbuf {
    uint8_t *buf;
    uint64_t cap, start, end;
    int drained; /* the last recv took less than it could */
    int held;    /* [start, end) begins with a whole frame: the parse stopped to let the loop serve faults */
    /* --place continue: a PAGES frame whose payload is being received straight into guest RAM */
    uint64_t dfirst, dcount, dlen, dgot;
    int durgent, direct;
    uint8_t *scratch; /* where the bytes of a page placed meanwhile go instead (on_direct) */
};

/* a PAGES frame that pch_dest_on_data found valid but incomplete (its header read, not all its payload) */
struct partial { uint64_t first, count, plen; int urgent, valid; };

#define PLANT_SLOTS 16         /* run --plant-bug: pages copied aside at most */

struct pch_dest {
    struct pch_dest_policy pol; /* the tunables (dest.h), copied at pch_dest_new */
    uint64_t ps, npages;
    unsigned shift;
    uint8_t *received;
    struct pch_port *ports, *carrier;
    int nports;
    const uint32_t *tids;       /* sorted, for a binary search: ptid -> vCPU */
    const int32_t *tid_vcpu;
    int ntids;
    int hugetlb, wake_all;
    uint64_t zero_page;
    char idstr[256];
    int sent_id, hello[2], eos[2];
    /* waiters: per page the head of a list in `pool` (-1: not requested); free list in pool */
    int32_t *head;
    struct waiter *pool;
    int32_t pool_cap, pool_free;
    /* pages to request, in fault order; flushed into req by pch_dest_on_uffd */
    uint8_t *req;
    uint64_t req_len, req_cap, req_sent; /* [req_sent, req_len): queued until the return path has room */
    int out_armed;                        /* the main epoll set waits for room on the return path too */
    uint8_t *ev;
    uint64_t ev_len, ev_cap;
    struct pch_dest_stats st;
    struct rxbuf rx[2];
    /* the access board: per vCPU the page it touches + 1 (0: none); board_port: vCPU -> port */
    const uint64_t *board;
    int32_t *board_port;
    int nboard;
    uint32_t *woken, wake_gen; /* per port: the placement that last woke it (no double wakes) */
    int precopy, memfd;         /* in precopy (pch_dest_set_precopy) until POSTCOPY_START; guest RAM */
    uint8_t *dropped;           /* per page: 1 once a DISCARD dropped it (NULL until the first one) */
    /* The board is scanned once per batch of placements, not per page: a scan reads every vCPU's
     * slot, and at thousands of vCPUs one scan per page cost more than the page.  board_mark:
     * per page the batch that placed it; a batch closes after board_batch placements (1 for
     * few vCPUs: a scan per page, as cheap as it is prompt) and at the end of every receive. */
    uint32_t *board_mark, board_gen, board_first_wake, board_batch, board_pending;
    struct pch_dest_loop *loop; /* set while pch_dest_run runs: a receive stops between frames for it */
    int stopped[2];             /* per channel: the last pch_dest_on_data stopped early (more whole frames) */
    int yield;                  /* a big frame was placed: the loop reads the faults it woke before more data */
    int urgent_served;          /* this loop turn read the urgent channel */
    uint8_t *ram;               /* --place continue: guest RAM through our own, unregistered mapping */
    struct partial part[2];     /* per channel, where the last pch_dest_on_data stopped */
    int loop_result;
    int link_down; /* a page channel failed: requests wait for the next source (pch_dest_reconnect) */
    /* run --plant-bug (dest.h): the kind, pages copied aside (revert: as placed; stale: as they were
     * before a DISCARD), and lost-wake's page */
    int plant, dontwake; /* dontwake: the placement under way must wake nobody (lost-wake) */
    uint8_t *saved;
    int64_t saved_page[PLANT_SLOTS];
    int nsaved;
    int64_t unwoken;
    char err[256];
};

static inline int64_t now_ns(void) { return (int64_t)pch_now_ns(); }

static int grow(uint8_t **buf, uint64_t *cap, uint64_t need)
{
    if (need <= *cap)
        return 0;
    uint64_t n = *cap ? *cap : 1 << 16;
    while (n < need)
        n *= 2;
    uint8_t *p = realloc(*buf, n);
    if (!p)
        return -ENOMEM;
    *buf = p;
    *cap = n;
    return 0;
}

static int fail(struct pch_dest *d, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct pch_dest *d, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err, sizeof d->err, fmt, ap);
    va_end(ap);
    return rc;
}

struct pch_dest *pch_dest_new(uint64_t page_size, uint64_t npages, uint8_t *received,
                              struct pch_port *ports, int nports, struct pch_port *carrier,
                              const uint32_t *tids, const int32_t *tid_vcpu, int ntids,
                              int hugetlb, uint64_t zero_page, int wake_all, const char *idstr,
                              const uint64_t *board, int nboard, const struct pch_dest_policy *policy)
{
    struct pch_dest *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->pol = *policy;
    if (!d->pol.urgent_turns)
        d->pol.urgent_turns = 1;
    if (!d->pol.board_scan_slots)
        d->pol.board_scan_slots = 1;
    if (!d->pol.rx_turn || d->pol.rx_turn > PCH_RX_CAP)
        d->pol.rx_turn = PCH_RX_CAP;
    d->ps = page_size;
    d->npages = npages;
    d->shift = (unsigned)__builtin_ctzll(page_size);
    d->received = received;
    d->ports = ports;
    d->nports = nports;
    d->carrier = carrier;
    d->tids = tids;
    d->tid_vcpu = tid_vcpu;
    d->ntids = ntids;
    d->hugetlb = hugetlb;
    d->zero_page = zero_page;
    d->wake_all = wake_all;
    snprintf(d->idstr, sizeof d->idstr, "%s", idstr);
    d->head = malloc(npages * sizeof *d->head);
    /* each single-threaded worker waits on at most one page at a time; slack for re-faults */
    d->pool_cap = 2 * nports + 64;
    d->pool = malloc((size_t)d->pool_cap * sizeof *d->pool);
    d->woken = calloc((size_t)nports + 1, sizeof *d->woken);
    d->board = board;
    d->nboard = board ? nboard : 0;
    d->board_port = malloc(((size_t)d->nboard + 1) * sizeof *d->board_port);
    d->board_mark = d->nboard ? calloc(npages, sizeof *d->board_mark) : NULL;
    d->board_gen = d->board_first_wake = 1;
    d->unwoken = -1;
    uint32_t per_scan = (uint32_t)d->nboard / d->pol.board_scan_slots; /* scan cost <= board_scan_slots per page */
    d->board_batch = per_scan > 1 ? per_scan : 1;
    if (!d->head || !d->pool || !d->woken || !d->board_port || (d->nboard && !d->board_mark)) {
        pch_dest_free(d);
        return NULL;
    }
    memset(d->head, 0xff, npages * sizeof *d->head);
    for (int32_t i = 0; i < d->pool_cap; i++)
        d->pool[i].next = i + 1 < d->pool_cap ? i + 1 : -1;
    d->pool_free = 0;
    for (int v = 0; v < d->nboard; v++)
        d->board_port[v] = -1;
    for (int i = 0; i < nports; i++)
        if (ports[i].vcpu >= 0 && ports[i].vcpu < d->nboard)
            d->board_port[ports[i].vcpu] = i;
    return d;
}

void pch_dest_set_precopy(struct pch_dest *d, int memfd)
{
    d->precopy = 1;
    d->memfd = memfd;
}

void pch_dest_free(struct pch_dest *d)
{
    if (!d)
        return;
    free(d->head);
    free(d->pool);
    free(d->woken);
    free(d->board_port);
    free(d->board_mark);
    free(d->req);
    free(d->ev);
    free(d->rx[0].buf);
    free(d->rx[1].buf);
    free(d->rx[0].scratch);
    free(d->rx[1].scratch);
    free(d->dropped);
    free(d->saved);
    free(d);
}

static int32_t vcpu_of(const struct pch_dest *d, uint32_t tid)
{
    int lo = 0, hi = d->ntids - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (d->tids[mid] == tid)
            return d->tid_vcpu[mid];
        if (d->tids[mid] < tid)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

static int add_event(struct pch_dest *d, int64_t t, uint64_t off, int32_t vcpu, uint32_t tid, uint8_t kind,
                     uint8_t flag)
{
    if (grow(&d->ev, &d->ev_cap, d->ev_len + sizeof(struct pch_event)))
        return -ENOMEM;
    struct pch_event e = { t, off, vcpu, tid, kind, flag };
    memcpy(d->ev + d->ev_len, &e, sizeof e);
    d->ev_len += sizeof e;
    return 0;
}

/* REQ_PAGES, or REQ_PAGES_ID the first time (QEMU sends the id when the RAM block changes) */
static int append_request(struct pch_dest *d, uint64_t page)
{
    size_t idlen = strlen(d->idstr);
    size_t body = sizeof(struct pch_rp_req) + (d->sent_id ? 0 : 1 + idlen);
    if (grow(&d->req, &d->req_cap, d->req_len + sizeof(struct pch_rp_hdr) + body))
        return -ENOMEM;
    struct pch_rp_hdr *h = (struct pch_rp_hdr *)(d->req + d->req_len);
    struct pch_rp_req *q = (struct pch_rp_req *)(h + 1);
    h->type = htobe16(d->sent_id ? PCH_RP_REQ_PAGES : PCH_RP_REQ_PAGES_ID);
    h->len = htobe16((uint16_t)body);
    q->offset = htobe64(page << d->shift);
    q->length = htobe32((uint32_t)d->ps);
    if (!d->sent_id) {
        uint8_t *id = (uint8_t *)(q + 1);
        id[0] = (uint8_t)idlen;
        memcpy(id + 1, d->idstr, idlen);
        d->sent_id = 1;
    }
    d->req_len += sizeof *h + body;
    return 0;
}

/* Step: request page (REQ_PAGES on the return path, queued; send_requests sends it) */
static int request_page(struct pch_dest *d, uint64_t page)
{
    if (append_request(d, page))
        return -ENOMEM;
    d->st.requests++;
    d->st.pages_requested++;
    return 0;
}

/* errors of a page channel that mean the link (or the source behind it) is gone, not a bug here */
static int link_lost(int e)
{
    return e == ECONNRESET || e == EPIPE || e == ENOTCONN || e == ETIMEDOUT || e == ECONNABORTED || e == EHOSTUNREACH;
}

static void port_dead(struct pch_dest *d, struct pch_port *p)
{
    if (p->alive) {
        p->alive = 0;
        d->st.dead_ports++;
    }
}

static int wake(struct pch_dest *d, struct pch_port *p, uint64_t addr, uint64_t len)
{
    if (!p->alive)
        return 0;
    int rc = pch_uffd_wake(p->fd, addr, len);
    if (rc == -ESRCH || rc == -ENOENT) {
        port_dead(d, p);
        return 0;
    }
    if (rc)
        return fail(d, rc, "UFFDIO_WAKE failed: %s (vCPU %d)", strerror(-rc), p->vcpu);
    d->st.wakes++;
    return 0;
}

/* Let a vCPU blocked on [addr, addr+len) of port p go on.  Placed by UFFDIO_COPY, the page is in its
 * page tables' reach: a wake is enough.  Placed by writing the page cache (--place continue), p's
 * uffd is registered MINOR and the page is mapped in that process only by UFFDIO_CONTINUE (which
 * wakes too); EEXIST means it is mapped there already, so only a wake may be missing. */
static int release(struct pch_dest *d, struct pch_port *p, uint64_t addr, uint64_t len)
{
    if (!d->ram)
        return wake(d, p, addr, len);
    if (!p->alive)
        return 0;
    int rc = pch_uffd_continue_upto(p->fd, addr, len, d->dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0, NULL);
    if (rc == -EEXIST)
        return d->dontwake ? 0 : wake(d, p, addr, len);
    if (rc == -ESRCH || rc == -ENOENT) {
        port_dead(d, p);
        return 0;
    }
    if (rc)
        return fail(d, rc, "UFFDIO_CONTINUE failed: %s (vCPU %d)", strerror(-rc), p->vcpu);
    d->st.wakes++;
    return 0;
}

void pch_dest_set_continue(struct pch_dest *d, uint64_t ram) { d->ram = (uint8_t *)(uintptr_t)ram; }

/* Remember that `port` waits for `page`; returns 1 if the page must be requested now. */
static int add_waiter(struct pch_dest *d, uint64_t page, int32_t port)
{
    int32_t h = d->head[page];
    for (int32_t w = h; w >= 0; w = d->pool[w].next)
        if (d->pool[w].port == port)
            return 0; /* a re-fault of a waiter we know */
    if (d->pool_free < 0) {
        int32_t old = d->pool_cap, cap = old * 2;
        struct waiter *np = realloc(d->pool, (size_t)cap * sizeof *np);
        if (!np)
            return -ENOMEM;
        d->pool = np;
        for (int32_t i = old; i < cap; i++)
            np[i].next = i + 1 < cap ? i + 1 : -1;
        d->pool_free = old;
        d->pool_cap = cap;
    }
    int32_t w = d->pool_free;
    d->pool_free = d->pool[w].next;
    d->pool[w].port = port;
    d->pool[w].next = -1;
    if (h < 0) {
        d->head[page] = w;
        return 1;
    }
    /* append, so the first waiter stays first: the copy goes through its uffd */
    while (d->pool[h].next >= 0)
        h = d->pool[h].next;
    d->pool[h].next = w;
    return 0;
}

/* Step: read faults (a batch from uffd `pi`): attribute each, wake it if its page is in, else make
 * it a waiter and request its page */
static int read_faults(struct pch_dest *d, int pi)
{
    struct pch_port *port = &d->ports[pi];
    uint64_t addr[128], flags[128];
    uint32_t ptid[128];
    int n = pch_uffd_read_faults(port->fd, addr, flags, ptid, 128, &port->other_events);
    if (n < 0)
        return fail(d, n, "read(userfaultfd) failed: %s (vCPU %d)", strerror(-n), port->vcpu);
    if (n == 0)
        return 0;
    int64_t t = now_ns(); /* the fault's time: when the handler learns of it, as in QEMU */
    int err = 0;          /* the first fault we cannot serve; the rest of the batch is served first */
    d->st.faults += (uint64_t)n;
    for (int i = 0; i < n; i++) {
        uint64_t off = (addr[i] - port->base) & ~(d->ps - 1);
        uint64_t page = off >> d->shift;
        if (addr[i] < port->base || page >= d->npages) {
            if (!err)
                err = fail(d, -EFAULT, "fault at %#llx outside guest RAM of vCPU %d",
                           (unsigned long long)addr[i], port->vcpu);
            continue;
        }
        int32_t vcpu = vcpu_of(d, ptid[i]);
        uint8_t already = d->received[page];
        int dropped = d->dropped && d->dropped[page];
        d->st.faults_discarded += (uint64_t)dropped;
        if (vcpu >= 0)
            d->st.faults_vcpu++;
        if (add_event(d, t, off, vcpu, ptid[i], 'F', already))
            return fail(d, -ENOMEM, "out of memory for events");
        if (already) {
            /* placed after the kernel queued this fault: the waiter only needs a wake */
            d->st.faults_already_received++;
            int rc = d->unwoken == (int64_t)page ? 0 : release(d, port, port->base + off, d->ps);
            if (rc && !err)
                err = rc;
            continue;
        }
        int r = add_waiter(d, page, pi);
        if (r < 0 || (r == 1 && request_page(d, page)))
            return fail(d, -ENOMEM, "out of memory for waiters");
        d->st.requests_discarded += (uint64_t)(r == 1 && dropped);
    }
    return err ? err : n;
}

int pch_dest_on_uffd(struct pch_dest *d, int pi) { return read_faults(d, pi); }

/* One ioctl for [page, page+count) through port p: a copy of src, a zero fill, or on hugetlbfs
 * (no UFFDIO_ZEROPAGE there) a copy of the zeroed huge page (count == 1). */
static int put_pages(struct pch_dest *d, struct pch_port *p, uint64_t page, uint64_t count, const uint8_t *src,
                     uint64_t *done)
{
    uint64_t addr = p->base + (page << d->shift), len = count << d->shift;
    uint64_t mode = d->dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0; /* == UFFDIO_ZEROPAGE_MODE_DONTWAKE */
    if (src)
        return pch_uffd_copy_upto(p->fd, addr, src, len, mode, done);
    if (!d->hugetlb)
        return pch_uffd_zeropage_upto(p->fd, addr, len, mode, done);
    return pch_uffd_copy_upto(p->fd, addr, (const void *)(uintptr_t)d->zero_page, len, mode, done);
}

/* Install [page, page+count) through `via`; on a dead waiter fall back to the carrier.  EEXIST
 * stops the kernel at the first page of the range that is in already: that page is skipped (and
 * counted) and the rest goes on, so that every other page is really copied before it is marked
 * received. */
static int install(struct pch_dest *d, struct pch_port **via, uint64_t page, uint64_t count, const uint8_t *src)
{
    if (d->ram) { /* --place continue: the page cache is written directly (see install_cache) */
        if (src && src != d->ram + (page << d->shift))
            memcpy(d->ram + (page << d->shift), src, count << d->shift);
        /* a zero page is there already: our mapping was populated with zeroed pages, and nobody
         * writes a page before it is placed */
        if (*via == d->carrier)
            return 0; /* nobody waits: whoever touches it later takes a MINOR fault, answered at once */
        return release(d, *via, (*via)->base + (page << d->shift), count << d->shift);
    }
    int one_by_one = d->hugetlb && !src;
    if (!(*via)->alive)
        *via = d->carrier; /* a lost vCPU's uffd: known dead, no ESRCH to learn it again */
    for (uint64_t k = 0; k < count;) {
        uint64_t n = one_by_one ? 1 : count - k, done = 0;
        int rc = put_pages(d, *via, page + k, n, src ? src + (k << d->shift) : NULL, &done);
        k += done >> d->shift;
        if (rc == 0)
            continue;
        if (rc == -EEXIST) {
            d->st.copy_eexist++; /* already in the page cache: count it, still wake */
            k++;
            continue;
        }
        if ((rc == -ESRCH || rc == -ENOENT) && *via != d->carrier) {
            port_dead(d, *via);
            *via = d->carrier;
            continue;
        }
        return fail(d, rc, "%s failed: %s (page %llu)", src || d->hugetlb ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE",
                    strerror(-rc), (unsigned long long)(page + k));
    }
    return 0;
}

/* Wake port `pi` for [off, off+len) unless this placement already woke it (or copied through it). */
static int wake_once(struct pch_dest *d, int32_t pi, const struct pch_port *via, uint64_t off, uint64_t len)
{
    struct pch_port *p = &d->ports[pi];
    if (p == via || d->woken[pi] == d->wake_gen)
        return 0;
    d->woken[pi] = d->wake_gen;
    return release(d, p, p->base + off, len);
}

/* Wake every vCPU that may sleep on the pages just placed: the copy woke only the waiters of the
 * uffd it went through.  Waiters whose fault we read are in the list; vCPUs whose fault message
 * is still queued show on the access board (postcopy_core/board.py says why that is enough). */
static int wake_sharers(struct pch_dest *d, const struct pch_port *via, int32_t w, uint64_t page, uint64_t count)
{ /* step: wake sharers */
    uint64_t off = page << d->shift, len = count << d->shift;
    int rc;
    if (++d->wake_gen == 0) { /* wrapped: forget the old marks */
        memset(d->woken, 0, (size_t)d->nports * sizeof *d->woken);
        d->wake_gen = d->board_first_wake = 1;
    }
    if (d->wake_all) {
        for (int32_t i = 0; i < d->nports; i++)
            if ((rc = wake_once(d, i, via, off, len)))
                return rc;
        return 0;
    }
    for (int32_t x = w; x >= 0; x = d->pool[x].next)
        if ((rc = wake_once(d, d->pool[x].port, via, off, len)))
            return rc;
    return 0;
}

/* Close the batch: wake every vCPU whose board slot names a page placed in it, unless a copy or a
 * listed-waiter wake of this batch reached its uffd already.  Skipping one that was woken for
 * another page of the batch only delays it: its fault is still queued, and read, it is woken. */
static int board_flush(struct pch_dest *d)
{
    int rc = 0;
    if (!d->board_pending)
        return 0;
    /* the pages are in before we look: a vCPU that writes its slot after this load finds them */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t gen = d->board_gen, first = d->board_first_wake;
    if (++d->wake_gen == 0) {
        memset(d->woken, 0, (size_t)d->nports * sizeof *d->woken);
        d->wake_gen = first = 1;
    }
    for (int v = 0; v < d->nboard && !rc; v++) {
        uint64_t slot = __atomic_load_n(&d->board[v], __ATOMIC_RELAXED);
        if (slot - 1 >= d->npages || d->board_mark[slot - 1] != gen) /* 0 (no page) wraps to a huge value */
            continue;
        int32_t pi = d->board_port[v];
        if (pi < 0 || d->woken[pi] >= first) /* woken in this batch (by this scan too) */
            continue;
        d->st.board_wakes++;
        d->woken[pi] = d->wake_gen;
        rc = wake(d, &d->ports[pi], d->ports[pi].base + ((slot - 1) << d->shift), d->ps);
    }
    d->board_pending = 0;
    if (++d->board_gen == 0) { /* wrapped: forget the old marks */
        memset(d->board_mark, 0, d->npages * sizeof *d->board_mark);
        d->board_gen = 1;
    }
    d->board_first_wake = d->wake_gen + 1;
    return rc;
}

/* Note pages [page, page+count) for the board scan of this batch (`via`: the uffd that copied them,
 * which woke its own waiters); the batch closes when it is full. */
static int board_note(struct pch_dest *d, const struct pch_port *via, uint64_t page, uint64_t count)
{
    if (!d->nboard || d->wake_all) /* waking every uffd leaves nobody for the board */
        return 0;
    if (via >= d->ports && via < d->ports + d->nports)
        d->woken[via - d->ports] = d->wake_gen;
    for (uint64_t k = 0; k < count; k++)
        d->board_mark[page + k] = d->board_gen;
    return ++d->board_pending >= d->board_batch ? board_flush(d) : 0;
}

/* ---- run --plant-bug: the bugs planted on purpose (dest.h); nothing here runs without one ---- */

void pch_dest_set_plant(struct pch_dest *d, int kind)
{
    d->plant = kind;
    if (kind == PCH_PLANT_REVERT || kind == PCH_PLANT_STALE)
        d->saved = malloc(PLANT_SLOTS * d->ps);
    if (!d->saved)
        d->plant = kind == PCH_PLANT_REVERT || kind == PCH_PLANT_STALE ? PCH_PLANT_NONE : kind;
}

/* guest RAM through the destination's own mapping (registered or not, a placed page is just memory) */
static uint8_t *our_view(struct pch_dest *d, uint64_t page)
{
    return d->ram ? d->ram + (page << d->shift) : (uint8_t *)(uintptr_t)(d->carrier->base + (page << d->shift));
}

/* keep a copy of page's bytes (src, or zeros) in a free slot (revert: the oldest is given up) */
static void plant_save(struct pch_dest *d, uint64_t page, const uint8_t *src)
{
    int i = d->nsaved < PLANT_SLOTS ? d->nsaved++ : (int)(page % PLANT_SLOTS);
    d->saved_page[i] = (int64_t)page;
    if (src)
        memcpy(d->saved + (uint64_t)i * d->ps, src, d->ps);
    else
        memset(d->saved + (uint64_t)i * d->ps, 0, d->ps);
}

static int plant_slot(const struct pch_dest *d, uint64_t page)
{
    for (int i = 0; i < d->nsaved; i++)
        if (d->saved_page[i] == (int64_t)page)
            return i;
    return -1;
}

/* revert-after-write, once per loop turn: a saved page that a vCPU changed gets its source bytes back */
static void plant_revert(struct pch_dest *d)
{
    for (int i = 0; i < d->nsaved; i++) {
        if (d->saved_page[i] < 0)
            continue;
        uint8_t *now = our_view(d, (uint64_t)d->saved_page[i]), *old = d->saved + (uint64_t)i * d->ps;
        if (!memcmp(now, old, d->ps))
            continue;
        memcpy(now, old, d->ps);
        d->saved_page[i] = -1;
        d->st.planted++;
    }
}

/* what a planted bug makes of a placement of `page` (a waiter's if w >= 0): maybe other bytes */
static const uint8_t *plant_place(struct pch_dest *d, uint64_t page, int32_t w, const uint8_t *src)
{
    int i;
    switch (d->plant) {
    case PCH_PLANT_REVERT:
        if (w >= 0 && !d->precopy)
            plant_save(d, page, src);
        return src;
    case PCH_PLANT_ZERO:
        if (w < 0 || !src || page % 4)
            return src;
        d->st.planted++;
        if (d->ram) /* continue: the page cache may hold the bytes already (received into place) */
            memset(d->ram + (page << d->shift), 0, d->ps);
        return NULL;
    case PCH_PLANT_STALE:
        if ((i = plant_slot(d, page)) < 0 || d->precopy)
            return src;
        d->saved_page[i] = -1;
        d->st.planted++;
        return d->saved + (uint64_t)i * d->ps;
    case PCH_PLANT_LOST_WAKE:
        if (w >= 0 && src && d->unwoken < 0 && !d->precopy) {
            d->unwoken = (int64_t)page;
            d->st.planted++;
        }
        return src;
    }
    return src;
}

static int place_page(struct pch_dest *d, uint64_t page, uint64_t count, const uint8_t *src, int urgent);

/* wrong-page: after a waited-for page went in, its bytes go in at another offset too (if free) */
static int plant_wrong(struct pch_dest *d, uint64_t page, int32_t w, const uint8_t *src, int urgent)
{
    uint64_t other = page ^ 2;
    if (d->plant != PCH_PLANT_WRONG || w < 0 || !src || page % 4 != 1 || other >= d->npages ||
        d->received[other] || d->head[other] >= 0 || d->precopy)
        return 0;
    d->st.planted++;
    if (d->ram) { /* continue: a copy aside, as the source's bytes may be received into place */
        uint8_t *copy = malloc(d->ps);
        if (!copy)
            return fail(d, -ENOMEM, "out of memory");
        memcpy(copy, src, d->ps);
        int rc = place_page(d, other, 1, copy, urgent);
        free(copy);
        return rc;
    }
    return place_page(d, other, 1, src, urgent);
}

/* Step: place page(s) [page, page+count) from src (NULL: zero pages, see place_zero), wake its
 * sharers, free its waiters */
static int place_page(struct pch_dest *d, uint64_t page, uint64_t count, const uint8_t *src, int urgent)
{
    int32_t w = d->head[page];
    struct pch_port *via = w >= 0 ? &d->ports[d->pool[w].port] : d->carrier;
    const uint8_t *given = src;
    if (d->plant) /* a planted bug places pages one at a time (place_frame) */
        src = plant_place(d, page, w, src);
    int unwoken = d->unwoken == (int64_t)page; /* lost-wake: no wake for it, not even the copy's own */
    d->dontwake = unwoken;
    int rc = install(d, &via, page, count, src);
    d->dontwake = 0;
    if (rc)
        return rc;
    int64_t t = now_ns(); /* placement time: right after the copy, as QEMU takes it */
    d->st.t_last_place = (uint64_t)t;
    memset(d->received + page, 1, count);
    d->st.placed += count;
    if (d->precopy) /* no vCPU runs yet: nothing to account (QEMU writes precopy pages directly) */
        d->st.placed_precopy += count;
    else if (urgent)
        d->st.placed_urgent += count;
    else
        d->st.placed_background += count;
    if (!src)
        d->st.placed_zero += count;
    for (uint64_t k = 0; k < count && !d->precopy; k++)
        if (add_event(d, t, (page + k) << d->shift, -1, 0, 'P', !src))
            return fail(d, -ENOMEM, "out of memory for events");
    if (!unwoken && ((rc = wake_sharers(d, via, w, page, count)) || (rc = board_note(d, via, page, count))))
        return rc;
    if (w >= 0) { /* a page with waiters is placed alone (count == 1): free its list */
        for (int32_t x = w; x >= 0;) {
            int32_t next = d->pool[x].next;
            d->pool[x].next = d->pool_free;
            d->pool_free = x;
            x = next;
        }
        d->head[page] = -1;
    }
    return d->plant ? plant_wrong(d, page, w, given, urgent) : 0;
}

/* Step: place zero (a ZERO frame's pages: UFFDIO_ZEROPAGE, or the zeroed huge page on hugetlbfs) */
static int place_zero(struct pch_dest *d, uint64_t page, uint64_t count, int urgent)
{
    return place_page(d, page, count, NULL, urgent);
}

/* Place the pages of one PAGES/ZERO frame: pages with waiters one by one (through the first
 * waiter's uffd), runs nobody waits for with one ioctl through the carrier. */
static int place_frame(struct pch_dest *d, uint64_t first, uint64_t count, const uint8_t *data, int urgent)
{
    uint64_t p = first, end = first + count;
    while (p < end) {
        if (d->received[p] && d->precopy) {
            /* precopy sends a page again when the guest rewrote it: the new copy replaces the old
             * (nobody can be reading it: the vCPUs wait for postcopy) */
            uint8_t *dst = (uint8_t *)(uintptr_t)(d->carrier->base + (p << d->shift));
            if (data)
                memcpy(dst, data + ((p - first) << d->shift), d->ps);
            else
                memset(dst, 0, d->ps);
            d->st.precopy_rewrites++;
            p++;
            continue;
        }
        if (d->received[p]) {
            d->st.duplicates++; /* a background copy of a page that came urgently */
            if (d->plant == PCH_PLANT_RESEND && d->st.reconnects && data) { /* planted: overwrite it */
                memcpy(our_view(d, p), data + ((p - first) << d->shift), d->ps);
                d->st.planted++;
            }
            p++;
            continue;
        }
        uint64_t q = p + 1;
        if (d->head[p] < 0 && !d->plant)
            while (q < end && !d->received[q] && d->head[q] < 0)
                q++;
        int rc = data ? place_page(d, p, q - p, data + ((p - first) << d->shift), urgent)
                      : place_zero(d, p, q - p, urgent);
        if (rc)
            return rc;
        p = q;
    }
    /* A big frame (a huge page) took long to come in and to place: back to the loop, which reads the
     * faults of the vCPUs it woke and asks for their pages before the rest of the channel, so the
     * source prepares the next page meanwhile (asked only at the end of the turn, it idled and the
     * faults waited ~1 ms). */
    if ((count << d->shift) >= d->pol.direct_min && d->loop && !d->precopy)
        d->yield = 1;
    return 0;
}

static int hello(struct pch_dest *d, const uint8_t *p, uint32_t plen, int ch)
{
    if (d->hello[ch])
        return fail(d, -EPROTO, "HELLO: sent twice");
    if (plen < PCH_HELLO_SIZE || plen > PCH_HELLO_SIZE + 255)
        return fail(d, -EPROTO, "HELLO: payload length %u out of range", plen);
    const struct pch_hello *hl = (const struct pch_hello *)p;
    if (memcmp(hl->magic, "PCHS", 4))
        return fail(d, -EPROTO, "HELLO: bad magic (not a postcopy-harness source?)");
    if (be16toh(hl->version) != PCH_PROTO_VERSION)
        return fail(d, -EPROTO, "HELLO: protocol version %u, this destination speaks %u", be16toh(hl->version),
                    PCH_PROTO_VERSION);
    uint32_t ps = be32toh(hl->page_size);
    uint64_t size = be64toh(hl->ram_size);
    uint8_t idlen = hl->idlen;
    if (plen != PCH_HELLO_SIZE + (uint32_t)idlen || idlen == 0)
        return fail(d, -EPROTO, "HELLO: RAM block id length does not match the payload");
    if (ps != d->ps || size != d->npages * d->ps)
        return fail(d, -EPROTO, "HELLO: source RAM is %llu bytes in %u-byte pages, destination has %llu in %llu",
                    (unsigned long long)size, ps, (unsigned long long)(d->npages * d->ps), (unsigned long long)d->ps);
    if (idlen != strlen(d->idstr) || memcmp(p + PCH_HELLO_SIZE, d->idstr, idlen))
        return fail(d, -EPROTO, "HELLO: unknown RAM block id");
    d->hello[ch] = 1;
    return 0;
}

/* DISCARD: drop pages the guest dirtied after they were sent, so that they fault again.  Every
 * range is checked before any is applied; then the page cache gives them up (a hole punched in the
 * memfd, or MADV_REMOVE where fallocate cannot) and the received map forgets them. */
static int discard(struct pch_dest *d, const uint8_t *payload, uint16_t count) /* step: discard */
{
    const struct pch_discard_range *p = (const struct pch_discard_range *)payload;
    uint64_t ram = d->npages << d->shift;
    for (uint16_t i = 0; i < count; i++) {
        uint64_t off = be64toh(p[i].offset), len = be64toh(p[i].length);
        if (len == 0 || (off | len) & (d->ps - 1))
            return fail(d, -EPROTO, "DISCARD: range %u (0x%llx+0x%llx) is not whole pages", i,
                        (unsigned long long)off, (unsigned long long)len);
        if (off > ram || len > ram - off)
            return fail(d, -EPROTO, "DISCARD: range %u (0x%llx+0x%llx) outside guest RAM", i,
                        (unsigned long long)off, (unsigned long long)len);
    }
    if (!d->dropped && !(d->dropped = calloc(d->npages, 1)))
        return fail(d, -ENOMEM, "out of memory for the discard map");
    for (uint16_t i = 0; i < count; i++) {
        uint64_t off = be64toh(p[i].offset), len = be64toh(p[i].length);
        for (uint64_t pg = off >> d->shift; d->plant == PCH_PLANT_STALE && pg < (off + len) >> d->shift; pg++)
            if (d->received[pg] && d->nsaved < PLANT_SLOTS) /* planted: keep the old generation's bytes */
                plant_save(d, pg, our_view(d, pg));
        if (fallocate(d->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len)) {
            int e = errno;
            if (madvise((void *)(uintptr_t)(d->carrier->base + off), len, MADV_REMOVE))
                return fail(d, -errno, "DISCARD: fallocate(PUNCH_HOLE): %s; madvise(MADV_REMOVE): %s",
                            strerror(e), strerror(errno));
        }
        for (uint64_t pg = off >> d->shift; pg < (off + len) >> d->shift; pg++) {
            d->dropped[pg] = 1;
            if (d->received[pg]) {
                d->received[pg] = 0;
                d->st.placed--;
                d->st.placed_precopy--;
                d->st.discarded++;
            }
        }
    }
    d->st.discard_msgs++;
    return 0;
}

/* buf starts with a whole frame (header and payload) */
static int whole_frame(const uint8_t *buf, uint64_t len)
{
    return len >= PCH_HDR_SIZE && len - PCH_HDR_SIZE >= be32toh(((const struct pch_frame_hdr *)buf)->payload_len);
}

int64_t pch_dest_on_data(struct pch_dest *d, const uint8_t *buf, uint64_t len, int ch)
{
    static const char *names[] = { "?", "HELLO", "PAGES", "ZERO", "EOS", "DISCARD", "POSTCOPY_START" };
    uint64_t pos = 0;
    ch = ch ? 1 : 0;
    d->part[ch].valid = 0;
    while (len - pos >= PCH_HDR_SIZE) {
        const struct pch_frame_hdr *h = (const struct pch_frame_hdr *)(buf + pos);
        uint8_t type = h->type, flags = h->flags;
        uint16_t count = be16toh(h->count);
        uint32_t plen = be32toh(h->payload_len);
        uint64_t off = be64toh(h->offset);
        if (type < PCH_MSG_HELLO || type > PCH_MSG_POSTCOPY_START)
            return fail(d, -EPROTO, "page stream: unknown message type %u", type);
        const char *name = names[type];
        if (flags & ~PCH_FLAG_URGENT)
            return fail(d, -EPROTO, "%s: unknown flags %#x", name, flags);
        if (d->eos[ch])
            return fail(d, -EPROTO, "%s: received after EOS", name);
        if (type == PCH_MSG_HELLO && d->hello[ch])
            return fail(d, -EPROTO, "HELLO: sent twice");
        if (type == PCH_MSG_HELLO && (plen < PCH_HELLO_SIZE || plen > PCH_HELLO_SIZE + 255))
            return fail(d, -EPROTO, "HELLO: payload length %u out of range", plen);
        if (type != PCH_MSG_HELLO && !d->hello[ch])
            return fail(d, -EPROTO, "%s: received before HELLO", name);
        if (type == PCH_MSG_EOS && (count || plen || off))
            return fail(d, -EPROTO, "EOS: must carry no pages");
        if (type == PCH_MSG_DISCARD || type == PCH_MSG_POSTCOPY_START) {
            if (ch)
                return fail(d, -EPROTO, "%s: on the urgent channel", name);
            if (!d->precopy)
                return fail(d, -EPROTO, "%s: not in precopy", name);
            if (flags)
                return fail(d, -EPROTO, "%s: unknown flags %#x", name, flags);
            if (off)
                return fail(d, -EPROTO, "%s: offset must be 0", name);
            if (type == PCH_MSG_POSTCOPY_START && (count || plen))
                return fail(d, -EPROTO, "POSTCOPY_START: must carry nothing");
            if (type == PCH_MSG_DISCARD && (count == 0 || count > PCH_DISCARD_MAX_RANGES))
                return fail(d, -EPROTO, "DISCARD: %u ranges, must be 1..%d", count, PCH_DISCARD_MAX_RANGES);
            if (type == PCH_MSG_DISCARD && plen != (uint32_t)count * PCH_DISCARD_RANGE_SIZE)
                return fail(d, -EPROTO, "DISCARD: payload length %u, expected %u for %u ranges", plen,
                            (unsigned)count * PCH_DISCARD_RANGE_SIZE, count);
        }
        if (type == PCH_MSG_PAGES || type == PCH_MSG_ZERO) {
            uint64_t expect = type == PCH_MSG_PAGES ? (uint64_t)count << d->shift : 0;
            if (count == 0)
                return fail(d, -EPROTO, "%s: zero pages", name);
            if (plen != expect)
                return fail(d, -EPROTO, "%s: payload length %u, expected %llu for %u pages", name, plen,
                            (unsigned long long)expect, count);
            if (off & (d->ps - 1) || (off >> d->shift) + count > d->npages)
                return fail(d, -EPROTO, "%s: pages %#llx+%u outside guest RAM", name, (unsigned long long)off, count);
            if (plen > PCH_RX_CAP - PCH_HDR_SIZE)
                return fail(d, -EPROTO, "%s: %u bytes do not fit the receive buffer", name, plen);
        }
        if (len - pos - PCH_HDR_SIZE < plen) { /* incomplete: the caller keeps the rest for the next read */
            if (type == PCH_MSG_PAGES)
                d->part[ch] = (struct partial){ off >> d->shift, count, plen, flags & PCH_FLAG_URGENT, 1 };
            break;
        }
        const uint8_t *payload = (const uint8_t *)(h + 1);
        int rc = 0;
        if (type == PCH_MSG_HELLO)
            rc = hello(d, payload, plen, ch);
        else if (type == PCH_MSG_EOS)
            d->st.eos = d->eos[ch] = 1;
        else if (type == PCH_MSG_DISCARD)
            rc = discard(d, payload, count);
        else if (type == PCH_MSG_POSTCOPY_START) {
            d->precopy = 0;
            d->st.t_postcopy_start = (uint64_t)now_ns();
            if (d->loop && !d->loop_result)
                d->loop_result = PCH_RUN_POSTCOPY;
        } else
            rc = place_frame(d, off >> d->shift, count, type == PCH_MSG_PAGES ? payload : NULL, flags & PCH_FLAG_URGENT);
        if (rc)
            return rc;
        d->st.frames++;
        pos += PCH_HDR_SIZE + plen;
        /* Inside pch_dest_run, between two stream frames (or after a big frame on either channel)
         * faults and urgent pages go first: stop here when another whole frame follows, and let the
         * loop serve them and come back for the rest (rxbuf.held). */
        if (d->loop && (ch == 0 || d->yield) && whole_frame(buf + pos, len - pos)) {
            d->stopped[ch] = 1;
            return (int64_t)pos;
        }
    }
    int rc = board_flush(d); /* no placed page waits past this receive for its board wake */
    return rc ? rc : (int64_t)pos;
}

const uint8_t *pch_dest_requests(struct pch_dest *d, uint64_t *len) { *len = d->req_len; return d->req; }
const uint8_t *pch_dest_events(struct pch_dest *d, uint64_t *len) { *len = d->ev_len; return d->ev; }
void pch_dest_clear_requests(struct pch_dest *d) { d->req_len = d->req_sent = 0; }
void pch_dest_clear_events(struct pch_dest *d) { d->ev_len = 0; }
const struct pch_dest_stats *pch_dest_stats(struct pch_dest *d) { return &d->st; }
const char *pch_dest_error(struct pch_dest *d) { return d->err; }

/* The frame that pch_dest_on_data noted as incomplete is big and none of its pages is in. */
static int direct_ok(struct pch_dest *d, int ch)
{
    struct partial *f = &d->part[ch];
    if (!f->valid || f->plen < d->pol.direct_min)
        return 0;
    for (uint64_t k = 0; k < f->count; k++)
        if (d->received[f->first + k])
            return 0;
    return 1;
}

/* --place continue: receive the rest of a big PAGES frame straight into guest RAM (one copy, from the
 * socket into the page cache: no receive buffer in between), then place it there.  Only frames none
 * of whose pages is in yet go this way; a page of it placed meanwhile (an urgent answer) is skipped
 * by the rest of the receive (direct_room): its vCPU may have written it since.  No vCPU sees a page
 * half written: each is registered MINOR and traps until its page is placed and CONTINUEd to it.
 * Same results as on_channel. */
static int direct_done(struct pch_dest *d, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    r->direct = 0;
    int rc = place_frame(d, r->dfirst, r->dcount, d->ram + (r->dfirst << d->shift), r->durgent);
    if (rc)
        return rc;
    d->st.frames++;
    return 1; /* back to the loop: it serves the faults before the next read */
}

/* How much of the frame being received into place the next recv may take: the run of its pages from
 * where it stands up to the first page placed meanwhile (an urgent answer, CONTINUEd and perhaps
 * written by its vCPU since).  Such a page's bytes go to `scratch` instead (*aside = 1): a page in
 * place is never written again. */
static uint64_t direct_room(struct pch_dest *d, struct rxbuf *r, int *aside)
{
    uint64_t page = r->dfirst + (r->dgot >> d->shift), in_page = r->dgot & (d->ps - 1);
    *aside = d->received[page];
    if (*aside) {
        d->st.direct_skipped += !in_page;
        return d->ps - in_page;
    }
    uint64_t end = page + 1, last = r->dfirst + r->dcount;
    while (end < last && !d->received[end])
        end++;
    return ((end - r->dfirst) << d->shift) - r->dgot;
}

static int on_direct(struct pch_dest *d, int fd, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    int aside;
    uint64_t want = direct_room(d, r, &aside);
    if (want > d->pol.rx_turn)
        want = d->pol.rx_turn;
    uint8_t *to = d->ram + (r->dfirst << d->shift) + r->dgot;
    if (aside) {
        if (!r->scratch && !(r->scratch = malloc(d->ps < d->pol.rx_turn ? d->ps : d->pol.rx_turn)))
            return fail(d, -ENOMEM, "out of memory for a receive buffer");
        to = r->scratch;
    }
    ssize_t got = recv(fd, to, want, MSG_DONTWAIT);
    if (got < 0 && link_lost(errno))
        got = 0; /* a reset is an EOF: the destination pauses (the half-received frame is asked again) */
    if (got < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : fail(d, -errno, "recv(page channel): %s", strerror(errno));
    if (got == 0) {
        d->link_down = 1;
        return PCH_RUN_EOF;
    }
    r->dgot += (uint64_t)got;
    r->drained = (uint64_t)got < want;
    return r->dgot < r->dlen ? 1 : direct_done(d, ch);
}

/* After a read: if what is left is the start of a big PAGES frame, take its payload so far to its
 * place and go on there (on_direct). */
static int go_direct(struct pch_dest *d, int fd, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    struct partial *f = &d->part[ch];
    if (!direct_ok(d, ch))
        return 0;
    uint64_t have = r->end - r->start - PCH_HDR_SIZE;
    memcpy(d->ram + (f->first << d->shift), r->buf + r->start + PCH_HDR_SIZE, have);
    r->start = r->end = 0;
    r->dfirst = f->first;
    r->dcount = f->count;
    r->dlen = f->plen;
    r->dgot = have;
    r->durgent = f->urgent;
    r->direct = 1;
    f->valid = 0;
    return on_direct(d, fd, ch);
}

/* At a frame boundary of a channel whose frames are big (the stream, or huge pages): look at the
 * next header without taking it (MSG_PEEK); for a big PAGES frame, one recvmsg then takes the
 * header and puts the payload straight into place, no byte of it through the receive buffer.
 * 0 when that does not apply (the caller reads as usual, and sees any EOF or error there). */
static int peek_direct(struct pch_dest *d, int fd, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    struct pch_frame_hdr h;
    ssize_t got = recv(fd, &h, sizeof h, MSG_PEEK | MSG_DONTWAIT);
    if (got != PCH_HDR_SIZE || h.type != PCH_MSG_PAGES || be32toh(h.payload_len) < d->pol.direct_min)
        return 0;
    /* the checks every frame gets: pch_dest_on_data stops at the missing payload, noting the frame */
    int64_t used = pch_dest_on_data(d, (const uint8_t *)&h, sizeof h, ch);
    if (used < 0)
        return (int)used;
    if (used || !direct_ok(d, ch))
        return 0;
    struct partial *f = &d->part[ch];
    uint64_t want = f->plen < d->pol.rx_turn ? f->plen : d->pol.rx_turn;
    struct iovec iov[2] = { { &h, sizeof h }, { d->ram + (f->first << d->shift), want } };
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
    got = recvmsg(fd, &m, MSG_DONTWAIT);
    if (got < 0 && link_lost(errno)) {
        d->link_down = 1;
        return PCH_RUN_EOF;
    }
    if (got < PCH_HDR_SIZE) /* the peeked header is there: a stream socket gives at least that */
        return fail(d, got < 0 ? -errno : -EPROTO, "recvmsg(page channel): %s",
                    got < 0 ? strerror(errno) : "fewer bytes than peeked");
    r->dfirst = f->first;
    r->dcount = f->count;
    r->dlen = f->plen;
    r->dgot = (uint64_t)got - PCH_HDR_SIZE;
    r->durgent = f->urgent;
    r->direct = 1;
    r->drained = r->dgot < want;
    f->valid = 0;
    return r->dgot < r->dlen ? 1 : direct_done(d, ch);
}

/* Place the whole frames in a channel's buffer, up to where pch_dest_on_data stops for the loop
 * (then r->held: the rest waits for the next turn).  A big PAGES frame begun at the end goes on
 * straight into place (go_direct).  1, or PCH_RUN_EOF, or -errno. */
static int take_frames(struct pch_dest *d, int fd, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    r->held = 0;
    int64_t used = pch_dest_on_data(d, r->buf + r->start, r->end - r->start, ch);
    if (used < 0)
        return (int)used;
    r->start += (uint64_t)used;
    if (d->stopped[ch]) {
        d->stopped[ch] = 0;
        r->held = 1;
    } else if (r->start == r->end)
        r->start = r->end = 0;
    else if (d->ram && !d->eos[ch]) {
        int rc = go_direct(d, fd, ch);
        if (rc < 0 || rc == PCH_RUN_EOF)
            return rc;
    }
    return 1;
}

/* Receive once from a channel (at most the policy's rx_turn bytes) and place every complete frame: 1 if it read
 * something, 0 if nothing was there, PCH_RUN_EOF at EOF.  One bounded read per readiness: a busy background stream must not keep the loop from
 * the urgent channel and the uffds (epoll is level-triggered, so the rest comes next turn). */
static int on_channel(struct pch_dest *d, int fd, int ch)
{
    struct rxbuf *r = &d->rx[ch];
    if (r->held) /* whole frames from the last read first */
        return take_frames(d, fd, ch);
    if (r->direct)
        return on_direct(d, fd, ch);
    if (d->ram && r->start == r->end && (ch == 0 || d->ps >= d->pol.direct_min)) {
        int rc = peek_direct(d, fd, ch);
        if (rc)
            return rc;
    }
    if (!r->buf) {
        if (!(r->buf = malloc(PCH_RX_CAP)))
            return fail(d, -ENOMEM, "out of memory for a receive buffer");
        r->cap = PCH_RX_CAP;
    }
    if (r->cap - r->end < d->pol.rx_turn && r->start) { /* keep the partial frame, at the front */
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
    if (r->end == r->cap)
        return fail(d, -EPROTO, "page stream: a frame larger than the receive buffer");
    uint64_t room = r->cap - r->end < d->pol.rx_turn ? r->cap - r->end : d->pol.rx_turn;
    ssize_t got = recv(fd, r->buf + r->end, room, MSG_DONTWAIT);
    if (got < 0 && link_lost(errno))
        got = 0; /* a reset is an EOF: the destination pauses either way */
    if (got < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : fail(d, -errno, "recv(page channel): %s", strerror(errno));
    if (got == 0) {
        d->link_down = 1;
        return PCH_RUN_EOF;
    }
    r->end += (uint64_t)got;
    r->drained = (uint64_t)got < room;
    return take_frames(d, fd, ch);
}

/* Send the queued requests as far as the return path takes them, never waiting: what it does not
 * take stays queued and goes when the socket says it has room (EPOLLOUT in the loop, arm_out).  A
 * loop that waited here would stop reading faults, placing pages and seeing quit, while a source
 * that waits to send pages to us stops reading requests: each would wait for the other. */
static int send_requests(struct pch_dest *d, int fd)
{
    if (d->link_down || fd < 0)
        return 0; /* no source: the faults stay waiters, asked for again by pch_dest_reconnect */
    while (d->req_sent < d->req_len) {
        ssize_t n = send(fd, d->req + d->req_sent, d->req_len - d->req_sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                d->st.rp_full++; /* full: the rest waits for room */
                return 0;
            }
            if (link_lost(errno)) { /* the source is gone: pause (PCH_RUN_EOF), keep the waiters */
                d->link_down = 1;
                d->loop_result = PCH_RUN_EOF;
                return 0;
            }
            return fail(d, -errno, "send(return path): %s", strerror(errno));
        }
        d->req_sent += (uint64_t)n;
    }
    d->req_len = d->req_sent = 0;
    return 0;
}

static int requests_queued(const struct pch_dest *d) { return d->req_sent < d->req_len; }

/* Wait for room on the return path (EPOLLOUT on the stream socket) exactly while requests are queued. */
static void arm_out(struct pch_dest *d, struct pch_dest_loop *l)
{
    int want = requests_queued(d) && !d->link_down && l->stream_fd >= 0;
    if (want == d->out_armed)
        return;
    struct epoll_event ev = { .events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = l->stream_fd };
    if (l->stream_fd >= 0)
        epoll_ctl(l->epfd, EPOLL_CTL_MOD, l->stream_fd, &ev);
    d->out_armed = want;
}

/* Read the urgent channel: answers first, whole (a huge page must not come in at the stream's pace),
 * until a read comes short (the socket is empty then: saves a recv that says EAGAIN; epoll is
 * level-triggered, so whatever comes next is seen next turn), at most urgent_turns reads, and not
 * past a big frame or frames held for the next turn (the faults come first). */
static int serve_urgent(struct pch_dest *d, struct pch_dest_loop *l)
{
    int fd = l->urgent_fd, rc = 0;
    d->urgent_served = 1;
    for (uint32_t n = 0; n < d->pol.urgent_turns && (rc = on_channel(d, fd, 1)) == 1 && !d->rx[1].drained
                         && !d->rx[1].held && !d->yield; n++)
        ;
    if (rc == PCH_RUN_EOF) {
        epoll_ctl(l->pri_epfd, EPOLL_CTL_DEL, fd, NULL);
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
        d->loop_result = PCH_RUN_EOF;
    }
    return rc < 0 ? rc : 0;
}

/* Serve the ready uffds and urgent channel among evs[0..k) (the uffds alone with faults_only; other
 * fds are left to the caller).  A dead one is taken out of both sets (the main set holds them too
 * when it is flat, see dest.h). */
static int serve_ready(struct pch_dest *d, struct pch_dest_loop *l, const struct epoll_event *evs, int k,
                       int faults_only)
{
    for (int i = 0; i < k; i++) {
        int fd = evs[i].data.fd, rc = 0;
        int32_t port = fd >= 0 && fd < l->nfds ? l->port_of_fd[fd] : -1;
        if (port >= 0) {
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
                epoll_ctl(l->pri_epfd, EPOLL_CTL_DEL, fd, NULL); /* nothing more will come */
                epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
                port_dead(d, &d->ports[port]);
            } else {
                rc = read_faults(d, port);
            }
        } else if (fd == l->urgent_fd && !faults_only) {
            rc = serve_urgent(d, l);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Serve what is ready in the priority set (every uffd, and the urgent channel unless faults_only)
 * without blocking, then send the requests that made.  An EOF seen here is kept in d->loop_result. */
static int serve_ready_set(struct pch_dest *d, struct pch_dest_loop *l, int faults_only)
{
    struct epoll_event evs[256];
    int k;
    do {
        k = epoll_wait(l->pri_epfd, evs, 256, 0);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return fail(d, -errno, "epoll_wait: %s", strerror(errno));
        }
        int rc = serve_ready(d, l, evs, k, faults_only);
        if (rc < 0)
            return rc;
    } while (k == 256); /* more may be ready than one call returns */
    return requests_queued(d) ? send_requests(d, l->stream_fd) : 0;
}


static int serve_priority(struct pch_dest *d, struct pch_dest_loop *l) { return serve_ready_set(d, l, 0); }
static int serve_faults(struct pch_dest *d, struct pch_dest_loop *l) { return serve_ready_set(d, l, 1); }

int pch_dest_run(struct pch_dest *d, struct pch_dest_loop *l, int budget_ms)
{
    struct epoll_event evs[256];
    int64_t end = now_ns() + (int64_t)budget_ms * 1000000;
    int rc = 0, streamed = 0; /* streamed: the last turn read the stream */
    l->idle_ns = 0;
    d->loop = l;
    d->loop_result = 0;
    for (;;) {
        int64_t left = end - now_ns();
        if (left <= 0 || d->ev_len >= d->pol.events_ship)
            break;
        if (d->plant == PCH_PLANT_REVERT)
            plant_revert(d);
        arm_out(d, l);
        /* whole frames held from the last turn: look at the fds without waiting, then take them */
        int held0 = d->rx[0].held && l->stream_fd >= 0, held1 = d->rx[1].held && l->urgent_fd >= 0;
        d->yield = d->urgent_served = 0;
        int64_t t0 = now_ns();
        int k = 0;
        /* The next event (a fault, an answer) is usually a few microseconds away.  Looking for it a
         * while without sleeping spares its sender the wake-up of this CPU (an IPI, and a halt exit
         * in a VM) and us the way back from idle.  sched_yield between the looks: the source (on
         * this CPU with --pin) or a vCPU just woken may need this very CPU to produce it.  Not
         * while the stream flows: its data comes in big reads, and the spin only took CPU from it. */
        if (d->pol.spin_ns && !d->precopy && !streamed && !held0 && !held1) {
            int64_t t = t0;
            for (int64_t until = t0 + (d->pol.spin_ns < left ? d->pol.spin_ns : left); !k && (t = now_ns()) < until;)
                if (!(k = epoll_wait(l->epfd, evs, 256, 0)))
                    sched_yield(); /* unpinned, the vCPU just woken may be queued on this CPU: let it run */
            d->st.spin_ns += (uint64_t)(t - t0); /* to the last look's start: its own syscall not counted */
        }
        if (!k) {
            int64_t rest = held0 || held1 ? 0 : end - now_ns();
            k = epoll_wait(l->epfd, evs, 256, rest > 0 ? (int)((rest + 999999) / 1000000) : 0);
        }
        if (k < 0) {
            if (errno == EINTR)
                continue;
            rc = fail(d, -errno, "epoll_wait: %s", strerror(errno));
            break;
        }
        if (k == 0 && !held0 && !held1)
            l->idle_ns += now_ns() - t0;
        int stream_ready = 0, nested = 0, room = 0;
        streamed = 0;
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            uint64_t v;
            if (fd == l->stream_fd) {
                stream_ready = (evs[i].events & ~(uint32_t)EPOLLOUT) != 0; /* data, EOF or an error */
                room = (evs[i].events & EPOLLOUT) != 0;
            } else if (fd == l->pri_epfd)
                nested = 1;
            else if (fd == l->quit_fd && read(fd, &v, sizeof v) == sizeof v) {
                l->quit_seen = 1;
                if (!d->loop_result)
                    d->loop_result = PCH_RUN_QUIT;
            }
        }
        /* a flat main set brings the uffds and the urgent channel in this same wait (one syscall per
         * wake-up instead of two); a nested one says only that the priority set has something */
        if ((rc = nested ? serve_priority(d, l) : serve_ready(d, l, evs, k, 0)) < 0)
            break;
        if (held1 && !d->urgent_served && (rc = serve_urgent(d, l)) < 0)
            break;
        /* an urgent big frame (a huge page) was placed: the faults of the vCPUs it woke, and their
         * requests, before the stream (the source prepares their pages meanwhile) */
        if (d->yield && (rc = serve_faults(d, l)) < 0)
            break;
        if ((room || !nested) && requests_queued(d) && (rc = send_requests(d, l->stream_fd)) < 0)
            break;
        if (stream_ready || held0) { /* the stream last */
            streamed = 1;
            rc = on_channel(d, l->stream_fd, 0);
            if (rc == 1)
                rc = 0;
            if (rc == PCH_RUN_EOF) {
                epoll_ctl(l->epfd, EPOLL_CTL_DEL, l->stream_fd, NULL);
                d->loop_result = PCH_RUN_EOF;
                rc = 0;
            }
            if (rc < 0)
                break;
            if (requests_queued(d) && (rc = send_requests(d, l->stream_fd)) < 0)
                break;
        }
        if (d->loop_result) {
            rc = d->loop_result;
            break;
        }
    }
    d->loop = NULL;
    return rc;
}

/* The received map, as RECV_BITMAP messages, then RESUME with the count (see wire.h). */
static int send_received_map(struct pch_dest *d) /* step: send received map (queued) */
{
    uint64_t total = 0;
    for (uint64_t first = 0; first < d->npages; first += (uint64_t)PCH_BITMAP_CHUNK * 8) {
        uint64_t n = d->npages - first < (uint64_t)PCH_BITMAP_CHUNK * 8 ? d->npages - first : (uint64_t)PCH_BITMAP_CHUNK * 8;
        uint64_t nbytes = (n + 7) / 8, body = sizeof(struct pch_rp_bitmap) + nbytes;
        if (grow(&d->req, &d->req_cap, d->req_len + sizeof(struct pch_rp_hdr) + body))
            return -ENOMEM;
        struct pch_rp_hdr *h = (struct pch_rp_hdr *)(d->req + d->req_len);
        struct pch_rp_bitmap *b = (struct pch_rp_bitmap *)(h + 1);
        *h = (struct pch_rp_hdr){ htobe16(PCH_RP_RECV_BITMAP), htobe16((uint16_t)body) };
        *b = (struct pch_rp_bitmap){ htobe64(first), htobe32((uint32_t)n) };
        uint8_t *bits = (uint8_t *)(b + 1);
        memset(bits, 0, nbytes);
        for (uint64_t k = 0; k < n; k++)
            if (d->received[first + k]) {
                bits[k >> 3] |= (uint8_t)(1u << (k & 7));
                total++;
            }
        d->req_len += sizeof *h + body;
    }
    struct { struct pch_rp_hdr h; struct pch_rp_resume r; } PCH_PACKED resume = {
        { htobe16(PCH_RP_RESUME), htobe16(sizeof resume.r) }, { htobe64(total) } };
    if (grow(&d->req, &d->req_cap, d->req_len + sizeof resume))
        return -ENOMEM;
    memcpy(d->req + d->req_len, &resume, sizeof resume);
    d->req_len += sizeof resume;
    return 0;
}

/* Step: resume (postcopy recovery, to a new source): the received map, then every waiter asked again */
static int resume(struct pch_dest *d, int stream_fd)
{
    /* a frame the old source half sent is dropped: its pages are not received, so asked again */
    for (int ch = 0; ch < 2; ch++) {
        d->rx[ch].start = d->rx[ch].end = 0;
        d->rx[ch].held = d->stopped[ch] = 0;
        d->rx[ch].direct = 0; /* --place continue: a frame half received into place is not placed */
        d->part[ch].valid = 0;
        d->hello[ch] = d->eos[ch] = 0;
    }
    d->sent_id = 0; /* a new source learns the RAM block's id from the first request again */
    d->req_len = d->req_sent = 0; /* requests meant for the old source: every waiter is asked for below */
    d->out_armed = 0;             /* the new channels are registered afresh, for reading */
    d->link_down = 0;
    d->st.reconnects++;
    if (send_received_map(d))
        return fail(d, -ENOMEM, "out of memory for the received map");
    int asked = 0;
    for (uint64_t page = 0; page < d->npages; page++)
        if (d->head[page] >= 0 && !d->received[page]) {
            if (append_request(d, page))
                return fail(d, -ENOMEM, "out of memory for requests");
            asked++;
        }
    d->st.re_requested += (uint64_t)asked;
    int rc = send_requests(d, stream_fd);
    if (rc < 0)
        return rc;
    if (d->link_down)
        return fail(d, -EPIPE, "the new source went away during the resume");
    return asked;
}

int pch_dest_reconnect(struct pch_dest *d, int stream_fd) { return resume(d, stream_fd); }

int pch_dest_hellos(const struct pch_dest *d) { return d->hello[0] + d->hello[1]; }
