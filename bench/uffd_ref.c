/*
 * uffd_ref.c - the project's C yardstick for demand paging with one userfaultfd per vCPU.
 *
 * What the harness does with Python around it, with nothing else in the way:
 *   -m mp   N worker processes ("vCPUs") map one memfd (shmem, or hugetlbfs with -H); each opens
 *           its own userfaultfd, registers MISSING on its mapping and hands the uffd to ONE handler
 *           process over a Unix socket (SCM_RIGHTS).  The handler polls every uffd; a fault on a
 *           page not yet placed is answered with UFFDIO_COPY through the faulting worker's uffd
 *           (which wakes that worker), a fault on a page already placed (another worker got it
 *           first) with UFFDIO_WAKE on that uffd.  Pages come from the handler's own memory: no
 *           source process, no socket, so this is an upper bound for the harness.
 *   -m raw  one process: UFFDIO_COPY every page into a registered mapping, nobody faulting; the
 *           rate of the copy itself.
 *
 * Every round starts with the memfd's pages punched out (so they are missing again); round 1 is
 * cold (page cache, page tables), rounds 2..R are reported together as WARM.  Workers time every
 * first touch of a page and check its content after the clock stopped.
 *
 * Output, one line per round and for ALL and WARM, then a totals line; harness/reference.py and
 * bench/compare_ref.py read the WARM line's key=value fields and the totals' verify_err:
 *   mp WARM N=8 pat=seq psz=4096 npages=... rounds=2..3 policy=dedup wall_s=... installs=...
 *      msgs=... faults_per_s=... GiB_per_s=... touches=... all_mean_us=... all_p50_us=...
 *      all_p99_us=... max_us=... flt_mean_us=... flt_p50_us=... flt_p99_us=...
 *      handler_cpu_us=... vcpus_cpu_us=... resched_ipis=... call_ipis=...   (CPU per page installed:
 *      the handler's, the workers'; the host's rescheduling and function-call IPIs in those rounds)
 *   # totals: installs=... msgs=... eexist=... wakes=... eagain=... handler_cpu_s=... verify_err=...
 *      verified_pages=...
 *   raw op=COPY psz=... npages=... batch_pages=... rounds=... cold_s=... warm_mean_s=... best_s=...
 *      pages_per_s_cold=... pages_per_s_warm=... pages_per_s_best=... ns_per_page_warm=...
 *      GiB_per_s_warm=... eagain=... verify_err=...
 *
 * Build: cc -O2 -Wall -pthread -o uffd_ref uffd_ref.c   (loadtest --reference does it for you)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* limits the Python side reads from this file (bench/compare_ref.py, harness/reference.py) */
#define MAXN 1024
#define MAXR 64

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

enum { MODE_MP, MODE_RAW };
enum { PAT_SEQ, PAT_RAND, PAT_SAME };
static const char *const PAT_NAME[] = { "seq", "rand", "same" };

static struct {
	int mode, n, rounds, pat, huge, pin, batch;
	size_t mib, psz, size, npages, per; /* per: pages one worker touches in a round */
} opt = { MODE_MP, 1, 3, PAT_SEQ, 0, 0, 1, 1024, 0, 0, 0, 0 };

/* Everything the processes share: one anonymous MAP_SHARED mapping made before fork. */
struct shared {
	pthread_barrier_t go, done; /* main + N workers meet at each round's start and end */
	volatile int round;         /* the round in progress: the handler counts into it */
	uint64_t t0[MAXR], t1[MAXR];
	uint64_t installs[MAXR], msgs[MAXR];
	uint64_t eexist, wakes, eagain;
	uint64_t verify_err, verified;
	double handler_cpu_s;
	uint64_t hcpu[MAXR], wcpu[MAXR]; /* ns of CPU per round: the handler's, all workers' together */
	uint64_t res[MAXR], cal[MAXR];   /* rescheduling and function-call IPIs per round, the whole host */
};

