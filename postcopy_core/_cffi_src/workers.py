"""Binding: the vCPU workers (csrc/pch.h's guest sections): the page content generator, the
workloads (csrc/workloads.c), the timed touch loop, the results slots and the worker processes
(csrc/worker.c), which vcpu_workers/ drives."""

INCLUDES = '#include "pch.h"'

TYPES = """
enum pch_workload { PCH_WL_SEQUENTIAL, PCH_WL_RANDOM, PCH_WL_STRIDE, PCH_WL_HOTSET, PCH_WL_SHARED, ... };

struct pch_worker_result {
    int64_t vcpu, pid, state;
    uint64_t accesses, faulting, stall_ns, max_ns, all_ns, pages_checked, words_checked, mismatches;
    int64_t first_bad_page;
    uint64_t t_start, t_end, t_forked, t_ready;
    uint64_t stores, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    uint64_t pending;
    uint64_t removes;
    uint64_t forks;
    uint64_t unmaps;
    uint64_t pieces[2];
    uint64_t piece_faults;
    struct pch_finding bad;
    uint64_t cpu_ns;
};

struct pch_touch {
    uint64_t base;
    uint64_t page_size;
    uint64_t npages;
    const uint32_t *order;
    uint64_t count;
    const uint8_t *is_write;
    uint64_t seed;
    uint32_t zero_permille;
    const uint8_t *ref;
    uint8_t *verified;
    uint64_t *board;
    const uint32_t *gens;
    uint32_t first_touch;
    const uint8_t *received;
    uint32_t yield_check;
    uint32_t *finish_line;
    uint32_t finish_count;
    int write_mode;
    uint32_t vcpu;
    uint32_t owner;
    uint64_t *ledger;
    uint32_t *mine;
    uint64_t *pending;
    uint32_t *remove_gens;
    uint64_t remove_threshold;
    uint64_t fork_at;
    uint64_t fork_timeout_ns;
    uint64_t unmap_at;
    int uffd, memfd;
    uint64_t register_mode;
    uint64_t moved_lo, moved_hi, moved_base;
    uint64_t *pieces;
    uint64_t piece_faults;
    uint32_t *lat_ns;
    uint32_t *lat_page;
    uint64_t *lat_start;
    uint64_t n_faulting;
    uint64_t stall_ns;
    uint64_t max_ns;
    uint64_t all_ns;
    uint64_t pages_checked;
    uint64_t words_checked;
    uint64_t mismatches;
    int64_t first_bad_page;
    uint64_t t_start, t_end;
    uint64_t cpu_ns;
    uint64_t stores, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    uint64_t removes;
    uint64_t forks;
    uint64_t unmaps;
    int64_t fork_stuck_page;
    struct pch_finding bad;
};

#define PCH_STATE_READY ...
#define PCH_STATE_DONE ...
#define PCH_STATE_FAILED ...
#define PCH_WORKER_BAD_CONTENT ...
#define PCH_WORKER_FAILED ...
#define PCH_WORKER_MAX_CPUS 16

struct pch_worker_plan {
    uint32_t nvcpus, ndevices;
    int memfd, start_fd, results_fd, board_fd;
    int gens_fd;
    int received_fd;
    uint32_t first_touch;
    uint64_t page_size, npages, seed;
    uint32_t zero_permille;
    const char *image;
    int kind;
    int device_kind;
    uint64_t device_seed;
    double write_ratio;
    int write_mode;
    int ledger_fd;
    uint64_t features;
    uint64_t register_mode;
    uint64_t need_ioctls;
    const char *need_what;
    const char *handoff;
    uint32_t handoff_len, handoff_version;
    char handoff_magic[4];
    char handoff_ack;
    uint64_t handoff_timeout_ms;
    uint64_t capacity, area_size, lat_off, pages_off, starts_off;
    uint64_t board_size;
    int cpus[PCH_WORKER_MAX_CPUS];
    int ncpus;
    double remove_rate;
    uint32_t fork_events;
    uint64_t fork_timeout_ms;
    uint32_t unmap_events;
};

struct pch_handoff_hello {
    char magic[4];
    uint32_t version;
    int32_t vcpu, pid;
    uint64_t base, length;
};
"""

FUNCTIONS = """
int pch_page_is_zero(uint64_t seed, uint64_t page, uint32_t zero_permille);
void pch_fill_pages(uint8_t *dst, uint64_t seed, uint64_t first_page, uint64_t npages,
                    uint64_t page_size, uint32_t zero_permille);
uint64_t pch_check_page(const uint8_t *p, uint64_t seed, uint64_t page, uint64_t page_size,
                        uint32_t zero_permille, const uint8_t *ref);
void pch_fill_page_gen(uint8_t *dst, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                       uint32_t zero_permille);
uint64_t pch_check_page_gen(const uint8_t *p, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                            uint32_t zero_permille, const uint8_t *ref);

uint64_t pch_order_length(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages);
int64_t pch_make_order(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages, uint64_t seed, uint32_t *out);
void pch_make_writes(uint8_t *out, uint64_t n, double ratio, uint64_t seed, uint32_t vcpu);

int pch_touch_run(struct pch_touch *t);
uint32_t pch_finish_line_cross(uint32_t *line, uint32_t count);
void pch_finish_line_wait(uint32_t *line, uint32_t count);

int pch_worker_main(const struct pch_worker_plan *p, uint32_t w, uint64_t t_forked);
int pch_spawn_workers(const struct pch_worker_plan *p, uint32_t first, uint32_t count, int32_t *pids, int *err);
"""

SOURCES = ["workloads.c", "worker.c"]
