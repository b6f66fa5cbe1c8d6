/*
 * pch.h - the C side of postcopy-harness's kernel interface.
 *
 * What is declared here (the destination has its own header, dest.h):
 *  - thin syscall/ioctl wrappers (pch.c) that return 0 (or a value) on success and -errno on
 *    failure, so the Python layer can raise an error naming the operation and errno;
 *  - tight loops that Python cannot run at kernel speed: the page content generator/checker
 *    (verify.c), the workloads (workloads.c), the vCPU worker's timed touch loop, the source's
 *    byte lane (source.c: what to stream and in which order stays Python's), and the whole vCPU
 *    worker process (worker.c), which never returns to Python.
 */
#ifndef PCH_H
#define PCH_H
#include <stddef.h>
#include <stdint.h>

#include "verify.h"
#include "wire.h"

/* ---- userfaultfd ---- */
int pch_userfaultfd(int flags);
int pch_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int pch_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int pch_uffd_unregister(int fd, uint64_t start, uint64_t len);
int pch_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode);
int pch_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode);
/* the same, telling in *done how many bytes went in before an error */
int pch_uffd_copy_upto(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, uint64_t *done);
int pch_uffd_zeropage_upto(int fd, uint64_t dst, uint64_t len, uint64_t mode, uint64_t *done);
int pch_uffd_wake(int fd, uint64_t start, uint64_t len);
/* UFFDIO_CONTINUE: map pages already in the page cache (a MINOR fault's answer), *done as above */
int pch_uffd_continue_upto(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done);
int pch_uffd_read_faults(int fd, uint64_t *addr, uint64_t *flags, uint32_t *ptid, int max,
                         uint32_t *other_events);

/* ---- memfd, eventfd, mmap ---- */
int pch_memfd_create(const char *name, unsigned int flags);
int pch_eventfd(unsigned int initval, int flags);
int pch_mmap(uint64_t len, int prot, int flags, int fd, uint64_t off, uint64_t *addr_out);
int pch_munmap(uint64_t addr, uint64_t len);
int pch_madvise(uint64_t addr, uint64_t len, int advice);

/* ---- guest RAM content: deterministic per page from a seed ---- */
int pch_page_is_zero(uint64_t seed, uint64_t page, uint32_t zero_permille);
void pch_fill_pages(uint8_t *dst, uint64_t seed, uint64_t first_page, uint64_t npages,
                    uint64_t page_size, uint32_t zero_permille);
uint64_t pch_check_page(const uint8_t *p, uint64_t seed, uint64_t page, uint64_t page_size,
                        uint32_t zero_permille, const uint8_t *ref);
/* the content of a page that the guest rewrote `gen` times during precopy (run --precopy): gen 0 is
 * the content above; a rewritten page is never all zeros (precopy.py, the dirtying model) */
void pch_fill_page_gen(uint8_t *dst, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                       uint32_t zero_permille);
uint64_t pch_check_page_gen(const uint8_t *p, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                            uint32_t zero_permille, const uint8_t *ref);

/* ---- workloads (workloads.c): kind = index in vcpu_workers.workloads.WORKLOADS ---- */
/* the kinds, declared here alone: vcpu_workers/workloads.py builds WORKLOADS from this enum (names
 * lower-cased, without the prefix) */
enum pch_workload { PCH_WL_SEQUENTIAL = 0, PCH_WL_RANDOM = 1, PCH_WL_STRIDE = 2, PCH_WL_HOTSET = 3, PCH_WL_SHARED = 4 };
uint64_t pch_order_length(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages);
int64_t pch_make_order(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages, uint64_t seed, uint32_t *out);
void pch_make_writes(uint8_t *out, uint64_t n, double ratio, uint64_t seed, uint32_t vcpu);

/* ---- what each worker reports, in the shared results area (vcpu_workers/results.py) ---- */
struct pch_worker_result {
    int64_t vcpu, pid, state;
    uint64_t accesses, faulting, stall_ns, max_ns, all_ns, pages_checked, words_checked, mismatches;
    int64_t first_bad_page;
    uint64_t t_start, t_end, t_forked, t_ready;
    /* stores (verify.h): made, checked by a later read, found lost; wrong pages and words by kind */
    uint64_t stores, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    uint64_t pending;            /* page + 1 while a store is under way: a worker killed mid-store leaves it */
    uint64_t removes;            /* pages this worker gave back (run --remove-rate, MADV_REMOVE) */
    uint64_t forks;              /* children it forked mid-run (run --fork-events) */
    uint64_t unmaps;             /* pieces of guest RAM it unmapped and mapped back, moved (run --unmap-events) */
    uint64_t pieces[2];          /* their first pages + 1 (0: none), [0] unmapped and mapped back, [1] moved;
                                  * set before the munmap/mremap, for the stall watch to name */
    uint64_t piece_faults;       /* faults it took in those pieces after them: the handler served them */
    struct pch_finding bad;      /* the first wrong thing this worker read */
    uint64_t cpu_ns;             /* CPU time this worker spent in its timed loop (CLOCK_PROCESS_CPUTIME_ID) */
};