static struct shared *sh;
static uint32_t *lat;       /* [round][worker][touch] ns, shared */
static uint8_t *placed;     /* [page]: placed this round (written by the handler, reset by main) */
static unsigned char *image; /* what every page should hold, made before fork */

static void fail(const char *fmt, ...)
{
	int e = errno;
	va_list ap;
	fprintf(stderr, "uffd_ref: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, e ? ": %s\n" : "\n", strerror(e));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* CPU time of this process so far, user and system */
static uint64_t cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Rescheduling and function-call IPIs since boot, all CPUs (the RES: and CAL: lines of
 * /proc/interrupts, read in one pass; 0 if unreadable): a wake-up that had to kick another CPU is
 * one of these */
static void read_ipis(uint64_t *res, uint64_t *cal)
{
	char *line = NULL;
	size_t cap = 0;
	*res = *cal = 0;
	FILE *f = fopen("/proc/interrupts", "r");
	if (!f)
		return;
	while (getline(&line, &cap, f) > 0) { /* a line per source; one column per CPU, however many */
		char *p = line;
		while (*p == ' ')
			p++;
		uint64_t *into = !strncmp(p, "RES:", 4) ? res : !strncmp(p, "CAL:", 4) ? cal : NULL;
		if (!into)
			continue;
		for (p += 4;;) {
			char *end;
			unsigned long long v = strtoull(p, &end, 10);
			if (end == p)
				break;
			*into += v;
			p = end;
		}
	}
	free(line);
	fclose(f);
}

/* CPU time another process has run so far, from /proc (0 if unreadable): the handler's, sampled
 * by main at each round's start and end */
static uint64_t cpu_ns_of(pid_t pid)
{
	char path[64];
	unsigned long long ns = 0;
	snprintf(path, sizeof path, "/proc/%d/schedstat", (int)pid);
	FILE *f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%llu", &ns) != 1)
			ns = 0;
		fclose(f);
	}
	return ns;
}

static void *map_shared_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		fail("mmap %zu bytes", len);
	return p;
}

static void pin_to(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		fail("pin to CPU %d", cpu);
}

/* the value of word 0 and the last word of page p: unique per page, never zero */
static uint64_t stamp(size_t p)
{
	return (uint64_t)(p + 1) * 0x9e3779b97f4a7c15ull;
}

static void make_image(void)
{
	image = mmap(NULL, opt.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (image == MAP_FAILED)
		fail("mmap the image (%zu MiB)", opt.mib);
	for (size_t p = 0; p < opt.npages; p++) {
		uint64_t *w = (uint64_t *)(image + p * opt.psz);
		w[0] = stamp(p);
		w[opt.psz / 8 - 1] = ~stamp(p);
	}
}

static int make_memfd(void)
{
	int fd = memfd_create("uffd_ref", MFD_CLOEXEC | (opt.huge ? MFD_HUGETLB : 0));
	if (fd < 0)
		fail("memfd_create%s", opt.huge ? " (hugetlb)" : "");
	if (ftruncate(fd, (off_t)opt.size))
		fail("ftruncate the memfd to %zu MiB", opt.mib);
	return fd;
}

/* every page missing again: punched out of the page cache, so each mapping faults anew */
static void punch(int memfd)
{
	if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)opt.size))
		fail("punching the memfd's pages out");
}

static int open_uffd(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && errno == EPERM) /* unprivileged: faults from user space are all we take anyway */
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0)
		fail("userfaultfd (root, or vm.unprivileged_userfaultfd=1)");
	struct uffdio_api api = { .api = UFFD_API,
				  .features = opt.huge ? UFFD_FEATURE_MISSING_HUGETLBFS : UFFD_FEATURE_MISSING_SHMEM };
	if (ioctl(fd, UFFDIO_API, &api))
		fail("UFFDIO_API");
	return fd;
}

static void register_missing(int uffd, void *addr)
{
	struct uffdio_register reg = { .range = { (uintptr_t)addr, opt.size }, .mode = UFFDIO_REGISTER_MODE_MISSING };
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		fail("UFFDIO_REGISTER");
	if (!(reg.ioctls & (1ull << _UFFDIO_COPY)))
		fail("UFFDIO_COPY not offered on this mapping");
}

