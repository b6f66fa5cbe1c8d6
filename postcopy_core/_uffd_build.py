"""cffi (API mode) build script for postcopy_core._uffd, the kernel interface.

Declarations are grouped by header; the C helpers they call live in csrc/pch.c.  Built at install
time through setuptools' ``cffi_modules`` (see setup.py).
"""

from pathlib import Path

from cffi import FFI

# Relative to the project root: setuptools refuses absolute source paths.
CSRC = Path("postcopy_core") / "csrc"

ffibuilder = FFI()

# <linux/userfaultfd.h>: the constants we negotiate and register with.
ffibuilder.cdef(
    """
    #define UFFD_API ...
    #define UFFD_FEATURE_THREAD_ID ...
    #define UFFD_FEATURE_MISSING_SHMEM ...
    #define UFFD_FEATURE_MISSING_HUGETLBFS ...
    #define UFFD_FEATURE_EVENT_FORK ...
    #define UFFDIO_REGISTER_MODE_MISSING ...
    #define UFFDIO_COPY_MODE_DONTWAKE ...
    #define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
    #define UFFD_PAGEFAULT_FLAG_WRITE ...
    #define _UFFDIO_COPY ...
    #define _UFFDIO_ZEROPAGE ...
    #define _UFFDIO_WAKE ...
    #define _UFFDIO_REGISTER ...
    #define _UFFDIO_UNREGISTER ...
    #define _UFFDIO_API ...
    """
)

# <fcntl.h>, <sys/mman.h>, <sys/eventfd.h>: flags for the fds and mappings we make.
ffibuilder.cdef(
    """
    #define O_CLOEXEC ...
    #define O_NONBLOCK ...
    #define MFD_CLOEXEC ...
    #define MFD_HUGETLB ...
    #define MFD_ALLOW_SEALING ...
    #define EFD_CLOEXEC ...
    #define EFD_NONBLOCK ...
    #define PROT_READ ...
    #define PROT_WRITE ...
    #define MAP_SHARED ...
    #define MAP_PRIVATE ...
    #define MAP_ANONYMOUS ...
    #define MAP_NORESERVE ...
    #define MAP_POPULATE ...
    """
)

# csrc/pch.h: thin wrappers (return -errno) and the tight loops.
ffibuilder.cdef(
    """
    int pch_userfaultfd(int flags);
    int pch_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
    int pch_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
    int pch_uffd_unregister(int fd, uint64_t start, uint64_t len);
    int pch_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode);
    int pch_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode);
    int pch_uffd_wake(int fd, uint64_t start, uint64_t len);
    int pch_uffd_read_faults(int fd, uint64_t *addr, uint64_t *flags, uint32_t *ptid, int max,
                             uint32_t *other_events);

    int pch_memfd_create(const char *name, unsigned int flags);
    int pch_eventfd(unsigned int initval, int flags);
    int pch_mmap(uint64_t len, int prot, int flags, int fd, uint64_t off, uint64_t *addr_out);
    int pch_munmap(uint64_t addr, uint64_t len);
    int pch_punch_hole(int fd, uint64_t off, uint64_t len);

    int pch_page_is_zero(uint64_t seed, uint64_t page, uint32_t zero_permille);
    void pch_fill_pages(uint8_t *dst, uint64_t seed, uint64_t first_page, uint64_t npages,
                        uint64_t page_size, uint32_t zero_permille);
    uint64_t pch_check_page(const uint8_t *p, uint64_t seed, uint64_t page, uint64_t page_size,
                            uint32_t zero_permille, const uint8_t *ref);

    uint64_t pch_order_length(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages);
    int64_t pch_make_order(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages, uint64_t seed,
                           uint32_t *out);
    void pch_make_writes(uint8_t *out, uint64_t n, double ratio, uint64_t seed, uint32_t vcpu);
    struct pch_worker_result {
        int64_t vcpu, pid, state;
        uint64_t accesses, faulting, stall_ns, max_ns, all_ns, pages_checked, words_checked, mismatches;
        int64_t first_bad_page;
        uint64_t t_start, t_end, t_forked, t_ready;
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
        uint64_t min_fault_ns;
        uint32_t *lat_ns;
        uint32_t *lat_page;
        uint64_t n_faulting;
        uint64_t stall_ns;
        uint64_t max_ns;
        uint64_t all_ns;
        uint64_t pages_checked;
        uint64_t words_checked;
        uint64_t mismatches;
        int64_t first_bad_page;
        uint64_t t_start, t_end;
    };
    int pch_touch_run(struct pch_touch *t);
    uint64_t pch_now_ns(void);
    struct pch_source {
        int fd;
        const uint8_t *image;
        const uint8_t *zero;
        uint8_t *sent;
        uint64_t page_size, ram_size;
        uint64_t requests, pages_urgent, pages_zero, requested_already_sent, bytes_sent;
    };
    int64_t pch_source_answer(struct pch_source *s, const uint8_t *buf, uint64_t len);
    int pch_set_pdeathsig(int sig);
    int pch_set_name(const char *name);
    int pch_set_child_subreaper(void);
    """
)

# csrc/dest.h: the destination's per-fault and per-page work.
ffibuilder.cdef(
    """
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
        uint64_t copy_eexist, dead_ports, eos, frames;
    };
    struct pch_dest;
    struct pch_dest *pch_dest_new(uint64_t page_size, uint64_t npages, uint8_t *received,
                                  struct pch_port *ports, int nports, struct pch_port *carrier,
                                  const uint32_t *tids, const int32_t *tid_vcpu, int ntids,
                                  int hugetlb, uint64_t zero_page, int wake_all, const char *idstr);
    void pch_dest_free(struct pch_dest *d);
    int pch_dest_on_uffd(struct pch_dest *d, int port);
    int64_t pch_dest_on_data(struct pch_dest *d, const uint8_t *buf, uint64_t len, int urgent_channel);
    const uint8_t *pch_dest_requests(struct pch_dest *d, uint64_t *len);
    const uint8_t *pch_dest_events(struct pch_dest *d, uint64_t *len);
    void pch_dest_clear_requests(struct pch_dest *d);
    void pch_dest_clear_events(struct pch_dest *d);
    const struct pch_dest_stats *pch_dest_stats(struct pch_dest *d);
    const char *pch_dest_error(struct pch_dest *d);
    #define PCH_RUN_AGAIN ...
    #define PCH_RUN_QUIT ...
    #define PCH_RUN_EOF ...
    struct pch_dest_loop {
        int epfd, quit_fd, stream_fd, urgent_fd;
        const int32_t *port_of_fd;
        int nfds;
        int64_t idle_ns;
    };
    int pch_dest_run(struct pch_dest *d, struct pch_dest_loop *l, int budget_ms);
    """
)

ffibuilder.set_source(
    "postcopy_core._uffd",
    """
    #include <fcntl.h>
    #include <sys/mman.h>
    #include <sys/eventfd.h>
    #include <linux/userfaultfd.h>
    #include "pch.h"
    #include "dest.h"
    """,
    sources=[str(CSRC / "pch.c"), str(CSRC / "dest.c"), str(CSRC / "workloads.c"),
             str(CSRC / "source.c")],
    libraries=["m"],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