/* ---- the vCPU worker's timed touch loop ---- */
struct pch_touch {
    /* in */
    uint64_t base;            /* address of guest RAM in this process */
    uint64_t page_size;
    uint64_t npages;
    const uint32_t *order;    /* page index of each access */
    uint64_t count;
    const uint8_t *is_write;  /* per access: 1 = store, 0 = load (NULL: all loads) */
    uint64_t seed;
    uint32_t zero_permille;
    const uint8_t *ref;       /* expected image (--image) or NULL: use the seed generator */
    uint8_t *verified;        /* per page: 1 once this worker read it, 2 once checked after the loop */
    uint64_t *board;          /* this vCPU's access-board slot (postcopy_core/board.py), or NULL */
    const uint32_t *gens;     /* per page: its final generation (run --precopy), or NULL: all 0 */
    uint32_t first_touch;     /* 1: registered MINOR too (run --place continue), where every first
                               * touch of a page in this process traps: that is the faulting test */
    const uint8_t *received;  /* else the received map, or NULL: mincore (see pch_touch_run) */
    uint32_t yield_check;     /* 1: the after-loop check of every page runs at nice 19 (a worker
                               * process: vCPUs still faulting come first) */
    uint32_t *finish_line;    /* shared count of vCPUs past their timed loop, or NULL: the check
                               * waits until it reaches finish_count (pch_finish_line_cross) */
    uint32_t finish_count;
    /* stores (run --write-ratio, verify.h) */
    int write_mode;           /* PCH_WRITES_* */
    uint32_t vcpu;            /* whose stores these are */
    uint32_t owner;           /* 1: a vCPU (a page it never wrote has no other writer in OWN mode); 0: a
                               * non-vCPU process, which reads pages that vCPUs write */
    uint64_t *ledger;         /* shared, per page: the last value stored (OWN) or the increments made (COUNT) */
    uint32_t *mine;           /* per page: OWN 1 + the number of this vCPU's last store there (0: none);
                               * COUNT its increments there */
    uint64_t *pending;        /* this worker's result slot's `pending` */
    uint32_t *remove_gens;    /* run --remove-rate: the generation map, written here (PCH_GEN_REMOVED), or NULL */
    uint64_t remove_threshold; /* an access drops its page after it when a hash of it is below this */
    uint64_t fork_at;         /* run --fork-events: after this many accesses fork a child that reads the next
                               * pages (its uffd reaches the handler as UFFD_EVENT_FORK); 0: never */
    uint64_t fork_timeout_ns; /* how long the child may take */
    uint64_t unmap_at;        /* run --unmap-events: after this many accesses unmap a piece of guest RAM and map
                               * it back (UFFD_EVENT_UNMAP, registered again), then mremap another piece
                               * elsewhere (UFFD_EVENT_REMAP); 0: never */
    int uffd, memfd;          /* for that: this worker's uffd (kept open) and the guest RAM memfd */
    uint64_t register_mode;
    uint64_t moved_lo, moved_hi, moved_base; /* pages [lo, hi) live at moved_base now (hi == 0: none moved) */
    uint64_t *pieces;         /* this worker's result slot's `pieces` */
    uint64_t piece_faults;    /* out: faults in those pieces after the munmap/mremap */
    /* out */
    uint32_t *lat_ns;         /* latency of each faulting access, in order */
    uint32_t *lat_page;       /* page of each faulting access */
    uint64_t *lat_start;      /* CLOCK_MONOTONIC ns at which each faulting access began, or NULL;
                               * the stall interval is [lat_start, lat_start + lat_ns) */
    uint64_t n_faulting;
    uint64_t stall_ns;        /* sum of faulting-access latencies: the worker's stall clock */
    uint64_t max_ns;
    uint64_t all_ns;          /* sum of every access latency */
    uint64_t pages_checked;
    uint64_t words_checked;
    uint64_t mismatches;      /* mismatching 64-bit words */
    int64_t first_bad_page;   /* -1 when none */
    uint64_t t_start, t_end;  /* CLOCK_MONOTONIC ns */
    uint64_t cpu_ns;          /* CPU time of the timed loop, user and system (the faults' kernel work is ours) */
    uint64_t stores, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    uint64_t removes;         /* pages given back */
    uint64_t forks;           /* children forked (run --fork-events) */
    uint64_t unmaps;          /* pieces unmapped and mapped back, moved (run --unmap-events) */
    int64_t fork_stuck_page;  /* a page the child still waited on at its timeout, or -1 */
    struct pch_finding bad;   /* the first wrong page or word read */
};
int pch_touch_run(struct pch_touch *t);
/* The finish line: every vCPU adds one once its timed loop is over (the orchestrator adds one for a
 * vCPU lost before it); the last one wakes those waiting.  Returns the count after the add. */
