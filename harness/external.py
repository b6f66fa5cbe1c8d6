"""A run whose fault handler is someone else's program (``run --handler``, ``restore``).

Snapshot restore, the Firecracker/CRIU model: there is no migration source; guest RAM is a memory
file (``restore --mem-file FILE``, or one the harness writes from its seeded content) and the
handler under test serves each fault from it.  The harness does everything else as in a
migration run: the vCPU workers (csrc/worker.c, every read and store checked), the hand-off of
their uffds (harness/handler_process.py: the pch protocol or Firecracker's), the stall watch
(harness/handler_watch.py), the final check of all RAM once every process is gone
(vcpu_workers/stores.py), and the teardown of the handler's whole process group.

What it cannot measure is said, never invented: the blocktime engines that need the handler's own
fault and placement events (seed, modern, exact) are reported as not available; ``truth``, from the
vCPUs' own clocks, is there.  Pages placed = pages in guest RAM at the end (mincore).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from harness.handler_process import (
    HandlerError,
    HandlerProcess,
    HandlerSpec,
    UffdEntry,
    sweep_stale_workdirs,
    workdir_prefix,
)
from harness.handler_watch import HandlerWatch, resident
from harness.run import ROLE_NAMES, Run, uss_bytes
from harness.supervise import STARTUP_TIMEOUT, RunFailed, describe_status
from postcopy_core import kernel
from postcopy_core.blocktime import ENGINE_NAMES, TRUTH, TraceMeta, truth_result
from postcopy_core.content import Image
from postcopy_core.handoff import Expected, HandoffError, collect_uffds
from postcopy_core.precopy import GenerationMap
from postcopy_core.probe import limit_checks, preflight, raise_fd_limit
from postcopy_core.ramblock import GuestRam, sweep_stale_segments
from vcpu_workers import results as R
from vcpu_workers.stores import StoreLedger, check_ram
from vcpu_workers.worker import WorkerPlan
from vcpu_workers.workloads import accesses_per_vcpu, write_mode

BUILTIN = "built-in"
NOT_AVAILABLE = "not available: needs the handler's own fault and placement events, which an external handler " \
                "does not report"



def _check_limits(nworkers: int) -> None:
    """Refuse a worker count over the host's limits; raise the fd limit for our copy of every uffd."""
    for c in limit_checks(nworkers):
        if not c.ok:
            raise RunFailed(f"{nworkers} worker processes exceed the {c.name.split(' for ')[0]}: {c.detail}")
    raise_fd_limit(2 * nworkers)  # our copy of every uffd, and (firecracker) a connection per uffd

