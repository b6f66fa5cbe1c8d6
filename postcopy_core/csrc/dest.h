/*
 * dest.h - the destination: its loop (pch_dest_run) and the per-fault, per-page work, in C
 * (dest.c's header says why).  postcopy_core/handler.py creates it with the tunables
 * (struct pch_dest_policy), registers the fds, calls pch_dest_run in turns and ships the event
 * records; the C loop reads faults, sends the requests (QEMU's REQ_PAGES layout) on the return
 * path, places pages and wakes every vCPU blocked on one (its read fault, or the access board,
 * postcopy_core/board.py, for faults not read yet).  pch_dest_on_uffd and pch_dest_on_data are the
 * same steps, callable alone (the tests drive them so).
 */
#ifndef PCH_DEST_H
#define PCH_DEST_H
#include <stddef.h>
#include <stdint.h>

/* a page channel's receive buffer: the largest frame (a 2 MiB huge page) several times over */
#define PCH_RX_CAP 8388608
#define PCH_PACKED __attribute__((packed))

struct pch_port {
    int fd;            /* the uffd */
    int alive;         /* 0 once an ioctl through it said the process is gone */
    int32_t vcpu;
    uint32_t pid;
    uint64_t base;     /* guest RAM address in that process */
    uint32_t other_events;
};

/* One record per fault and per placed page: the accounting engines' input (little endian, packed,
 * 26 bytes).  The layout is this declaration: the binding (postcopy_core/_cffi_src/dest.py, packed)
 * is checked against it field by field when built, and harness/accounting.py's numpy dtype and
 * handler.py's struct format are made from cffi's field offsets. */
struct PCH_PACKED pch_event {
    int64_t t;         /* CLOCK_MONOTONIC ns */
    uint64_t addr;     /* RAM offset */
    int32_t vcpu;      /* -1: not a vCPU (or a placement) */
    uint32_t tid;
    uint8_t kind;      /* 'F' fault, 'P' placed */
    uint8_t flag;      /* F: page already received; P: zero page */
};

struct pch_dest_stats {
    uint64_t faults, faults_vcpu, faults_already_received, requests, pages_requested;
    uint64_t placed, placed_urgent, placed_background, placed_zero, duplicates, wakes;
    uint64_t copy_eexist, dead_ports, eos, frames, board_wakes;
    uint64_t t_last_place; /* CLOCK_MONOTONIC ns of the last placement: the end of postcopy */
    uint64_t reconnects, re_requested; /* postcopy recovery: new sources, requests sent again to them */
    /* precopy (pch_dest_set_precopy): pages placed before postcopy (net of discards), pages dropped
     * by DISCARD, precopy pages sent again (rewritten in place), DISCARD messages, faults on and
     * requests for dropped pages, and when POSTCOPY_START came (0: not yet) */
    uint64_t placed_precopy, discarded, precopy_rewrites, discard_msgs, faults_discarded, requests_discarded;
    uint64_t t_postcopy_start;
    uint64_t planted; /* run --plant-bug: how many times the planted bug acted */
    uint64_t direct_skipped; /* --place continue: pages of a frame received into place that were placed
                              * meanwhile, so the rest of the receive left them alone */
    uint64_t rp_full;        /* sends of requests that found the return path full (the rest was queued) */
    uint64_t spin_ns;        /* wall time spent looking for the next event before sleeping (policy spin_ns):
                              * what of the handler's CPU was polling rather than work, at most */
};

/* The destination's tunables, in one place: postcopy_core/handler.py fills it (DestPolicy, which
 * holds the defaults and why they are what they are) and pch_dest_new copies it. */
struct pch_dest_policy {
    uint64_t rx_turn;          /* bytes one read from a page channel may take (1..PCH_RX_CAP) */
    uint64_t direct_min;       /* --place continue: PAGES frames this big or bigger are received straight
                                * into place; after placing one, the uffds are read at once */
    uint64_t events_ship;      /* pch_dest_run returns once this many event bytes wait for Python */
    int64_t spin_ns;           /* look for the next event this long (yielding) before sleeping in epoll_wait */
    uint32_t urgent_turns;     /* reads in a row the urgent channel may take in one turn */
    uint32_t board_scan_slots; /* the access board is scanned once per vCPUs / this placements (>= 1) */
};

struct pch_dest;

struct pch_dest *pch_dest_new(uint64_t page_size, uint64_t npages, uint8_t *received,
                              struct pch_port *ports, int nports, struct pch_port *carrier,
                              const uint32_t *tids, const int32_t *tid_vcpu, int ntids,
                              int hugetlb, uint64_t zero_page, int wake_all, const char *idstr,
                              const uint64_t *board, int nboard, const struct pch_dest_policy *policy);
