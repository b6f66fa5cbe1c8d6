/* pch.c - see pch.h.  Every wrapper returns -errno on failure; Python turns that into an error. */
#define _GNU_SOURCE
#include "pch.h"
#include "content.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

uint64_t pch_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU time of the calling process, user and system: what one side of the run costs (bench/) */
uint64_t pch_process_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int pch_userfaultfd(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    /* The syscall may be denied to unprivileged users (vm.unprivileged_userfaultfd=0) or by
     * seccomp; the /dev/userfaultfd device (Linux 6.1+) is the sanctioned second way in. */
    int err = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -err;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    err = errno;
    close(dev);
    return fd >= 0 ? fd : -err;
}

int pch_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api))
        return -errno;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

int pch_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register r = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &r))
        return -errno;
    *ioctls_out = r.ioctls;
    return 0;
}

int pch_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { start, len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) ? -errno : 0;
}

/* COPY, ZEROPAGE and CONTINUE may stop part-way with EAGAIN (the mm is changing under them, e.g. a
 * UFFD_EVENT_REMOVE not read yet); the kernel reports how much it did, so carry on from there.  An
 * EAGAIN that made no progress is retried with a backoff (yield, then sleeps of 10 us, then 1 ms)
 * and given up after EAGAIN_TRIES in a row (about 2 s), returning -EAGAIN: never a spin without
 * end.  On any error *done (when given) says how many bytes went in before it. */
#define EAGAIN_TRIES 2000

/* one more EAGAIN without progress: back off, or say to give up (-EAGAIN) */
static int eagain_backoff(unsigned *tries)
{
    if (++*tries > EAGAIN_TRIES)
        return -EAGAIN;
    if (*tries <= 16) {
        sched_yield();
        return 0;
    }
    struct timespec ts = { 0, *tries <= 64 ? 10000 : 1000000 };
    nanosleep(&ts, NULL);
    return 0;
}

int pch_uffd_copy_upto(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, uint64_t *done)
{
    const char *s = src;
    uint64_t total = 0;
    unsigned tries = 0;
    int rc = 0;
    while (len) {
        struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)s, .len = len, .mode = mode };
        if (ioctl(fd, UFFDIO_COPY, &c) == 0) {
            total += len;
            break;
        }
        if (errno != EAGAIN) {
            rc = -errno;
            break;
        }
        if (c.copy > 0) {
            dst += (uint64_t)c.copy;
            s += c.copy;
            len -= (uint64_t)c.copy;
            total += (uint64_t)c.copy;
            tries = 0;
        } else if ((rc = eagain_backoff(&tries))) {
            break;
        }
    }
    if (done)
        *done = total;
    return rc;
}

int pch_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode)
{
    return pch_uffd_copy_upto(fd, dst, src, len, mode, NULL);
}

int pch_uffd_zeropage_upto(int fd, uint64_t dst, uint64_t len, uint64_t mode, uint64_t *done)
{
    uint64_t total = 0;
    unsigned tries = 0;
    int rc = 0;
    while (len) {
        struct uffdio_zeropage z = { .range = { dst, len }, .mode = mode };
        if (ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0) {
            total += len;
            break;
        }
        if (errno != EAGAIN) {
            rc = -errno;
            break;
        }
        if (z.zeropage > 0) {
            dst += (uint64_t)z.zeropage;
            len -= (uint64_t)z.zeropage;
            total += (uint64_t)z.zeropage;
            tries = 0;
        } else if ((rc = eagain_backoff(&tries))) {
            break;
        }
    }
    if (done)
        *done = total;
    return rc;
}

int pch_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode)
{
    return pch_uffd_zeropage_upto(fd, dst, len, mode, NULL);
}

int pch_uffd_continue_upto(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done)
{
    uint64_t total = 0;
    unsigned tries = 0;
    int rc = 0;
    while (len) {
        struct uffdio_continue c = { .range = { start, len }, .mode = mode };
        if (ioctl(fd, UFFDIO_CONTINUE, &c) == 0) {
            total += len;
            break;
        }
        if (errno != EAGAIN) {
            rc = -errno;
            break;
        }
        if (c.mapped > 0) {
            start += (uint64_t)c.mapped;
            len -= (uint64_t)c.mapped;
            total += (uint64_t)c.mapped;
            tries = 0;
        } else if ((rc = eagain_backoff(&tries))) {
            break;
        }
    }
    if (done)
        *done = total;
    return rc;
}