uint32_t pch_finish_line_cross(uint32_t *line, uint32_t count);
void pch_finish_line_wait(uint32_t *line, uint32_t count);
uint64_t pch_now_ns(void);
uint64_t pch_process_cpu_ns(void);

/* ---- the source's byte lane (source.c): policy (what to stream, in which order) is Python's ---- */
#define PCH_SENT_STREAM 1   /* sent[] values: went out on the background stream */
#define PCH_SENT_URGENT 2   /*                went out on the urgent channel */
struct pch_source {
    int fd;                 /* the urgent channel */
    int id_known;           /* the lane may take the return path: the block's id came (REQ_PAGES_ID) and
                             * the Python reader holds no part of a message */
    const struct pch_rp_reader *rp; /* the Python reader's checks (wire.h), the lane's too */
    int resend_streamed;    /* answer a request for a page already on the stream (small pages) */
    const uint8_t *image;   /* guest RAM as the source holds it */
    const uint8_t *zero;    /* per page: 1 = all zeros (sent as ZERO) */
    uint8_t *sent;          /* per page: PCH_SENT_* once sent */
    uint64_t page_size, ram_size;
    uint64_t requests, pages_urgent, pages_zero, requested_already_sent, bytes_sent, pages_stream;
    /* only when the strategy asks (postcopy_core/strategies.py, wants_requests): the first page of
     * each request answered here goes into requested[requested_len++] while there is room */
    uint32_t *requested;
    uint64_t requested_cap, requested_len;
    uint64_t pages_pushed;  /* pages sent by pch_source_push */
};
/* Answers the leading plain REQ_PAGES messages of buf, as pch_rp_parse (wire.h) decodes and checks
 * them against s->rp; returns bytes consumed or -errno.  A
 * requested page is sent at once unless it already went out: urgently, or on the stream when
 * resend_streamed is 0.  A small page that went on the stream may sit behind megabytes of the
 * stream's backlog, and sending it again costs little (the destination asks only for pages it
 * lacks, and drops the copy that comes second); a huge page would cost as much as it saves. */
int64_t pch_source_answer(struct pch_source *s, const uint8_t *buf, uint64_t len);

/* Pushes pages[0..n) on s->fd, right now, as plain (not urgent) one-page frames, marked
 * PCH_SENT_URGENT (they travel the answers' channel): the strategy's pages "next" (prepage's
 * neighbours).  A page is skipped as an answer's would be (above: one that went on the stream is
 * pushed again when resend_streamed).  Returns how many pages went, or -errno. */
int64_t pch_source_push(struct pch_source *s, const uint32_t *pages, uint64_t n);

/* The streaming lane: sends the pages of `order` (a batch of page numbers chosen by the Python
 * strategy) on the stream as PAGES/ZERO frames of consecutive unsent pages, while answering
 * requests first.  A frame the socket did not take whole stays in `part` (never interleaved).
 * With order == NULL it only serves requests. */
struct pch_pump {
    int rp_fd, ctl_fd, stream_fd;
    const uint32_t *order;
    uint64_t norder, pos;        /* pos: next index of order to look at */
    uint32_t max_run;            /* pages per stream frame at most */
    struct pch_frame_hdr hdr;    /* header of the frame in `part` */
    const uint8_t *part[2];      /* what is left of the current frame: header, data */
    uint64_t part_len[2];
    uint8_t *rest;               /* bytes for the Python parser (PCH_SERVE_REST) */
    uint64_t cap, rest_len;
    uint32_t spin;               /* 1: no stream is due while vCPUs run (demand paging): poll a
                                  * while for the next request before sleeping (source.c) */
};
#define PCH_SERVE_CONTROL 0   /* the control socket is readable */
#define PCH_SERVE_REST 1      /* rest[0..rest_len) holds a message the lane does not take */
#define PCH_SERVE_EOF 2       /* the destination closed the return path */
#define PCH_SERVE_MORE 3      /* order is sent (whole frames): give the next batch */
#define PCH_SERVE_REQUESTS 4  /* s->requested holds pages just answered (only with s->requested set) */
/* When s->fd is the stream socket (one channel, QEMU without preempt), answers go behind the
 * current frame, which is finished first. */
