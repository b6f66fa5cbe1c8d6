/* worker.c - the vCPU worker processes, forked and run in C (declared in pch.h: pch_worker_main).
 *
 * Why C: a worker forked from the Python zygote and running Python dirties hundreds of the
 * zygote's pages (reference counts, allocator pools, frames) and pays a page fault and a copy
 * for each; at 4096 workers on two cores that copying, not the fork, was most of the start-up
 * (≈1.4 MiB per worker, 5.6 GiB in all).  A child that never returns to the interpreter touches
 * only its stack and what it allocates, so start-up grows with the worker count and nothing else.
 * The steps are those of a worker as vcpu_workers/worker.py describes them; every failure writes
 * one line "LABEL: KernelError: OP failed: ENAME (text)" on fd 2 and exits PCH_WORKER_FAILED. */
#define _GNU_SOURCE
#include "pch.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(struct pch_handoff_hello) == 32, "the hello has no padding (pch.h)");

static void label(const struct pch_worker_plan *p, uint32_t w, char *out, size_t n)
{
    if (w < p->nvcpus)
        snprintf(out, n, "vcpu %u", w);
    else
        snprintf(out, n, "non-vCPU process %u", w - p->nvcpus);
}

/* one line on stderr, as postcopy_core/child.py writes it for a Python child */
static int fail(const struct pch_worker_plan *p, uint32_t w, const char *kind, const char *op, int err)
{
    char who[48], line[256];
    label(p, w, who, sizeof who);
    int n;
    if (err)
        n = snprintf(line, sizeof line, "%s: %s: %s failed: %s (%s)\n", who, kind, op, strerrorname_np(err) ?: "?",
                     strerror(err));
    else
        n = snprintf(line, sizeof line, "%s: %s: %s\n", who, kind, op);
    if (n > 0 && write(2, line, (size_t)n) < 0) { /* nothing more to say */ }
    return PCH_WORKER_FAILED;
}

/* keep fds 0-2 and `keep`, close the rest: one close_range per gap, no /proc walk */
static void close_other_fds(const int *keep, int nkeep)
{
    int sorted[8], n = 0;
    for (int i = 0; i < nkeep; i++)
        if (keep[i] > 2)
            sorted[n++] = keep[i];
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
            int t = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = t;
        }
    unsigned int lo = 3;
    for (int i = 0; i < n; i++) {
        if ((unsigned int)sorted[i] > lo)
            syscall(SYS_close_range, lo, (unsigned int)sorted[i] - 1, 0);
        lo = (unsigned int)sorted[i] + 1;
    }
    syscall(SYS_close_range, lo, ~0u, 0);
}

static void *map(uint64_t len, int prot, int flags, int fd)
{
    void *a = mmap(NULL, len, prot, flags, fd, 0);
    return a == MAP_FAILED ? NULL : a;
}

/* connect, send the hello with the uffd attached, wait for the one-byte ack (timeouts: the socket's) */
static int hand_off(const struct pch_worker_plan *p, const struct pch_handoff_hello *h, int uffd, const char **op)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        *op = "socket";
        return -errno;
    }
    struct timeval tv = {.tv_sec = (time_t)(p->handoff_timeout_ms / 1000),
                         .tv_usec = (suseconds_t)(p->handoff_timeout_ms % 1000) * 1000};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, p->handoff, p->handoff_len);
    int rc = 0;
    if (connect(s, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + p->handoff_len))) {
        *op = "connect(hand-off socket)";
        rc = -errno;
        goto out;
    }
    char ctl[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {.iov_base = (void *)h, .iov_len = sizeof *h};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    char ack = 0;
    ssize_t n = sendmsg(s, &m, MSG_NOSIGNAL);
    if (n == (ssize_t)sizeof *h) {
        do
            n = recv(s, &ack, 1, 0);
        while (n < 0 && errno == EINTR);
    }
    if (n < 0 && errno != EPIPE && errno != ECONNRESET) {
        *op = "hand-off (sendmsg/recv)";
        rc = -errno;
    } else if (n != 1 || ack != p->handoff_ack) {
        rc = 1; /* EOF, a reset or a wrong byte: the handler refused us */
    }
out:
    close(s);
    return rc;
}