int pch_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { start, len };
    return ioctl(fd, UFFDIO_WAKE, &r) ? -errno : 0;
}

/* One read() of up to `max` messages from a non-blocking uffd.  Returns the number of page
 * faults stored, 0 when none were queued (EAGAIN: poll said ready but another reader won, or a
 * spurious wakeup), or -errno.  MISSING and MINOR faults (--place continue) are both page-fault
 * messages and are stored; other events (fork, remove...) come only where UFFDIO_API asked for
 * them, which the built-in handler never does, so they are only counted. */
int pch_uffd_read_faults(int fd, uint64_t *addr, uint64_t *flags, uint32_t *ptid, int max,
                         uint32_t *other_events)
{
    struct uffd_msg msgs[128];
    if (max > 128)
        max = 128;
    ssize_t r = read(fd, msgs, sizeof(msgs[0]) * (size_t)max);
    if (r < 0)
        return errno == EAGAIN ? 0 : -errno;
    int n = 0;
    for (ssize_t i = 0; i < r / (ssize_t)sizeof(msgs[0]); i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
            (*other_events)++;
            continue;
        }
        addr[n] = msgs[i].arg.pagefault.address;
        flags[n] = msgs[i].arg.pagefault.flags;
        ptid[n] = msgs[i].arg.pagefault.feat.ptid;
        n++;
    }
    return n;
}

int pch_memfd_create(const char *name, unsigned int flags)
{
    int fd = memfd_create(name, flags);
    return fd >= 0 ? fd : -errno;
}

int pch_eventfd(unsigned int initval, int flags)
{
    int fd = eventfd(initval, flags);
    return fd >= 0 ? fd : -errno;
}

int pch_mmap(uint64_t len, int prot, int flags, int fd, uint64_t off, uint64_t *addr_out)
{
    void *p = mmap(NULL, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        return -errno;
    *addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

int pch_munmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) ? -errno : 0;
}

int pch_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) ? -errno : 0;
}

/* ---- content ---- */

int pch_page_is_zero(uint64_t seed, uint64_t page, uint32_t zero_permille)
{
    return zero_permille && (pch_mix64(pch_page_key(seed, page) ^ 0x5a5a5a5aull) % 1000) < zero_permille;
}

void pch_fill_pages(uint8_t *dst, uint64_t seed, uint64_t first_page, uint64_t npages,
                    uint64_t page_size, uint32_t zero_permille)
{
    uint64_t words = page_size / 8;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *w = (uint64_t *)(dst + i * page_size);
        uint64_t page = first_page + i;
        if (pch_page_is_zero(seed, page, zero_permille)) {
            memset(w, 0, page_size);
            continue;
        }
        uint64_t key = pch_page_key(seed, page);
        for (uint64_t k = 0; k < words; k++)
            w[k] = pch_page_word(key, k);
    }
}

void pch_fill_page_gen(uint8_t *dst, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                       uint32_t zero_permille)
{
    if (!gen) {
        pch_fill_pages(dst, seed, page, 1, page_size, zero_permille);
        return;
    }
    uint64_t *w = (uint64_t *)dst, key = pch_gen_key(seed, page, gen);
    for (uint64_t k = 0; k < page_size / 8; k++)
        w[k] = pch_page_word(key, k);
}

uint64_t pch_check_page_gen(const uint8_t *p, uint64_t seed, uint64_t page, uint32_t gen, uint64_t page_size,
                            uint32_t zero_permille, const uint8_t *ref)
{
    if (!gen)
        return pch_check_page(p, seed, page, page_size, zero_permille, ref);
    const uint64_t *w = (const uint64_t *)p;
    uint64_t key = pch_gen_key(seed, page, gen), bad = 0;
    for (uint64_t k = 0; k < page_size / 8; k++)
        bad += w[k] != pch_page_word(key, k);
    return bad;
}

/* Returns the number of 64-bit words of the page that differ from the expected content. */
uint64_t pch_check_page(const uint8_t *p, uint64_t seed, uint64_t page, uint64_t page_size,
                        uint32_t zero_permille, const uint8_t *ref)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t words = page_size / 8, bad = 0;
    if (ref) {
        const uint64_t *e = (const uint64_t *)(ref + page * page_size);
        for (uint64_t k = 0; k < words; k++)
            bad += w[k] != e[k];
    } else if (pch_page_is_zero(seed, page, zero_permille)) {
        for (uint64_t k = 0; k < words; k++)
            bad += w[k] != 0;
    } else {
        uint64_t key = pch_page_key(seed, page);
        for (uint64_t k = 0; k < words; k++)
            bad += w[k] != pch_page_word(key, k);
    }
    return bad;
}

