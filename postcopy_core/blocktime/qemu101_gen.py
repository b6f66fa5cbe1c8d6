"""Synthetic QEMU 10.1 destination logs with known answers (no QEMU 10.1 binary is at hand).

``generate_qemu101_log`` simulates a postcopy destination: vCPU threads that fault (sometimes a
second time before the first fault is resolved, sometimes on a page another vCPU already waits
for), non-vCPU threads that fault too, and placements of requested and of background pages.  It
keeps QEMU 10.1's blocktime accounting itself, written here from the description of the algorithm
(not from the engine it is meant to test), and writes the lines QEMU 10.1's ``log`` backend would,
with ``-msg timestamp=on`` stamps.  It returns them with the ``query-migrate`` numbers QEMU 10.1
would report for that run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NS_PER_MS = 1_000_000
BUCKETS = 24
HOST_BASE = 0x7F3A_0000_0000  # where the simulated guest RAM is mapped
WALL_MINUS_MONO_NS = 1_790_000_000 * 10**9  # stamps are wall clock; the log's times are monotonic


@dataclass
class _Qemu101:
    """QEMU 10.1's blocktime context, as plain counters."""

    n: int
    pending: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # addr -> [(cpu, t)], newest first
    current: list[int] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    blocked_ns: list[int] = field(default_factory=list)
    non_vcpu_faults: int = 0
    non_vcpu_ns: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    total_ns: int = 0
    last_begin: int = 0
    down: int = 0

    def __post_init__(self) -> None:
        self.current = [0] * self.n
        self.faults = [0] * self.n
        self.blocked_ns = [0] * self.n

    def begin(self, addr: int, cpu: int, t: int) -> bool:
        if cpu >= 0:
            self.faults[cpu] += 1
            if self.current[cpu] == 0:
                self.down += 1
                self.last_begin = t
            self.current[cpu] += 1
        else:
            self.non_vcpu_faults += 1
        exist = addr in self.pending
        self.pending.setdefault(addr, []).insert(0, (cpu, t))
        return exist

    def end(self, addr: int, t: int) -> tuple[int, int, list[tuple[int, int]]]:
        affected = non = 0
        ones = []
        for cpu, ft in self.pending.pop(addr):
            waited = t - ft
            us = waited // 1000
            self.buckets[min(us.bit_length() - 1, BUCKETS - 1) if us else 0] += 1
            if cpu >= 0:
                self.current[cpu] -= 1
                if self.current[cpu] == 0:
                    self.blocked_ns[cpu] += waited
                    affected += 1
                ones.append((cpu, self.current[cpu]))
            else:
                non += 1
                self.non_vcpu_ns += waited
                ones.append((-1, 0))
        if self.down == self.n and affected:
            self.total_ns += t - self.last_begin
        self.down -= affected
        return affected, non, ones

    def query_migrate(self) -> dict:
        faults = sum(self.faults) + self.non_vcpu_faults
        return {
            "postcopy-blocktime": (self.total_ns // NS_PER_MS) & 0xFFFFFFFF,
            "postcopy-vcpu-blocktime": [(b // NS_PER_MS) & 0xFFFFFFFF for b in self.blocked_ns],
            "postcopy-latency": (sum(self.blocked_ns) + self.non_vcpu_ns) // faults if faults else 0,
            "postcopy-vcpu-latency": [b // c if c else 0 for b, c in zip(self.blocked_ns, self.faults, strict=True)],
            "postcopy-non-vcpu-latency": self.non_vcpu_ns // self.non_vcpu_faults if self.non_vcpu_faults else 0,
            "postcopy-latency-dist": list(self.buckets),
        }


def generate_qemu101_log(
    vcpus: int,
    steps: int,
    seed: int = 0,
    *,
    pages: int = 4096,
    non_vcpu_threads: int = 1,
    p_second_fault: float = 0.05,
    p_shared: float = 0.1,
    p_non_vcpu: float = 0.1,
    stamps: bool = True,
) -> tuple[list[str], dict, list[tuple[int, int, int]]]:
    """(log lines, QEMU 10.1's query-migrate for them, (affected_cpus, affected_non_cpus, line index)
    of every end line).  ``steps`` simulated actions; ``seed`` makes it reproducible."""
    g = _LogWriter(vcpus, seed, pages, non_vcpu_threads, stamps)
    for _ in range(steps):
        g.step(p_second_fault, p_shared, p_non_vcpu)
    while g.ctx.pending:  # the migration completes: every waiter is served
        g.t += int(g.rng.expovariate(1 / 150_000)) + 1
        g.place(next(iter(g.ctx.pending)))
    return g.lines, g.ctx.query_migrate(), g.ends


class _LogWriter:
    """The simulated migration behind :func:`generate_qemu101_log`: its clock, its threads and the
    lines written so far (one random generator, drawn from in a fixed order: reproducible)."""

    main_tid, fault_tid, listen_tid = 4000, 4001, 4002

    def __init__(self, vcpus: int, seed: int, pages: int, non_vcpu_threads: int, stamps: bool) -> None:
        self.rng = random.Random(seed)
        self.ctx = _Qemu101(vcpus)
        self.vcpus, self.pages, self.stamps = vcpus, pages, stamps
        self.vcpu_tids = [5000 + i for i in range(vcpus)]
        self.other_tids = [6000 + i for i in range(non_vcpu_threads)]
        self.lines: list[str] = []
        self.ends: list[tuple[int, int, int]] = []
        self.t = 7_000_000_000_000 + self.rng.randrange(10**9)
        self.emit(self.main_tid, "loadvm_postcopy_handle_advise", "")
        for i, tid in enumerate(self.vcpu_tids):
            self.emit(self.main_tid, "postcopy_blocktime_tid_cpu_map", f"cpu: {i}, tid: {tid}")
        self.received: set[int] = set()
        self.zero_pages = {p for p in range(pages) if self.rng.random() < 0.3}

    def emit(self, tid: int, event: str, args: str) -> None:
        if self.stamps:
            w = (self.t + WALL_MINUS_MONO_NS) // 1000
            self.lines.append(f"{tid}@{w // 10**6}.{w % 10**6:06d}:{event} {args}")
        else:
            self.lines.append(f"{event} {args}")

    def fault(self, cpu: int, tid: int, p_shared: float) -> None:
        ctx, rng, t = self.ctx, self.rng, self.t
        if ctx.pending and rng.random() < p_shared:
            addr = rng.choice(list(ctx.pending))
        else:
            free = [p for p in (rng.randrange(self.pages) for _ in range(8)) if p not in self.received]
            if not free:
                return
            addr = HOST_BASE + free[0] * 4096
        self.emit(
            self.fault_tid,
            "postcopy_ram_fault_thread_request",
            f"Request for HVA={addr:#x} rb=pc.ram offset={addr - HOST_BASE:#x} pid={tid}",
        )
        exist = ctx.begin(addr, cpu, t)
        self.emit(self.fault_tid, "postcopy_blocktime_begin",
                  f"addr: {addr:#x}, time: {t}, cpu: {cpu}, exist: {int(exist)}")

    def place(self, addr: int) -> None:
        ctx, t = self.ctx, self.t
        page = (addr - HOST_BASE) // 4096
        self.received.add(page)
        if page in self.zero_pages:
            self.emit(self.listen_tid, "postcopy_place_page_zero", f"host={addr:#x}")
        else:
            self.emit(self.listen_tid, "postcopy_place_page", f"host={addr:#x}")
        if addr not in ctx.pending:
            return  # QEMU logs no end for a page nobody waited for
        affected, non, ones = ctx.end(addr, t)
        for cpu, left in ones:
            self.emit(self.listen_tid, "postcopy_blocktime_end_one", f"cpu: {cpu}, left_faults: {left}")
        self.ends.append((affected, non, len(self.lines)))
        self.emit(
            self.listen_tid,
            "postcopy_blocktime_end",
            f"addr: {addr:#x}, time: {t}, affected_cpus: {affected}, affected_non_cpus: {non}",
        )

    def step(self, p_second_fault: float, p_shared: float, p_non_vcpu: float) -> None:
        """One simulated action: a vCPU or another thread faults, a request is served, or a page
        nobody asked for arrives."""
        ctx, rng, vcpus = self.ctx, self.rng, self.vcpus
        self.t += int(rng.expovariate(1 / 150_000)) + 1
        r = rng.random()
        running = [c for c in range(vcpus) if ctx.current[c] == 0]
        if r < 0.45 and (running or rng.random() < p_second_fault):
            cpu = rng.choice(running) if running and rng.random() >= p_second_fault else rng.randrange(vcpus)
            self.fault(cpu, self.vcpu_tids[cpu], p_shared)
        elif r < 0.45 + p_non_vcpu and self.other_tids:
            waiting = sum(1 for es in ctx.pending.values() for c, _ in es if c < 0)
            if waiting < len(self.other_tids):  # a blocked thread cannot fault again
                self.fault(-1, rng.choice(self.other_tids), p_shared)
        elif ctx.pending and r < 0.9:
            # Requests are mostly served in order; sometimes a later one arrives first.
            queue = list(ctx.pending)
            self.place(queue[0] if rng.random() < 0.7 else rng.choice(queue))
        else:
            page = rng.randrange(self.pages)
            if page not in self.received:
                self.place(HOST_BASE + page * 4096)