int pch_source_pump(struct pch_source *s, struct pch_pump *p);
/* Writes what is left of the current stream frame, waiting for room: before anything else goes
 * into the stream socket.  0 or -errno. */
int pch_pump_finish(struct pch_pump *p);

/* ---- process hygiene ---- */
int pch_set_pdeathsig(int sig);
int pch_set_name(const char *name);
int pch_set_child_subreaper(void);
int pch_setns(int fd, int nstype); /* join the namespace behind fd (Python 3.11 has no os.setns) */

/* ---- the vCPU worker processes (worker.c): forked and run in C, never back in Python ---- */
#define PCH_STATE_READY 1          /* pch_worker_result.state: vcpu_workers/results.py STATE_* */
#define PCH_STATE_DONE 2
#define PCH_STATE_FAILED 3
#define PCH_WORKER_BAD_CONTENT 4   /* exit code: read wrong content */
#define PCH_WORKER_FAILED 5        /* exit code: a step failed (one line on stderr) */
#define PCH_WORKER_MAX_CPUS 16
struct pch_worker_plan {           /* one for all workers, filled by vcpu_workers/worker.py */
    uint32_t nvcpus, ndevices;     /* workers 0..nvcpus-1 are vCPUs, the next ndevices non-vCPU processes */
    int memfd, start_fd, results_fd, board_fd;
    int gens_fd;                   /* run --precopy: each page's final generation (uint32), or -1 */
    int received_fd;               /* the received map (one byte per page, 1 = placed), or -1 */
    uint32_t first_touch;          /* run --place continue: registered MINOR too (struct pch_touch) */
    uint64_t page_size, npages, seed;
    uint32_t zero_permille;
    const char *image;             /* --image path, or NULL: the seed generator */
    int kind;                      /* workload (index in WORKLOADS) */
    int device_kind;               /* the non-vCPU processes' walk, and their seed offset */
    uint64_t device_seed;
    double write_ratio;
    int write_mode;                /* PCH_WRITES_* (verify.h) */
    int ledger_fd;                 /* the store ledger (one uint64 per page), or -1 without stores */
    uint64_t features;             /* uffd features to negotiate */
    uint64_t register_mode;        /* UFFDIO_REGISTER_MODE_* of the guest-RAM range */
    uint64_t need_ioctls;          /* ioctls the registered range must support (1 << _UFFDIO_*) */
    const char *need_what;         /* their name, for the error line */
    const char *handoff;           /* the abstract socket address (leading NUL), handoff_len bytes */
    uint32_t handoff_len, handoff_version;
    char handoff_magic[4];
    char handoff_ack;
    uint64_t handoff_timeout_ms;
    uint64_t capacity, area_size, lat_off, pages_off, starts_off;  /* results area layout */
    uint64_t board_size;
    int cpus[PCH_WORKER_MAX_CPUS];
    int ncpus;
    double remove_rate;            /* run --remove-rate: share of accesses after which the page is given back */
    uint32_t fork_events;          /* run --fork-events: each vCPU forks a reader mid-run */
    uint64_t fork_timeout_ms;
    uint32_t unmap_events;         /* run --unmap-events: each vCPU unmaps, maps back and moves pieces mid-run */
};
/* The hand-off hello a worker sends with its uffd (the fd rides along as SCM_RIGHTS), little endian,
 * no padding.  Declared here once; postcopy_core/handoff.py's HELLO is checked against it field by
 * field (tests/test_layouts.py). */
struct pch_handoff_hello {
    char magic[4];
    uint32_t version;
    int32_t vcpu, pid;
    uint64_t base, length;
};
/* The body of worker w (after its set-up); returns its exit code. */
int pch_worker_main(const struct pch_worker_plan *p, uint32_t w, uint64_t t_forked);
/* Fork workers first..first+count-1, each running pch_worker_main and _exiting; their pids go in
 * pids[].  Returns how many were forked (fewer: *err is fork's errno). */
int pch_spawn_workers(const struct pch_worker_plan *p, uint32_t first, uint32_t count, int32_t *pids, int *err);

#endif