/* ---- the worker's touch loop ---- */

/* An access is "faulting" when its page was not resident just before it, which is exactly when
 * the kernel raises a MISSING userfault: the worker times the stalls the handler must account
 * without guessing from latencies.  Workers read the received map for it (vcpu_workers/worker.py
 * says why); mincore, which on shmem looks at the page cache, is the fallback of a touch loop
 * given none (run --handler, shmem only: an external handler keeps no map). */
static inline int resident(uint64_t addr)
{
    /* one base page is enough (and mincore writes one byte per *base* page, even on hugetlbfs) */
    unsigned char v = 0;
    if (mincore((void *)(uintptr_t)addr, 1, &v))
        return 0;
    return v & 1;
}

uint32_t pch_finish_line_cross(uint32_t *line, uint32_t count)
{
    uint32_t now = __atomic_add_fetch(line, 1, __ATOMIC_SEQ_CST);
    if (now >= count) /* shared memory between processes: not a private futex */
        syscall(SYS_futex, line, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return now;
}

void pch_finish_line_wait(uint32_t *line, uint32_t count)
{
    /* a second at a time: the wake cannot be missed (the kernel compares the value), the bound is
     * only for a count someone forgot, and costs one wake-up per second per waiter */
    struct timespec second = { 1, 0 };
    uint32_t seen;
    while ((seen = __atomic_load_n(line, __ATOMIC_SEQ_CST)) < count)
        syscall(SYS_futex, line, FUTEX_WAIT, seen, &second, NULL, 0);
}

/* Note a wrong page or word: counted by kind, the first one kept for the error line. */
static void found_bad(struct pch_touch *t, const struct pch_finding *f, uint64_t words_bad, int lost)
{
    t->mismatches += words_bad;
    t->lost_writes += (uint64_t)lost;
    t->by_kind[f->kind]++;
    if (t->first_bad_page < 0)
        t->first_bad_page = f->page;
    if (t->bad.page < 0)
        t->bad = *f;
}

/* A store (run --write-ratio) to `page` at q, as verify.h describes: the ledger first, then the page
 * (the ledger is never behind the page); pending brackets the two for a worker killed between. */
static void store(struct pch_touch *t, uint64_t page, volatile uint64_t *q, const struct pch_content *c)
{
    __atomic_store_n(t->pending, page + 1, __ATOMIC_RELAXED);
    if (t->write_mode == PCH_WRITES_OWN) {
        uint64_t v = pch_store_value(t->seed, page, t->vcpu, t->stores);
        __atomic_store_n(&t->ledger[page], v, __ATOMIC_RELEASE);
        q[pch_store_word(t->page_size, t->vcpu)] = v;
        t->mine[page] = (uint32_t)(t->stores + 1);
    } else {
        __atomic_add_fetch(&t->ledger[page], 1, __ATOMIC_SEQ_CST);
        uint64_t now = __atomic_add_fetch(&q[PCH_COUNTER_WORD], 1, __ATOMIC_SEQ_CST);
        t->mine[page]++;
        /* read-your-writes on a counter: at least our own increments, at most all that were made */
        uint64_t n = now - pch_source_word(c, page, PCH_COUNTER_WORD);
        uint64_t all = __atomic_load_n(&t->ledger[page], __ATOMIC_SEQ_CST);
        t->writes_checked++;
        if (n < t->mine[page] || n > all) {
            struct pch_finding f = { (int64_t)page, pch_judge_page(c, page, (const uint8_t *)q, PCH_WRITES_COUNT, 0,
                                                               t->mine[page], all, NULL),
                                     (int32_t)t->vcpu, t->mine[page], PCH_COUNTER_WORD, 0, now, 1 };
            f.expected = now - n + t->mine[page];
            found_bad(t, &f, 1, 1);
        }
    }
    t->stores++;
    __atomic_store_n(t->pending, 0, __ATOMIC_RELEASE);
}

/* Read-your-writes: a page this vCPU stored to must still hold its latest store. */
static void check_own_store(struct pch_touch *t, uint64_t page, volatile uint64_t *q, const struct pch_content *c)
{
    t->writes_checked++;
    if (t->write_mode == PCH_WRITES_OWN) {
        uint64_t k = pch_store_word(t->page_size, t->vcpu);
        uint64_t want = pch_store_value(t->seed, page, t->vcpu, t->mine[page] - 1), got = q[k];
        if (got != want) {
            struct pch_finding f = { (int64_t)page, pch_judge_word(c, page, k, want, got), (int32_t)t->vcpu,
                                     t->mine[page] - 1, k, want, got, 1 };
            found_bad(t, &f, 1, 1);
        }
        return;
    }
    uint64_t got = q[PCH_COUNTER_WORD], src = pch_source_word(c, page, PCH_COUNTER_WORD);
    uint64_t all = __atomic_load_n(&t->ledger[page], __ATOMIC_SEQ_CST); /* after the page: never behind it */
    if (got - src < t->mine[page] || got - src > all) {
        struct pch_finding f = { (int64_t)page, got == src ? PCH_BAD_REVERTED : got == 0 ? PCH_BAD_ZEROED
                                 : got - src < t->mine[page] ? PCH_BAD_STALE : PCH_BAD_FOREIGN,
                                 (int32_t)t->vcpu, t->mine[page], PCH_COUNTER_WORD, src + t->mine[page], got, 1 };
        found_bad(t, &f, 1, 1);
    }
}

/* Where page lives in this worker's address space: run --unmap-events moves one piece elsewhere. */
static uint64_t page_addr(const struct pch_touch *t, uint64_t page)
{
    if (page >= t->moved_lo && page < t->moved_hi)
        return t->moved_base + (page - t->moved_lo) * t->page_size;
    return t->base + page * t->page_size;
}

/* What the after-loop check expects of a page this worker touched: judged as verify.h says. */
static int judge_touched(struct pch_touch *t, uint64_t page, const struct pch_content *c, struct pch_finding *f)
{
    const uint8_t *p = (const uint8_t *)(uintptr_t)page_addr(t, page);
    uint32_t mine = t->mine ? t->mine[page] : 0;
    if (t->write_mode == PCH_WRITES_OWN) {
        if (mine) /* its own page: its latest store, exactly */
            return pch_judge_page(c, page, p, PCH_WRITES_OWN, pch_store_value(t->seed, page, t->vcpu, mine - 1), 0,
                                  0, f);
        /* a vCPU's page it did not store to has no writer; another process reads pages vCPUs write */
        return pch_judge_page(c, page, p, t->owner ? PCH_WRITES_NONE : PCH_WRITES_OWN, 0, 0, 0, f);
    }
    if (t->write_mode == PCH_WRITES_COUNT) /* past the finish line every vCPU's increments are made */
        return pch_judge_page(c, page, p, PCH_WRITES_COUNT, 0, mine,
                              t->owner ? __atomic_load_n(&t->ledger[page], __ATOMIC_SEQ_CST) : UINT64_MAX / 2, f);
    return pch_judge_page(c, page, p, PCH_WRITES_NONE, 0, 0, 0, f);
}

/* run --fork-events: a child forked mid-run reads the next pages of this vCPU's order. Its address
 * space gets a uffd of its own, which reaches the handler as UFFD_EVENT_FORK; a handler that does not
 * serve it leaves the child waiting (named here), one that drops it lets the kernel fill zeros there
 * (named by the checks: the vCPU reads those pages next). */
#define FORK_READS 16
static int fork_reader(struct pch_touch *t, uint64_t from)
{
    volatile int64_t *at = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (at == MAP_FAILED)
        return -errno;
    *at = -1;
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        munmap((void *)at, 4096);
        return -e;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        char name[16];
        snprintf(name, sizeof name, "pch-fork-%u", t->vcpu % 100000u);
        prctl(PR_SET_NAME, (unsigned long)(uintptr_t)name, 0, 0, 0);
        for (uint64_t j = from; j < t->count && j < from + FORK_READS; j++) {
            *at = t->order[j];
            (void)*(volatile uint64_t *)(uintptr_t)page_addr(t, t->order[j]);
        }
        *at = -1;
        _exit(0);
    }
    t->forks++;
    uint64_t deadline = pch_now_ns() + t->fork_timeout_ns;
    int rc = 0;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        if (pch_now_ns() > deadline) {
            t->fork_stuck_page = *at;
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            rc = -ETIMEDOUT;
            break;
        }
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    munmap((void *)at, 4096);
    return rc;
}