class ExternalRun(Run):
    """One run against an external handler; :meth:`execute` returns the raw material of the report."""

    def __init__(self, cfg, handler: HandlerSpec, progress=None, remove_rate: float = 0.0,
                 fork_events: bool = False, unmap_events: bool = False) -> None:
        super().__init__(cfg, progress)
        self.handler_spec = handler
        self.remove_rate = remove_rate  # --remove-rate: vCPUs give pages back (MADV_REMOVE) as they run
        self.fork_events = fork_events  # --fork-events: each vCPU forks a reader mid-run (UFFD_EVENT_FORK)
        self.unmap_events = unmap_events  # --unmap-events: vCPUs munmap/map back, mremap pieces (UNMAP, REMAP)
        self.handler: HandlerProcess | None = None
        self.workdir: str | None = None
        self.uffds: dict[int, int] = {}  # worker index -> our copy of its uffd (never read: fdinfo only)
        self.ram_map: kernel.Mapping | None = None
        self.handler_end: str | None = None

    def _handler_pids(self) -> list[int]:
        return [p for p, r in self.children.roles.items() if r == "handler"]

    def _handler_alive(self) -> None:
        """Raise (naming it, with its last stderr line) if a handler instance has exited."""
        self._check_children()

    def _check_children(self, expected_exit: set[int] = frozenset()) -> None:
        self.stderr.drain()
        for pid, role, status in self.children.reap():
            if pid in expected_exit and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                continue
            if role == "zygote" and self.workers_done and self._workers_ended() == self.area.nvcpus:
                continue
            if role == "handler":
                raise RunFailed(f"the handler {self.handler_spec.describe()} (pid {pid}) {describe_status(status)} "
                                f"before the vCPUs finished{self.stderr.reason('handler')}")
            raise RunFailed(f"{ROLE_NAMES.get(role, role)} (pid {pid}) {describe_status(status)}"
                            f"{self.stderr.reason(role)}")

    def _mem_file(self, spec) -> str:
        """The memory file the handler serves: the user's (``--mem-file``), else the seeded image."""
        if spec.image:
            return os.path.abspath(spec.image)
        path = os.path.join(self.workdir, "guest-ram.mem")
        img = Image(spec)
        try:
            with open(path, "wb") as f:
                f.write(img.mapping.buffer())
        finally:
            img.close()
        return path

    def _start_handler(self, mem_file: str, nworkers: int) -> None:
        """Start the handler under test, its pids supervised (and pinned to CPU 0 with --pin)."""
        cfg = self.cfg
        features = ("THREAD_ID", "MISSING_SHMEM", *(("EVENT_REMOVE",) if self.remove_rate > 0 else ()),
                    *(("EVENT_FORK",) if self.fork_events else ()),
                    *(("EVENT_UNMAP", "EVENT_REMAP") if self.unmap_events else ()))
        self.handler = HandlerProcess(self.handler_spec, self.workdir, mem_file, cfg.page_size, cfg.ram, features)
        err_w = self.stderr.pipe("handler")
        try:
            pids = self.handler.start(err_w, nworkers)
        except HandlerError as e:
            raise RunFailed(str(e)) from None
        finally:
            os.close(err_w)
        for pid in pids:
            self.children.add(pid, "handler")
            if cfg.pin:  # --pin: the handler on CPU 0, the workers on CPU 1 (as the built-in handler)
                try:
                    os.sched_setaffinity(pid, self._cpus(0))
                except OSError:
                    pass

    def execute(self) -> dict:
        cfg = self.cfg
        t_begin = time.monotonic()
        started_at = time.time()
        sweep_stale_segments()
        if cfg.backing != "shmem":
            raise RunFailed("--handler runs on --backing shmem only (hugetlbfs is not supported with it yet)")
        preflight(False)
        nworkers = cfg.vcpus + cfg.non_vcpu
        _check_limits(nworkers)
        spec = self._spec()
        sweep_stale_workdirs()
        self.workdir = tempfile.mkdtemp(prefix=workdir_prefix())
        mem_file = self._mem_file(spec)
        self.ram = GuestRam(cfg.ram)
        self.ram_map = kernel.mmap_fd(self.ram.fd, cfg.ram)  # never touched: mincore only
        self.area = R.ResultsArea(nworkers, accesses_per_vcpu(cfg.workload, cfg.vcpus, cfg.npages))
        from postcopy_core.board import AccessBoard

        self.board = AccessBoard(cfg.vcpus)
        if write_mode(cfg.workload, cfg.write_ratio):
            self.ledger = StoreLedger(cfg.npages)
        if self.remove_rate > 0:  # each page a vCPU gives back is marked there: it must read zeros after
            self.gens = GenerationMap(cfg.npages)
        handoff, handoff_addr = self._handoff_listener(nworkers)
        start_r, start_w = os.pipe()
        self.fds += [start_r, start_w]

        # the handler first (a Firecracker handler binds its socket meanwhile), then the workers
        self._start_handler(mem_file, nworkers)

        plan = WorkerPlan(cfg.vcpus, self.ram.fd, False, spec, cfg.workload, cfg.write_ratio, handoff_addr,
                          start_r, self.area.fd, self.area.capacity, self.board.fd, self._cpus(1), cfg.non_vcpu,
                          # -1: no received map (an external handler keeps none), the workers ask mincore
                          self.gens.fd if self.gens is not None else -1, "copy", -1,
                          self.ledger.fd if self.ledger is not None else -1, self.remove_rate, self.fork_events,
                          cfg.stall_timeout, self.unmap_events)
        t_fork = time.monotonic()
        self._spawn_zygote(plan)
        os.close(start_r)
        self.fds.remove(start_r)
        expect = Expected.for_run(nworkers, cfg.ram, cfg.page_size, self.ram.fd, self.zygote.pid)
        try:
            got = collect_uffds(handoff, expect, STARTUP_TIMEOUT)
        except HandoffError as e:
            self._check_children()
            raise RunFailed(f"vCPU hand-off: {e}") from None
        self.socks.remove(handoff)
        handoff.close()
        entries = []
        for hello, fd in got:
            self.uffds[hello.vcpu] = fd
            self.fds.append(fd)
            entries.append(UffdEntry(hello.vcpu if hello.vcpu < cfg.vcpus else -1, hello.pid, hello.base, fd))
        try:
            self.handler.hand_off(entries, self._handler_alive, STARTUP_TIMEOUT)
        except HandlerError as e:
            self._check_children()  # a handler that died says so first
            raise RunFailed(f"the handler {self.handler_spec.describe()}: {e}{self.stderr.reason('handler')}") from None
        self._wait_workers_ready(STARTUP_TIMEOUT)
        startup_s = time.monotonic() - t_fork

        t_go = time.monotonic_ns()
        self.going = True
        os.close(start_w)
        self.fds.remove(start_w)
        self.stall = self._watch()
        deadline = t_begin + cfg.timeout
        while self._workers_ended() < self.area.nvcpus:
            self._worker_exits()
            self._check_children({self.zygote.pid})
            self.stall.check()
            if time.monotonic() > deadline:
                raise RunFailed(f"the run did not finish within --timeout {cfg.timeout:g} s")
            time.sleep(0.02)
        t_workers_done = time.monotonic_ns()
        handler_cpu = sum(_cpu_s(p) for p in self._handler_pids())
        self.handler_end = self.handler.stop(lambda: not [p for p in self._handler_pids()
                                                          if p in self.children.alive()] or self._reap_quiet())
        placed_map = resident(self.ram_map.addr, cfg.ram, cfg.page_size)
        for fd in self.uffds.values():  # every process that could fault is gone
            os.close(fd)
            self.fds.remove(fd)
        self.uffds.clear()
        self._wait_exit_quiet(30.0)
        ram_check = self._check_ram_present(spec, placed_map)
        stalls = self.area.stalls(cfg.page_size, cfg.vcpus)
        tid_map = {int(pid): v for v, pid in enumerate(self.area.summary["pid"][: cfg.vcpus])}
        meta = TraceMeta(cfg.vcpus, cfg.page_size, tid_map, start_ns=t_go, source="harness",
                         extra={"workload": cfg.workload, "handler": self.handler_spec.describe()})
        engines = {TRUTH: truth_result(meta, stalls)}
        self.completed = True
        return dict(
            summary=self.area.summary[: cfg.vcpus].copy(),
            latencies=[self.area.latencies(v).copy() for v in range(cfg.vcpus)],
            non_vcpu=self.area.summary[cfg.vcpus :].copy(), engines=engines,
            startup_s=startup_s, t_go=t_go, t_workers_done=t_workers_done, wall_s=time.monotonic() - t_begin,
            worker_mem=self.worker_mem, started_at=started_at, ram_check=ram_check,
            lost=[self._lost_entry(i) for i in sorted(self.workers_lost)], workers_bad=sorted(self.workers_bad),
            placed=int(placed_map.sum()), handler_cpu_s=handler_cpu, handler_end=self.handler_end,
            handler_said=self.handler.said, handler_pids=self._handler_pids(), mem_file=mem_file,
            remove_rate=self.remove_rate, removes=int(self.area.summary["removes"][: cfg.vcpus].sum()),
            forks=int(self.area.summary["forks"][: cfg.vcpus].sum()),
            unmaps=int(self.area.summary["unmaps"][: cfg.vcpus].sum()),
            piece_faults=int(self.area.summary["piece_faults"][: cfg.vcpus].sum()),
        )

    def _reap_quiet(self) -> bool:
        """Reap what has exited (the handler's end is expected now); True once no handler is left."""
        self.children.reap()
        return not [p for p in self._handler_pids() if p in self.children.alive()]

    def _wait_exit_quiet(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.children.alive():
            self.children.reap()
            self.stderr.drain()
            if time.monotonic() > deadline:
                raise RunFailed("processes of the run did not exit")
            time.sleep(0.005)

    def _check_ram_present(self, spec, placed_map: np.ndarray):
        """The final check over the pages in RAM (a restore fills only the pages the vCPUs touched)."""
        cfg = self.cfg
        mapping = kernel.mmap_fd(self.ram.fd, cfg.ram)
        try:
            pending = [int(p) for p in self.area.summary["pending"] if p]
            return check_ram(mapping.addr, spec, write_mode(cfg.workload, cfg.write_ratio), self.ledger, self.gens,
                             received=memoryview(placed_map.astype(np.uint8)), pending=pending)
        finally:
            mapping.close()

    def _watch(self) -> HandlerWatch:
        cfg = self.cfg
        board, ram_map = self.board, self.ram_map

        def present(page: int) -> bool:
            if not 0 <= page < cfg.npages:
                return False
            return bool(resident(ram_map.addr + page * cfg.page_size, cfg.page_size, cfg.page_size)[0])

        return HandlerWatch(cfg.stall_timeout, self.handler_spec.describe(), self._handler_pids(),
                            [int(p) for p in self.area.summary["pid"]], self.uffds,
                            board=lambda: np.frombuffer(board.mapping.buffer(), np.uint64, count=cfg.vcpus),
                            page_present=present, ended=lambda: self.workers_done | set(self.workers_lost),
                            worker_name=self._who, pieces=self._pieces if self.unmap_events else None)

    def _pieces(self, v: int) -> tuple[int, int]:
        unmapped, moved = self.area.summary["pieces"][v]
        return int(unmapped), int(moved)

    def _measure_workers(self) -> list[int]:
        return [uss_bytes(int(pid)) for pid in self.area.summary["pid"][: self.cfg.vcpus]]

    def teardown(self) -> None:
        if self.handler is not None:
            self.handler.close()
        super().teardown()
        if self.ram_map is not None:
            self.ram_map.close()
            self.ram_map = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _cpu_s(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


def engines_section(engines: dict) -> dict:
    """Every engine name: truth's result, the handler-side ones marked not available."""
    return {name: engines[name] if name in engines else {"available": False, "why": NOT_AVAILABLE}
            for name in (*ENGINE_NAMES, TRUTH)}
