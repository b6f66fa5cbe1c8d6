"""Stall detection: a vCPU, the source or the handler that stops moving fails the run, named.

Without it a stopped process (SIGSTOP, a debugger, a lost wake-up) leaves the run waiting until
``--timeout`` with no word.  Progress is read from what the run already shares, never from the
fault path:

- a vCPU moves when its access-board slot (the page it is touching, postcopy_core/board.py) changes
  or it burns CPU time; one that sits on a page that is already *received* (so it waits for nothing
  the migration owes it) without moving for ``--stall-timeout`` is stalled (stopped, or a lost
  wake-up); one that waits for a page not yet in is the run's concern:
- the run moves when pages are placed (the received map), the handler ships events, the source
  writes bytes (its ``/proc/PID/io`` write count), a board slot changes or a worker ends.  When none
  of these moves for ``--stall-timeout``, the stopped process is named (a service first, then a
  vCPU), else the source: the vCPUs wait for pages it does not send.

A still source (stopped, or hung with its sockets open) raises :class:`SourceStalled`: the run
treats it like a lost one (kills it; the destination pauses and a new source resumes it).  A still
handler or vCPU cannot be replaced and fails the run.

A slow ``--link`` still moves (pages arrive, the source writes), so it is never failed; the
timeout is also raised to at least three times what one page takes on the modelled link.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import psutil

from harness.supervise import RunFailed

CHECK_EVERY_S = 0.25


class SourceStalled(RunFailed):
    """The source made no progress for the stall timeout; ``pid`` is the source's (None if unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def effective_timeout(stall_timeout: float | str, page_wire_s: float) -> float:
    """``--stall-timeout``, raised to three page times of a very slow modelled link (``off``: never)."""
    if stall_timeout == "off":
        return float("inf")
    return max(stall_timeout, 3 * page_wire_s)


def process_state(pid: int) -> str:
    """psutil's word for the process's state (``stopped``, ``sleeping``, ``running``...)."""
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None once it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _written(pid: int) -> int | None:
    try:
        return psutil.Process(pid).io_counters().write_chars
    except (psutil.Error, AttributeError, NotImplementedError):
        return None


class StallWatch:
    """Fed by the orchestrator's supervision loop; :meth:`check` raises RunFailed on a stall.

    ``board`` and ``received`` return temporary numpy views (the run's mappings must be closable at
    teardown, so no view is kept); ``events`` returns a count that grows with the handler's events;
    ``services`` maps a role's words ("the source") to its pid; ``worker_pids`` holds every worker's
    pid (the vCPUs, then the non-vCPU processes); ``ended`` returns the indexes of the workers that
    are done or lost.
    """

    def __init__(self, timeout: float, worker_pids: list[int], board: Callable[[], np.ndarray],
                 received: Callable[[], np.ndarray], events: Callable[[], int], services: dict[str, int],
                 ended: Callable[[], set[int]], worker_name: Callable[[int], str]) -> None:
        self.timeout = timeout
        self.worker_pids = worker_pids
        self._board, self._received, self._events, self._ended = board, received, events, ended
        self.services, self.worker_name = services, worker_name
        now = time.monotonic()
        self._next = now
        self._slots = board().copy()
        self._moved = np.full(len(self._slots), now)  # when each vCPU last moved
        self._cpu: dict[int, float | None] = {}
        self._global: tuple | None = None
        self._global_at = now

    def reset(self) -> None:
        """Forget the past (after a phase in which waiting is expected)."""
        now = time.monotonic()
        self._moved[:] = now
        self._global, self._global_at = None, now

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHECK_EVERY_S
        ended = self._ended()
        slots = self._board().copy()
        changed = slots != self._slots
        self._moved[changed] = now
        self._slots = slots
        received = self._received()
        placed = int(np.count_nonzero(received))
        # a vCPU still for a whole timeout on a page that is in (the cheap test, for thousands of
        # vCPUs; one that waits for a page not yet in is the run's concern, below)
        on = np.minimum(slots, len(received)).astype(np.int64) - 1
        waits_for_nothing = (slots > 0) & (received[np.maximum(on, 0)] != 0)
        candidates = {int(v) for v in np.flatnonzero((now - self._moved >= self.timeout) & waits_for_nothing)}
        self._cpu = {v: t for v, t in self._cpu.items() if v in candidates}
        for v in sorted(candidates):
            self._check_vcpu(v, ended, now, int(slots[v]) - 1)
        source = self.services.get("the source")
        mark = (placed, self._events(), len(ended), _written(source) if source else None)
        # every page in: what is left (the handler checking all of RAM) moves nothing we see
        if mark != self._global or changed.any() or placed >= len(received):
            self._global, self._global_at = mark, now
        elif now - self._global_at >= self.timeout and not self._cpu:  # a still vCPU is the likelier culprit:
            self._fail_global(ended)                                      # its verdict comes first

    def _check_vcpu(self, v: int, ended: set[int], now: float, page: int) -> None:
        if v in ended:
            return
        pid = self.worker_pids[v]
        cpu, before = cpu_seconds(pid), self._cpu.get(v)
        self._cpu[v] = cpu
        if before is None:
            return  # its CPU time is compared at the next check
        if cpu is None or cpu != before:
            self._moved[v] = now  # it runs: it moves, whatever its board slot says
            self._cpu.pop(v)
            return
        state = process_state(pid)
        asleep = state in (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP)  # on a page that is in
        detail = f", asleep on page {page}, which was placed: a lost wake-up (hung)" if asleep else ""
        raise RunFailed(self._words(f"{self.worker_name(v)} (pid {pid})", state, detail=detail))

    def _fail_global(self, ended: set[int]) -> None:
        for who, pid in self.services.items():  # a stopped service first: everything waits on it
            state = process_state(pid)
            if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                words = self._words(f"{who} (pid {pid})", state)
                raise SourceStalled(words, pid) if who == "the source" else RunFailed(words)
        for v, pid in enumerate(self.worker_pids):
            state = process_state(pid)
            if v not in ended and state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                raise RunFailed(self._words(f"{self.worker_name(v)} (pid {pid})", state))
        # no source among our processes: run --source, a remote one, is the one that sends no page
        who = "the source" if "the source" in self.services or "the fault handler" in self.services else "the run"
        pid = self.services.get(who)
        state = process_state(pid) if pid else "not a process of this run" if who == "the source" else "unknown"
        words = self._words(f"{who} (pid {pid})" if pid else who, state, "sent no page while vCPUs wait")
        raise SourceStalled(words, pid) if who == "the source" else RunFailed(words)

    def _words(self, who: str, state: str, what: str = "made no progress", detail: str = "") -> str:
        return f"{who} {what} for {self.timeout:g} s{detail} (state: {state}) (--stall-timeout)"
