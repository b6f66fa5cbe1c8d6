"""Binding: the destination (csrc/dest.h, csrc/dest.c): its loop, the tunables, the event records
and counters that postcopy_core/handler.py reads."""

INCLUDES = '#include "dest.h"'

TYPES = """
#define PCH_RX_CAP ...

struct pch_port {
    int fd;
    int alive;
    int32_t vcpu;
    uint32_t pid;
    uint64_t base;
    uint32_t other_events;
};

struct pch_dest_stats {
    uint64_t faults, faults_vcpu, faults_already_received, requests, pages_requested;
    uint64_t placed, placed_urgent, placed_background, placed_zero, duplicates, wakes;
    uint64_t copy_eexist, dead_ports, eos, frames, board_wakes;
    uint64_t t_last_place;
    uint64_t reconnects, re_requested;
    uint64_t placed_precopy, discarded, precopy_rewrites, discard_msgs, faults_discarded, requests_discarded;
    uint64_t t_postcopy_start;
    uint64_t planted;
    uint64_t direct_skipped;
    uint64_t rp_full;
    uint64_t spin_ns;
};

struct pch_dest_policy {
    uint64_t rx_turn;
    uint64_t direct_min;
    uint64_t events_ship;
    int64_t spin_ns;
    uint32_t urgent_turns;
    uint32_t board_scan_slots;
};

struct pch_dest;

#define PCH_RUN_AGAIN ...
#define PCH_RUN_QUIT ...
#define PCH_RUN_EOF ...
#define PCH_RUN_POSTCOPY ...
struct pch_dest_loop {
    int epfd, pri_epfd, quit_fd, stream_fd, urgent_fd;
    const int32_t *port_of_fd;
    int nfds;
    int64_t idle_ns;
    int quit_seen;
};

#define PCH_PLANT_NONE ...
#define PCH_PLANT_REVERT ...
#define PCH_PLANT_ZERO ...
#define PCH_PLANT_WRONG ...
#define PCH_PLANT_STALE ...
#define PCH_PLANT_LOST_WAKE ...
#define PCH_PLANT_RESEND ...
"""

# the accounting engines' record: little endian, no padding (PCH_PACKED in C)
PACKED = """
struct pch_event {
    int64_t t;
    uint64_t addr;
    int32_t vcpu;
    uint32_t tid;
    uint8_t kind;
    uint8_t flag;
};
"""

FUNCTIONS = """
struct pch_dest *pch_dest_new(uint64_t page_size, uint64_t npages, uint8_t *received,
                              struct pch_port *ports, int nports, struct pch_port *carrier,
                              const uint32_t *tids, const int32_t *tid_vcpu, int ntids,
                              int hugetlb, uint64_t zero_page, int wake_all, const char *idstr,
                              const uint64_t *board, int nboard, const struct pch_dest_policy *policy);
void pch_dest_free(struct pch_dest *d);
int pch_dest_on_uffd(struct pch_dest *d, int port);
void pch_dest_set_precopy(struct pch_dest *d, int memfd);
int64_t pch_dest_on_data(struct pch_dest *d, const uint8_t *buf, uint64_t len, int urgent_channel);
const uint8_t *pch_dest_requests(struct pch_dest *d, uint64_t *len);
const uint8_t *pch_dest_events(struct pch_dest *d, uint64_t *len);
void pch_dest_clear_requests(struct pch_dest *d);
void pch_dest_clear_events(struct pch_dest *d);
const struct pch_dest_stats *pch_dest_stats(struct pch_dest *d);
int pch_dest_run(struct pch_dest *d, struct pch_dest_loop *l, int budget_ms);
const char *pch_dest_error(struct pch_dest *d);
void pch_dest_set_continue(struct pch_dest *d, uint64_t ram);
int pch_dest_reconnect(struct pch_dest *d, int stream_fd);
void pch_dest_set_plant(struct pch_dest *d, int kind);
int pch_dest_hellos(const struct pch_dest *d);
"""

SOURCES = ["dest.c"]