int pch_worker_main(const struct pch_worker_plan *p, uint32_t w, uint64_t t_forked)
{
    const char *op = "";
    int err = 0;
    uint32_t nworkers = p->nvcpus + p->ndevices;
    uint8_t *area = map(p->area_size, PROT_READ | PROT_WRITE, MAP_SHARED, p->results_fd);
    if (!area)
        return fail(p, w, "KernelError", "mmap(results)", errno);
    struct pch_worker_result *rec = (struct pch_worker_result *)area + w;
    rec->vcpu = w;
    rec->pid = getpid();
    rec->t_forked = t_forked;
    uint64_t size = p->page_size * p->npages;
    uint8_t *ram = map(size, PROT_READ | PROT_WRITE, MAP_SHARED, p->memfd);
    if (!ram)
        return fail(p, w, "KernelError", "mmap(guest RAM)", errno);

    /* the uffd is made here, after fork: it belongs to this address space */
    int uffd = pch_userfaultfd(O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return fail(p, w, "KernelError", "userfaultfd", -uffd);
    uint64_t feats, ioctls;
    if ((err = pch_uffd_api(uffd, p->features, &feats, &ioctls)) < 0)
        return fail(p, w, "KernelError", "UFFDIO_API", -err);
    if ((err = pch_uffd_register(uffd, (uint64_t)(uintptr_t)ram, size, p->register_mode, &ioctls)) < 0)
        return fail(p, w, "KernelError", "UFFDIO_REGISTER", -err);
    if ((ioctls & p->need_ioctls) != p->need_ioctls) {
        char what[96];
        snprintf(what, sizeof what, "UFFDIO_REGISTER (the range does not support %s)", p->need_what ?: "?");
        return fail(p, w, "KernelError", what, EOPNOTSUPP);
    }
    struct pch_handoff_hello h = {.version = p->handoff_version, .vcpu = (int32_t)w, .pid = (int32_t)getpid(),
                      .base = (uint64_t)(uintptr_t)ram, .length = size};
    memcpy(h.magic, p->handoff_magic, 4);
    err = hand_off(p, &h, uffd, &op);
    if (err < 0)
        return fail(p, w, "KernelError", op, -err);
    if (err > 0)
        return fail(p, w, "HandoffError", "the fault handler refused this worker's hand-off", 0);
    if (!p->unmap_events)
        close(uffd); /* the handler now holds the only reference */
    /* else kept: a piece unmapped and mapped back mid-run is registered again on it (never read here) */

    /* a vCPU walks its workload; a non-vCPU process a random walk over one vCPU's slice, with a
     * seed of its own, so it meets that vCPU on some pages and is first on others */
    int kind = p->kind;
    uint32_t owner = w;
    uint64_t seed = p->seed;
    if (w >= p->nvcpus) {
        uint32_t dev = w - p->nvcpus;
        kind = p->device_kind;
        owner = (uint32_t)((uint64_t)dev * p->nvcpus / (p->ndevices ? p->ndevices : 1));
        seed = p->seed ^ (p->device_seed + dev);
    }
    uint64_t cap = pch_order_length(kind, owner, p->nvcpus, p->npages);
    uint32_t *order = malloc((cap ? cap : 1) * sizeof *order);
    if (!order)
        return fail(p, w, "MemoryError", "no memory for the access order", 0);
    int64_t count = pch_make_order(kind, owner, p->nvcpus, p->npages, seed, order);
    if (count < 0)
        return fail(p, w, "MemoryError", "no memory for the hotset permutation", 0);
    uint8_t *writes = NULL; /* only vCPUs store: a non-vCPU process reads what they write */
    uint64_t *ledger = NULL;
    uint32_t *mine = NULL;
    if (p->write_ratio > 0 && w < p->nvcpus && p->write_mode != PCH_WRITES_NONE) {
        if (!(writes = malloc(count ? (size_t)count : 1)))
            return fail(p, w, "MemoryError", "no memory for the store pattern", 0);
        pch_make_writes(writes, (uint64_t)count, p->write_ratio, p->seed, w);
        if (!(mine = calloc(p->npages ? p->npages : 1, sizeof *mine))) /* zero pages until touched */
            return fail(p, w, "MemoryError", "no memory for the store record", 0);
    }
    if (p->ledger_fd >= 0 && p->write_mode != PCH_WRITES_NONE) { /* a non-vCPU process reads it too */
        if (!(ledger = map(p->npages * 8, PROT_READ | PROT_WRITE, MAP_SHARED, p->ledger_fd)))
            return fail(p, w, "KernelError", "mmap(store ledger)", errno);
    }
    const uint8_t *ref = NULL;
    if (p->image) {
        int fd = open(p->image, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return fail(p, w, "KernelError", "open(image)", errno);
        ref = map(size, PROT_READ, MAP_PRIVATE, fd);
        err = errno;
        close(fd);
        if (!ref)
            return fail(p, w, "KernelError", "mmap(image)", err);
    }
    uint8_t *verified = calloc(p->npages ? p->npages : 1, 1);
    if (!verified)
        return fail(p, w, "MemoryError", "no memory for the verified map", 0);
    uint64_t *board = NULL; /* only vCPUs publish what they touch: a device's faults are woken when read */
    if (w < p->nvcpus) {
        uint64_t *slots = map(p->board_size, PROT_READ | PROT_WRITE, MAP_SHARED, p->board_fd);
        if (!slots)
            return fail(p, w, "KernelError", "mmap(access board)", errno);
        board = slots + w;
    }
    const uint32_t *gens = NULL; /* mapped before "go"; read after it, once the source published them */
    if (p->gens_fd >= 0) {
        uint64_t len = (p->npages * 4 + 4095) / 4096 * 4096;
        /* run --remove-rate writes PCH_GEN_REMOVED for each page it gives back (one writer per page) */
        gens = map(len ? len : 4096, PROT_READ | (p->remove_rate > 0 ? PROT_WRITE : 0), MAP_SHARED, p->gens_fd);
        if (!gens)
            return fail(p, w, "KernelError", "mmap(generation map)", errno);
    }
    const uint8_t *received = NULL;
    if (p->received_fd >= 0) {
        received = map((p->npages + 4095) / 4096 * 4096, PROT_READ, MAP_SHARED, p->received_fd);
        if (!received)
            return fail(p, w, "KernelError", "mmap(received map)", errno);
    }
    rec->accesses = (uint64_t)count;
    rec->t_ready = pch_now_ns();
    __atomic_store_n(&rec->state, PCH_STATE_READY, __ATOMIC_RELEASE);

    char c; /* EOF on the start pipe: every worker starts at once */
    ssize_t n;
    while ((n = read(p->start_fd, &c, 1)) != 0)
        if (n < 0 && errno != EINTR)
            return fail(p, w, "KernelError", "read(start pipe)", errno);

    struct pch_touch t = {0};
    t.base = (uint64_t)(uintptr_t)ram;
    t.page_size = p->page_size;
    t.npages = p->npages;
    t.order = order;
    t.count = (uint64_t)count;
    t.is_write = writes;
    t.seed = p->seed;
    t.zero_permille = p->zero_permille;
    t.ref = ref;
    t.verified = verified;
    t.board = board;
    t.gens = gens;
    if (p->remove_rate > 0 && gens && w < p->nvcpus) {
        t.remove_gens = (uint32_t *)gens;
        t.remove_threshold = p->remove_rate >= 1 ? UINT64_MAX : (uint64_t)(p->remove_rate * 18446744073709551615.0);
    }
    t.first_touch = p->first_touch;
    t.received = received;
    t.write_mode = p->write_mode;
    t.vcpu = w;
    t.owner = w < p->nvcpus;
    t.ledger = ledger;
    t.mine = mine;
    t.pending = &rec->pending;
    t.yield_check = 1; /* this process: nice 19 for the after-loop check (see pch.h) */
    if (board) { /* vCPUs check their pages once every vCPU's timed loop is over */
        t.finish_line = (uint32_t *)(board - w + p->nvcpus); /* the slot after the last vCPU's */
        t.finish_count = p->nvcpus;
    }
    t.lat_ns = (uint32_t *)(area + p->lat_off) + p->capacity * w;
    t.lat_page = (uint32_t *)(area + p->pages_off) + p->capacity * w;
    t.lat_start = (uint64_t *)(area + p->starts_off) + p->capacity * w;
    if (p->fork_events && w < p->nvcpus) { /* in the middle of its loop, once */
        t.fork_at = (uint64_t)count / 2 + 1;
        t.fork_timeout_ns = p->fork_timeout_ms * 1000000ull;
    }
    t.uffd = -1;
    if (p->unmap_events && w < p->nvcpus) { /* a third of the way in, once */
        t.unmap_at = (uint64_t)count / 3 + 1;
        t.uffd = uffd;
        t.memfd = p->memfd;
        t.register_mode = p->register_mode;
        t.pieces = rec->pieces;
    }
    int rc = pch_touch_run(&t);
    if (rc == -ETIMEDOUT && t.fork_stuck_page >= 0) {
        char what[200];
        snprintf(what, sizeof what, "the child it forked mid-run waited %llu s on page %lld: the handler does not "
                 "serve the uffd that UFFD_EVENT_FORK gave it", (unsigned long long)(p->fork_timeout_ms / 1000),
                 (long long)t.fork_stuck_page);
        return fail(p, w, "HandlerError", what, 0);
    }
    if (rc < 0)
        return fail(p, w, "KernelError", "touch loop", -rc);
    rec->stall_ns = t.stall_ns;
    rec->max_ns = t.max_ns;
    rec->all_ns = t.all_ns;
    rec->pages_checked = t.pages_checked;
    rec->words_checked = t.words_checked;
    rec->mismatches = t.mismatches;
    rec->first_bad_page = t.first_bad_page;
    rec->t_start = t.t_start;
    rec->t_end = t.t_end;
    rec->cpu_ns = t.cpu_ns;
    rec->faulting = t.n_faulting;
    rec->stores = t.stores;
    rec->writes_checked = t.writes_checked;
    rec->lost_writes = t.lost_writes;
    memcpy(rec->by_kind, t.by_kind, sizeof rec->by_kind);
    rec->bad = t.bad;
    rec->removes = t.removes;
    rec->forks = t.forks;
    rec->unmaps = t.unmaps;
    rec->piece_faults = t.piece_faults;
    (void)nworkers;
    __atomic_store_n(&rec->state, t.mismatches ? PCH_STATE_FAILED : PCH_STATE_DONE, __ATOMIC_RELEASE);
    return t.mismatches ? PCH_WORKER_BAD_CONTENT : 0;
}

/* What every worker does right after fork, before its body: die with the zygote (and not
 * outlive it if it is already gone), leave Ctrl-C to the orchestrator, take its name, keep only
 * its fds, run on its CPUs. */
static int child_setup(const struct pch_worker_plan *p, uint32_t w, pid_t parent)
{
    char name[16];
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_DFL);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0))
        return fail(p, w, "KernelError", "prctl(PR_SET_PDEATHSIG)", errno);
    if (getppid() != parent)
        _exit(PCH_WORKER_FAILED); /* the zygote died between fork and prctl: nobody to report to */
    if (w < p->nvcpus)
        snprintf(name, sizeof name, "pch-vcpu-%u", w % 100000u); /* comm holds 15 characters */
    else
        snprintf(name, sizeof name, "pch-dev-%u", w - p->nvcpus);
    prctl(PR_SET_NAME, (unsigned long)(uintptr_t)name, 0, 0, 0);
    int keep[7] = {p->memfd, p->start_fd, p->results_fd, p->board_fd, p->gens_fd, p->received_fd, p->ledger_fd};
    close_other_fds(keep, 7); /* an fd of -1 (no precopy, no received map) keeps nothing */
    if (p->ncpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int i = 0; i < p->ncpus && i < PCH_WORKER_MAX_CPUS; i++)
            CPU_SET(p->cpus[i], &set);
        if (sched_setaffinity(0, sizeof set, &set))
            return fail(p, w, "KernelError", "sched_setaffinity", errno);
    }
    return 0;
}

int pch_spawn_workers(const struct pch_worker_plan *p, uint32_t first, uint32_t count, int32_t *pids, int *err)
{
    pid_t self = getpid();
    *err = 0;
    for (uint32_t i = 0; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            *err = errno;
            return (int)i;
        }
        if (pid == 0) {
            uint64_t t_forked = pch_now_ns();
            int rc = child_setup(p, first + i, self);
            _exit(rc ? rc : pch_worker_main(p, first + i, t_forked));
        }
        pids[i] = pid;
    }
    return (int)count;
}