static unsigned char *map_memfd(int memfd)
{
	void *p = mmap(NULL, opt.size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (p == MAP_FAILED)
		fail(opt.huge ? "mmap the hugetlbfs memfd (free huge pages: /proc/sys/vm/nr_hugepages)" : "mmap the memfd");
	return p;
}

/* ------------------------------------------------------------------ mp: the workers */

/* the page a worker touches i-th in a round */
static void touch_order(int w, int round, size_t *order)
{
	size_t first = opt.pat == PAT_SEQ ? (size_t)w * opt.per : 0;
	for (size_t i = 0; i < opt.per; i++)
		order[i] = first + i;
	if (opt.pat == PAT_RAND) { /* each worker its own order, a new one each round */
		uint64_t x = 0x2545f4914f6cdd1dull ^ ((uint64_t)w << 20) ^ (uint64_t)round;
		for (size_t i = opt.per - 1; i > 0; i--) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			size_t j = x % (i + 1), t = order[i];
			order[i] = order[j], order[j] = t;
		}
	}
}

static void send_uffd(int sock, int w, int uffd, void *base)
{
	uint64_t msg[2] = { (uint64_t)w, (uintptr_t)base };
	char ctl[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { msg, sizeof msg };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &uffd, sizeof(int));
	if (sendmsg(sock, &mh, 0) != (ssize_t)sizeof msg)
		fail("worker %d: handing its uffd to the handler", w);
}

static void worker(int w, int memfd, int sock)
{
	if (opt.pin)
		pin_to(1);
	unsigned char *ram = map_memfd(memfd);
	int uffd = open_uffd();
	register_missing(uffd, ram);
	send_uffd(sock, w, uffd, ram);
	/* the handler holds the only reference now: if it dies, faults end (as zero pages, which the
	 * check below counts) instead of hanging */
	close(uffd);
	close(sock);
	size_t *order = malloc(opt.per * sizeof *order);
	if (!order)
		fail("worker %d: out of memory", w);
	uint64_t bad = 0, checked = 0;
	for (int r = 0; r < opt.rounds; r++) {
		touch_order(w, r, order);
		uint32_t *mine = lat + ((size_t)r * opt.n + (size_t)w) * opt.per;
		pthread_barrier_wait(&sh->go);
		uint64_t cpu0 = cpu_ns();
		for (size_t i = 0; i < opt.per; i++) {
			volatile uint64_t *page = (volatile uint64_t *)(ram + order[i] * opt.psz);
			uint64_t t0 = now_ns();
			uint64_t first = page[0]; /* the touch: faults while the page is missing */
			uint64_t dt = now_ns() - t0;
			mine[i] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
			bad += first != stamp(order[i]) || page[opt.psz / 8 - 1] != ~stamp(order[i]);
			checked++;
		}
		__atomic_add_fetch(&sh->wcpu[r], cpu_ns() - cpu0, __ATOMIC_RELAXED);
		pthread_barrier_wait(&sh->done);
	}
	__atomic_add_fetch(&sh->verify_err, bad, __ATOMIC_RELAXED);
	__atomic_add_fetch(&sh->verified, checked, __ATOMIC_RELAXED);
	exit(0);
}

/* ------------------------------------------------------------------ mp: the handler */

struct port {
	int fd;
	uintptr_t base;   /* the worker's mapping, in the worker's address space */
	size_t last_woken; /* the page this worker was last woken for without a copy (+1; 0: none) */
};