/* run --unmap-events: the piece of UNMAP_PAGES pages holding page `at` is unmapped and mapped back
 * (same address, same memfd offset: UFFD_EVENT_UNMAP), then registered again on this worker's uffd;
 * the piece holding page `mv` is moved to a new address with mremap (UFFD_EVENT_REMAP) and read
 * there from now on. Both hold pages not read yet: their faults must still reach the handler, the
 * first at the old address again, the second at the new one. Each call returns only once the
 * handler has read its event (the kernel waits for it). */
#define UNMAP_PAGES 8
static int unmap_pieces(struct pch_touch *t, uint64_t at, uint64_t mv)
{
    uint64_t len = UNMAP_PAGES * t->page_size, lo = at / UNMAP_PAGES * UNMAP_PAGES;
    if (lo + UNMAP_PAGES <= t->npages) {
        void *a = (void *)(uintptr_t)(t->base + lo * t->page_size);
        __atomic_store_n(&t->pieces[0], lo + 1, __ATOMIC_RELEASE);
        if (munmap(a, len))
            return -errno;
        if (mmap(a, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, t->memfd, (off_t)(lo * t->page_size))
            != a)
            return -errno;
        uint64_t ioctls;
        int err = pch_uffd_register(t->uffd, (uint64_t)(uintptr_t)a, len, t->register_mode, &ioctls);
        if (err < 0)
            return err;
        t->unmaps++;
    }
    uint64_t mlo = mv / UNMAP_PAGES * UNMAP_PAGES;
    if (mlo != lo && mlo + UNMAP_PAGES <= t->npages) {
        void *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); /* a free place */
        if (to == MAP_FAILED)
            return -errno;
        void *from = (void *)(uintptr_t)(t->base + mlo * t->page_size);
        __atomic_store_n(&t->pieces[1], mlo + 1, __ATOMIC_RELEASE);
        if (mremap(from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to) != to)
            return -errno;
        t->moved_base = (uint64_t)(uintptr_t)to;
        t->moved_lo = mlo;
        t->moved_hi = mlo + UNMAP_PAGES;
        t->unmaps++;
    }
    return 0;
}