void pch_dest_free(struct pch_dest *d);
int pch_dest_on_uffd(struct pch_dest *d, int port);
/* Start in precopy (run --precopy): the stream may carry DISCARD and POSTCOPY_START, pages sent
 * again overwrite the old copy, and placements make no events until POSTCOPY_START (no vCPU runs
 * before it, as at a QEMU destination).  `memfd` is guest RAM, where DISCARD punches holes. */
void pch_dest_set_precopy(struct pch_dest *d, int memfd);
int64_t pch_dest_on_data(struct pch_dest *d, const uint8_t *buf, uint64_t len, int urgent_channel);
/* buffered output: pointer/length, and reset after Python sent it */
const uint8_t *pch_dest_requests(struct pch_dest *d, uint64_t *len);
const uint8_t *pch_dest_events(struct pch_dest *d, uint64_t *len);
void pch_dest_clear_requests(struct pch_dest *d);
void pch_dest_clear_events(struct pch_dest *d);
const struct pch_dest_stats *pch_dest_stats(struct pch_dest *d);

/* The whole loop turn in C.  Two epoll sets, registered by the caller with data.fd = the fd:
 * `pri_epfd` holds every uffd and the urgent channel, `epfd` holds the stream channel, the quit
 * eventfd and either pri_epfd (nested) or every fd of pri_epfd again (flat: one epoll_wait per
 * wake-up; what is ready in epfd is served in the same order, priority fds before the stream).  Faults and urgent pages are served first, and again between the stream's
 * frames, so a fault never waits for more than one stream frame.  Returns after `budget_ms`, or
 * sooner when events pile up or on quit/EOF, so the caller can ship events and watch the clock.
 * Result: PCH_RUN_* or -errno (error text in pch_dest_error). */
#define PCH_RUN_AGAIN 0     /* budget spent (or events to ship); call again */
#define PCH_RUN_QUIT 1      /* the quit eventfd fired */
#define PCH_RUN_EOF 2       /* a page channel reached EOF, or the link broke (ECONNRESET, EPIPE...) */
#define PCH_RUN_POSTCOPY 3  /* POSTCOPY_START arrived (precopy is over): tell the orchestrator */
struct pch_dest_loop {
    int epfd, pri_epfd, quit_fd, stream_fd, urgent_fd;
    const int32_t *port_of_fd;   /* fd -> port index, -1 for other fds */
    int nfds;                    /* size of port_of_fd */
    int64_t idle_ns;             /* out: time the last call spent in epoll_wait with nothing ready */
    int quit_seen;               /* out: the quit eventfd fired (stays set, even when EOF is returned) */
};
int pch_dest_run(struct pch_dest *d, struct pch_dest_loop *l, int budget_ms);
const char *pch_dest_error(struct pch_dest *d);
/* --place continue: pages go into the page cache through `ram`, the destination's own mapping of
 * guest RAM (not registered, populated with zeroed pages), and waiters get UFFDIO_CONTINUE */
void pch_dest_set_continue(struct pch_dest *d, uint64_t ram);

/* Postcopy recovery (QEMU's postcopy-paused -> recover -> active).  After PCH_RUN_EOF the caller
 * takes the dead channels out of the loop (stream_fd/urgent_fd = -1): pch_dest_run goes on serving
 * the uffds, faults become waiters whose requests wait for a source, nothing is placed.  With the
 * new source's channels, pch_dest_reconnect drops what the old one half sent, forgets both HELLOs,
 * and sends on the new return path the received map (RECV_BITMAP..., RESUME, wire.h) and a request
 * for every page a fault waits for.  Returns how many pages it asked for again, or -errno (-EPIPE
 * and the like: this source is gone too).  pch_dest_hellos: how many of the two channels of the
 * current source said HELLO (2: the new source is live). */
int pch_dest_reconnect(struct pch_dest *d, int stream_fd);

/* run --plant-bug (harness/plant.py): misbehave on purpose, so that the write checker
 * (vcpu_workers/stores.py) is credited only with bugs it has been seen to catch */
#define PCH_PLANT_NONE 0
#define PCH_PLANT_REVERT 1     /* revert-after-write: put a faulted page's source bytes back once a vCPU wrote it */
#define PCH_PLANT_ZERO 2       /* zero-page: place zeros for one in four non-zero pages a vCPU waits for */
#define PCH_PLANT_WRONG 3      /* wrong-page: one in four waited-for pages also goes in at another offset */
#define PCH_PLANT_STALE 4      /* stale-generation: a page dropped by DISCARD gets its old bytes when placed */
#define PCH_PLANT_LOST_WAKE 5  /* lost-wake: the first waited-for page is placed and its waiter never woken */
#define PCH_PLANT_RESEND 6     /* resend-overwrite: after a recovery, pages sent again overwrite what we had */
void pch_dest_set_plant(struct pch_dest *d, int kind);
int pch_dest_hellos(const struct pch_dest *d);

#endif