static void receive_uffds(int sock, struct port *ports)
{
	for (int got = 0; got < opt.n; got++) {
		uint64_t msg[2];
		char ctl[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { msg, sizeof msg };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
		ssize_t len = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		if (len != (ssize_t)sizeof msg || !c || c->cmsg_type != SCM_RIGHTS || msg[0] >= (uint64_t)opt.n)
			fail("handler: a worker's hand-off went wrong");
		memcpy(&ports[msg[0]].fd, CMSG_DATA(c), sizeof(int));
		ports[msg[0]].base = (uintptr_t)msg[1];
	}
}

static void wake(struct port *p, size_t page)
{
	struct uffdio_range rg = { p->base + page * opt.psz, opt.psz };
	if (ioctl(p->fd, UFFDIO_WAKE, &rg))
		fail("handler: UFFDIO_WAKE");
	sh->wakes++;
}

/* one fault: place the page through the faulting worker's uffd (the copy wakes it), or, placed
 * already by someone else's fault, wake this worker */
static void on_fault(struct port *p, uint64_t addr)
{
	size_t page = (size_t)((addr - p->base) / opt.psz);
	int r = sh->round;
	sh->msgs[r]++;
	if (page >= opt.npages)
		fail("handler: a fault outside guest RAM");
	/* placed already: a wake is all it needs.  The same worker faulting on the same page again
	 * means the page is not there after all (a copy from a round before that finished late):
	 * then copy it anyway, which the kernel refuses (EEXIST) if it is present */
	if (placed[page] && p->last_woken != page + 1) {
		p->last_woken = page + 1;
		wake(p, page);
		return;
	}
	p->last_woken = 0;
	for (;;) {
		struct uffdio_copy cp = { .dst = p->base + page * opt.psz, .src = (uintptr_t)(image + page * opt.psz),
					  .len = opt.psz, .mode = 0 };
		if (ioctl(p->fd, UFFDIO_COPY, &cp) == 0)
			break;
		if (errno == EEXIST) { /* present after all: it still needs waking */
			sh->eexist++;
			wake(p, page);
			break;
		}
		if (errno != EAGAIN)
			fail("handler: UFFDIO_COPY");
		sh->eagain++; /* the mapping changed under us: try again */
	}
	placed[page] = 1;
	sh->installs[r]++;
}

static void handler(int sock, int quit)
{
	if (opt.pin)
		pin_to(0);
	struct port *ports = calloc((size_t)opt.n, sizeof *ports);
	struct pollfd *pfd = calloc((size_t)opt.n + 1, sizeof *pfd);
	if (!ports || !pfd)
		fail("handler: out of memory");
	receive_uffds(sock, ports);
	close(sock);
	for (int i = 0; i < opt.n; i++)
		pfd[i] = (struct pollfd){ ports[i].fd, POLLIN, 0 };
	pfd[opt.n] = (struct pollfd){ quit, POLLIN, 0 }; /* main closes its end: we are done */
	struct uffd_msg msgs[64];
	for (;;) {
		if (poll(pfd, (nfds_t)opt.n + 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("handler: poll");
		}
		if (pfd[opt.n].revents)
			break;
		for (int i = 0; i < opt.n; i++) {
			if (!(pfd[i].revents & POLLIN))
				continue;
			ssize_t len;
			while ((len = read(ports[i].fd, msgs, sizeof msgs)) > 0) {
				for (size_t k = 0; k < (size_t)len / sizeof msgs[0]; k++)
					if (msgs[k].event == UFFD_EVENT_PAGEFAULT)
						on_fault(&ports[i], msgs[k].arg.pagefault.address);
			}
			if (len < 0 && errno != EAGAIN)
				fail("handler: reading worker %d's uffd", i);
		}
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	sh->handler_cpu_s = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
	exit(0);
}

/* ------------------------------------------------------------------ mp: main and the report */

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static double quantile(const uint32_t *sorted, size_t n, double q)
{
	return n ? sorted[(size_t)(q * (double)(n - 1) + 0.5)] / 1e3 : 0.0;
}

static double mean_us(const uint32_t *v, size_t n)
{
	double s = 0;
	for (size_t i = 0; i < n; i++)
		s += v[i];
	return n ? s / (double)n / 1e3 : 0.0;
}

/* one report line over rounds [r0, r1); the fault figures are the slowest touches, one per fault
 * message read (a touch that found its page present took no fault) */
static void report_rounds(const char *tag, int r0, int r1)
{
	size_t per_round = (size_t)opt.n * opt.per, total = per_round * (size_t)(r1 - r0);
	uint32_t *all = malloc(total * sizeof *all);
	if (!all)
		fail("out of memory for the report");
	memcpy(all, lat + (size_t)r0 * per_round, total * sizeof *all);
	qsort(all, total, sizeof *all, cmp_u32);
	uint64_t installs = 0, msgs = 0, hcpu = 0, wcpu = 0, res = 0, cal = 0;
	double wall = 0;
	for (int r = r0; r < r1; r++) {
		installs += sh->installs[r], msgs += sh->msgs[r];
		hcpu += sh->hcpu[r], wcpu += sh->wcpu[r], res += sh->res[r], cal += sh->cal[r];
		wall += (double)(sh->t1[r] - sh->t0[r]) / 1e9;
	}
	size_t nflt = msgs < total ? (size_t)msgs : total;
	const uint32_t *flt = all + (total - nflt);
	printf("mp %s N=%d pat=%s psz=%zu npages=%zu rounds=%d..%d policy=dedup%s wall_s=%.4f installs=%llu "
	       "msgs=%llu faults_per_s=%.0f GiB_per_s=%.3f touches=%zu all_mean_us=%.2f all_p50_us=%.2f "
	       "all_p99_us=%.2f max_us=%.1f flt_mean_us=%.2f flt_p50_us=%.2f flt_p99_us=%.2f "
	       "handler_cpu_us=%.3f vcpus_cpu_us=%.3f resched_ipis=%llu call_ipis=%llu\n",
	       tag, opt.n, PAT_NAME[opt.pat], opt.psz, opt.npages, r0 + 1, r1, opt.pin ? " pinned" : "", wall,
	       (unsigned long long)installs, (unsigned long long)msgs, wall > 0 ? installs / wall : 0.0,
	       wall > 0 ? installs * (double)opt.psz / wall / (1 << 30) : 0.0, total, mean_us(all, total),
	       quantile(all, total, 0.5), quantile(all, total, 0.99), total ? all[total - 1] / 1e3 : 0.0,
	       mean_us(flt, nflt), quantile(flt, nflt, 0.5), quantile(flt, nflt, 0.99),
	       installs ? hcpu / 1e3 / (double)installs : 0.0, installs ? wcpu / 1e3 / (double)installs : 0.0,
	       (unsigned long long)res, (unsigned long long)cal);
	free(all);
}

static pid_t *kids; /* the handler, then the workers forked so far */
static volatile int nkids;

/* a worker or the handler that fails leaves the others waiting at a barrier or for a uffd: end the
 * run at once (the reason is what the dead one printed) instead of hanging */
static void on_child(int sig)
{
	siginfo_t si = { 0 };
	(void)sig;
	if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid &&
	    !(si.si_code == CLD_EXITED && si.si_status == 0)) {
		static const char msg[] = "uffd_ref: a worker or the handler died; stopping the others\n";
		for (int i = 0; i < nkids; i++)
			kill(kids[i], SIGKILL);
		if (write(2, msg, sizeof msg - 1) < 0) {
		}
		_exit(1);
	}
}

static void run_mp(void)
{
	opt.per = opt.pat == PAT_SEQ ? opt.npages / (size_t)opt.n : opt.npages;
	if (opt.pat == PAT_SEQ && (opt.per == 0 || opt.npages % (size_t)opt.n))
		errno = 0, fail("-p seq: the %zu pages must split evenly over %d workers", opt.npages, opt.n);
	lat = map_shared_anon((size_t)opt.rounds * (size_t)opt.n * opt.per * sizeof *lat);
	placed = map_shared_anon(opt.npages);
	pthread_barrierattr_t ba;
	pthread_barrierattr_init(&ba);
	pthread_barrierattr_setpshared(&ba, PTHREAD_PROCESS_SHARED);
	pthread_barrier_init(&sh->go, &ba, (unsigned)opt.n + 1);
	pthread_barrier_init(&sh->done, &ba, (unsigned)opt.n + 1);
	make_image();
	int memfd = make_memfd();
	int hand[2], quit[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, hand) || pipe2(quit, O_CLOEXEC))
		fail("socketpair/pipe");
	kids = calloc((size_t)opt.n + 1, sizeof *kids);
	if (!kids)
		fail("out of memory");
	signal(SIGCHLD, on_child);
	pid_t h = fork();
	if (h < 0)
		fail("fork the handler");
	if (h == 0) {
		signal(SIGCHLD, SIG_DFL);
		close(hand[1]);
		close(quit[1]);
		handler(hand[0], quit[0]);
	}
	kids[nkids++] = h;
	close(hand[0]);
	close(quit[0]);
	pid_t *pids = kids + 1;
	for (int w = 0; w < opt.n; w++) {
		pids[w] = fork();
		if (pids[w] < 0) {
			int e = errno;
			for (int i = 0; i < nkids; i++)
				kill(kids[i], SIGKILL);
			errno = e;
			fail("fork worker %d", w);
		}
		if (pids[w] == 0) {
			signal(SIGCHLD, SIG_DFL);
			close(quit[1]);
			worker(w, memfd, hand[1]);
		}
		nkids++;
	}
	close(hand[1]);
	for (int r = 0; r < opt.rounds; r++) {
		punch(memfd);
		memset(placed, 0, opt.npages);
		sh->round = r;
		uint64_t h0 = cpu_ns_of(h), res0, cal0, res1, cal1;
		read_ipis(&res0, &cal0);
		sh->t0[r] = now_ns();
		pthread_barrier_wait(&sh->go);
		pthread_barrier_wait(&sh->done);
		sh->t1[r] = now_ns();
		sh->hcpu[r] = cpu_ns_of(h) - h0;
		read_ipis(&res1, &cal1);
		sh->res[r] = res1 - res0;
		sh->cal[r] = cal1 - cal0;
	}
	signal(SIGCHLD, SIG_DFL); /* every round is done: from here on, exits are counted below */
	int failed = 0, st;
	for (int w = 0; w < opt.n; w++)
		if (waitpid(pids[w], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			failed = 1;
	close(quit[1]); /* the handler's poll sees the pipe close */
	if (waitpid(h, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
		failed = 1;
	if (failed) {
		errno = 0;
		fail("a worker or the handler failed");
	}
	for (int r = 0; r < opt.rounds; r++) {
		char tag[16];
		snprintf(tag, sizeof tag, "round%d", r + 1);
		report_rounds(tag, r, r + 1);
	}
	report_rounds("ALL", 0, opt.rounds);
	if (opt.rounds > 1)
		report_rounds("WARM", 1, opt.rounds);
	uint64_t installs = 0, msgs = 0;
	for (int r = 0; r < opt.rounds; r++)
		installs += sh->installs[r], msgs += sh->msgs[r];
	printf("# totals: installs=%llu msgs=%llu eexist=%llu wakes=%llu eagain=%llu handler_cpu_s=%.3f "
	       "verify_err=%llu verified_pages=%llu\n", (unsigned long long)installs, (unsigned long long)msgs,
	       (unsigned long long)sh->eexist, (unsigned long long)sh->wakes, (unsigned long long)sh->eagain,
	       sh->handler_cpu_s, (unsigned long long)sh->verify_err, (unsigned long long)sh->verified);
}

/* ------------------------------------------------------------------ raw: the copy alone */

static void run_raw(void)
{
	make_image();
	int memfd = make_memfd();
	unsigned char *ram = map_memfd(memfd);
	int uffd = open_uffd();
	register_missing(uffd, ram);
	size_t step = (size_t)opt.batch * opt.psz;
	double cold = 0, warm = 0, best = 0;
	for (int r = 0; r < opt.rounds; r++) {
		punch(memfd);
		uint64_t t0 = now_ns();
		for (size_t off = 0; off < opt.size; off += step) {
			size_t len = opt.size - off < step ? opt.size - off : step;
			struct uffdio_copy cp = { .dst = (uintptr_t)(ram + off), .src = (uintptr_t)(image + off),
						  .len = len, .mode = 0 };
			while (ioctl(uffd, UFFDIO_COPY, &cp)) {
				if (errno != EAGAIN)
					fail("UFFDIO_COPY");
				sh->eagain++;
				if (cp.copy > 0) { /* part went in: go on from there */
					cp.dst += (uint64_t)cp.copy, cp.src += (uint64_t)cp.copy, cp.len -= (uint64_t)cp.copy;
				}
				cp.copy = 0;
			}
		}
		double s = (double)(now_ns() - t0) / 1e9;
		if (r == 0)
			cold = s;
		else
			warm += s;
		if (r == 0 || s < best)
			best = s;
	}
	uint64_t bad = 0;
	for (size_t p = 0; p < opt.npages; p++) {
		const uint64_t *w = (const uint64_t *)(ram + p * opt.psz);
		bad += w[0] != stamp(p) || w[opt.psz / 8 - 1] != ~stamp(p);
	}
	double mean = opt.rounds > 1 ? warm / (opt.rounds - 1) : cold;
	printf("raw op=COPY psz=%zu npages=%zu batch_pages=%d rounds=%d cold_s=%.4f warm_mean_s=%.4f best_s=%.4f "
	       "pages_per_s_cold=%.0f pages_per_s_warm=%.0f pages_per_s_best=%.0f ns_per_page_warm=%.0f "
	       "GiB_per_s_warm=%.3f eagain=%llu verify_err=%llu\n", opt.psz, opt.npages, opt.batch, opt.rounds,
	       cold, mean, best, opt.npages / cold, opt.npages / mean, opt.npages / best, mean * 1e9 / opt.npages,
	       opt.size / mean / (1 << 30), (unsigned long long)sh->eagain, (unsigned long long)bad);
}

/* ------------------------------------------------------------------ the command line */

static void usage(void)
{
	fprintf(stderr, "usage: uffd_ref -m mp|raw [-n workers (1..%d)] [-s MiB] [-r rounds (1..%d)] [-p seq|rand|same]\n"
			"                [-H] (hugetlbfs, 2 MiB pages) [-A] (handler on CPU 0, workers on CPU 1)\n"
			"                [-b pages] (raw: pages per UFFDIO_COPY)\n", MAXN, MAXR);
	exit(2);
}

int main(int argc, char **argv)
{
	int c;
	while ((c = getopt(argc, argv, "m:n:s:r:p:HAb:")) != -1) {
		switch (c) {
		case 'm':
			if (!strcmp(optarg, "mp"))
				opt.mode = MODE_MP;
			else if (!strcmp(optarg, "raw"))
				opt.mode = MODE_RAW;
			else
				usage();
			break;
		case 'n': opt.n = atoi(optarg); break;
		case 's': opt.mib = strtoull(optarg, NULL, 10); break;
		case 'r': opt.rounds = atoi(optarg); break;
		case 'p':
			if (!strcmp(optarg, "seq"))
				opt.pat = PAT_SEQ;
			else if (!strcmp(optarg, "rand"))
				opt.pat = PAT_RAND;
			else if (!strcmp(optarg, "same"))
				opt.pat = PAT_SAME;
			else
				usage();
			break;
		case 'H': opt.huge = 1; break;
		case 'A': opt.pin = 1; break;
		case 'b': opt.batch = atoi(optarg); break;
		default: usage();
		}
	}
	if (optind != argc || opt.n < 1 || opt.n > MAXN || opt.rounds < 1 || opt.rounds > MAXR || opt.batch < 1 ||
	    opt.mib < 1)
		usage();
	opt.psz = opt.huge ? 2u << 20 : (size_t)sysconf(_SC_PAGESIZE);
	opt.size = opt.mib << 20;
	opt.npages = opt.size / opt.psz;
	if (opt.npages == 0)
		usage();
	sh = map_shared_anon(sizeof *sh);
	if (opt.mode == MODE_MP)
		run_mp();
	else
		run_raw();
	return 0;
}