int pch_touch_run(struct pch_touch *t)
{
    uint64_t words = t->page_size / 8;
    struct pch_content c = { t->seed, t->page_size, t->zero_permille, t->ref, t->gens };
    int writes = t->is_write && t->write_mode != PCH_WRITES_NONE && t->ledger && t->mine && t->pending;
    t->first_bad_page = -1;
    t->fork_stuck_page = -1;
    t->bad.page = -1;
    uint64_t cpu0 = pch_process_cpu_ns();
    t->t_start = pch_now_ns();
    for (uint64_t i = 0; i < t->count; i++) {
        uint64_t page = t->order[i];
        if (page >= t->npages)
            return -EINVAL;
        uint64_t addr = page_addr(t, page);
        volatile uint64_t *q = (volatile uint64_t *)(uintptr_t)addr;
        /* registered MINOR too, every page not yet mapped here traps, in the page cache or not;
         * registered MISSING only, a page not placed yet does (the received map says so without a
         * syscall: placed means in the page cache) */
        int missing = t->first_touch ? !t->verified[page]
                      : t->received ? !__atomic_load_n(&t->received[page], __ATOMIC_ACQUIRE)
                                    : !resident(addr);
        uint64_t want = pch_source_word(&c, page, 0);
        uint64_t got;
        int is_store = writes && t->is_write[i];
        /* tell the handler which page we may block on; ordered before the access itself */
        if (t->board)
            __atomic_store_n(t->board, page + 1, __ATOMIC_SEQ_CST);
        uint64_t s = pch_now_ns();
        if (is_store) /* a real write fault, and a value that only this store could have written */
            store(t, page, q, &c);
        got = *q;
        uint64_t e = pch_now_ns();
        uint64_t d = e - s;
        t->all_ns += d;
        if (missing) {
            uint32_t d32 = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
            t->lat_ns[t->n_faulting] = d32;
            t->lat_page[t->n_faulting] = (uint32_t)page;
            if (t->lat_start)
                t->lat_start[t->n_faulting] = s;
            t->n_faulting++;
            if (t->unmap_at && i >= t->unmap_at &&
                ((t->pieces[0] && page + 1 - t->pieces[0] < UNMAP_PAGES) || (page >= t->moved_lo && page < t->moved_hi)))
                t->piece_faults++;
            t->stall_ns += d;
            if (d > t->max_ns)
                t->max_ns = d;
        }
        /* the word just read is checked now; the rest of the page once, after the timed loop */
        t->words_checked++;
        if (got != want) {
            struct pch_finding f = { (int64_t)page, pch_judge_word(&c, page, 0, want, got), -1, 0, 0, want, got, 1 };
            found_bad(t, &f, 1, 0);
        }
        if (writes && !is_store && t->mine[page])
            check_own_store(t, page, q, &c);
        t->verified[page] = 1;
        if (t->remove_gens && pch_mix64(t->seed ^ 0x72656d6f7665ull ^ ((uint64_t)t->vcpu << 40) ^ i) < t->remove_threshold) {
            /* give the page back, as a balloon does: from now on it reads zeros and holds no store of
             * ours (said before the madvise: the page may be faulted in again only after it) */
            if (t->mine) {
                t->mine[page] = 0;
                __atomic_store_n(&t->ledger[page], 0, __ATOMIC_RELEASE);
            }
            __atomic_store_n(&t->remove_gens[page], PCH_GEN_REMOVED, __ATOMIC_RELEASE);
            if (madvise((void *)(uintptr_t)addr, t->page_size, MADV_REMOVE))
                return -errno;
            t->removes++;
        }
        if (t->unmap_at && i + 1 == t->unmap_at && i + 1 < t->count) {
            uint64_t j = i + 2 < t->count ? i + 2 : i + 1;
            while (j + 1 < t->count && t->order[j] / UNMAP_PAGES == t->order[i + 1] / UNMAP_PAGES)
                j++; /* the next page read in another piece */
            int rc = unmap_pieces(t, t->order[i + 1], t->order[j]);
            if (rc)
                return rc;
        }
        if (t->fork_at && i + 1 == t->fork_at) {
            int rc = fork_reader(t, i + 1);
            if (rc)
                return rc;
        }
    }
    t->t_end = pch_now_ns();
    t->cpu_ns = pch_process_cpu_ns() - cpu0;
    if (t->board)
        __atomic_store_n(t->board, 0, __ATOMIC_RELEASE);
    /* The check below is the harness's, not the guest's: it must not take the CPU from vCPUs still
     * in their timed loop (a 2 MiB page takes ~1 ms to check; a C reference checks after its
     * round, outside its clock).  Nice 19, not SCHED_IDLE: on a busy host it still finishes. */
    if (t->yield_check)
        setpriority(PRIO_PROCESS, 0, 19);
    /* and it waits for the last vCPU's loop (its check follows the round, as a reference's does):
     * checking while others still fault took ~9 % of their faults/s at 8 pinned vCPUs; past that
     * line every vCPU's stores are made, so a counter page's count is final */
    if (t->finish_line) {
        pch_finish_line_cross(t->finish_line, t->finish_count);
        pch_finish_line_wait(t->finish_line, t->finish_count);
    }
    /* Every byte of every page this vCPU read, checked once, outside the timed loop: a page torn,
     * misplaced, zero-filled by a lost handler, or a store of ours undone, shows here.
     * Walked in access order, not over all of RAM: with 4096 vCPUs each touching a small slice,
     * a pass over every page per worker was 4096 x npages reads.  verified: 2 once checked. */
    for (uint64_t i = 0; i < t->count; i++) {
        uint64_t page = t->order[i];
        if (t->verified[page] != 1)
            continue;
        t->verified[page] = 2;
        struct pch_finding f = { .page = -1 };
        int kind = judge_touched(t, page, &c, &f);
        t->pages_checked++;
        t->words_checked += words;
        if (kind >= 0)
            found_bad(t, &f, f.words_bad, f.vcpu >= 0 || (t->mine && t->mine[page]));
    }
    return 0;
}
/* ---- process hygiene ---- */

/* Die with the parent: a run's children must never outlive a killed orchestrator. */
int pch_set_pdeathsig(int sig)
{
    return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) ? -errno : 0;
}

/* The name ps/psutil show (comm), e.g. "pch-vcpu-3". */
int pch_set_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)(uintptr_t)name, 0, 0, 0) ? -errno : 0;
}

/* Orphans of our descendants (workers whose zygote died) are reparented to us, so we can reap them. */
int pch_set_child_subreaper(void)
{
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) ? -errno : 0;
}

int pch_setns(int fd, int nstype)
{
    return setns(fd, nstype) ? -errno : 0;
}
