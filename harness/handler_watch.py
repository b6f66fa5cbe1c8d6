"""The stall watch for an external handler: a vCPU that waits too long names the handler, and why.

With the built-in handler the watch reads the handler's own records; an external handler ships
none.  What the harness can see without it:

- each vCPU's access-board slot (the page it is touching) and its CPU time: a vCPU whose slot has
  not moved for ``--stall-timeout`` and that burns no CPU may be asleep in a fault;
- its uffd's ``/proc/self/fdinfo`` (the orchestrator keeps a copy of every uffd and never reads
  it): ``pending`` counts faults nobody has read, ``total`` those read but not yet woken too; a
  still vCPU with ``total`` 0 waits for something else (the finish line, a CPU) and is let be;
- whether the page is in guest RAM (mincore on the orchestrator's own mapping of the memfd).

Together they say what the handler got wrong: it does not read that uffd at all; it read the fault
and the page is in RAM but it never woke this uffd (EEXIST taken for success, or no UFFDIO_WAKE
after a copy through another vCPU's uffd); or it read the fault and never placed the page (a copy
that failed, EAGAIN not retried).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import numpy as np
import psutil

from harness.stall import CHECK_EVERY_S, cpu_seconds, process_state
from harness.supervise import RunFailed

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


UNMAP_PAGES = 8  # the size of a piece run --unmap-events unmaps or moves, in pages (pch.c)


def resident(addr: int, length: int, page_size: int) -> np.ndarray:
    """Which pages of the mapping at ``addr`` are in the page cache (shmem: in guest RAM), as bools."""
    out = np.zeros(-(-length // 4096), np.uint8)
    if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), out.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    per = max(1, page_size // 4096)
    return (out.reshape(-1, per) & 1).all(axis=1)


def uffd_counts(fd: int) -> tuple[int, int] | None:
    """(pending, total) from /proc/self/fdinfo of a uffd this process holds; None if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        return int(info["pending"]), int(info["total"])
    except (OSError, KeyError, ValueError):
        return None


class HandlerWatch:
    """Fed by the supervision loop; :meth:`check` raises RunFailed naming the handler on a stall."""

    def __init__(self, timeout: float, handler: str, handler_pids: list[int], worker_pids: list[int],
                 uffds: dict[int, int], board: Callable[[], np.ndarray], page_present: Callable[[int], bool],
                 ended: Callable[[], set[int]], worker_name: Callable[[int], str],
                 pieces: Callable[[int], tuple[int, int]] | None = None) -> None:
        self.timeout, self.handler, self.handler_pids = timeout, handler, handler_pids
        self.worker_pids, self.uffds = worker_pids, uffds
        self._board, self._present, self._ended, self.worker_name = board, page_present, ended, worker_name
        self._pieces = pieces  # run --unmap-events: vCPU -> first pages + 1 of its unmapped, moved piece (0: none)
        now = time.monotonic()
        self._next = now
        self._slots = board().copy()
        self._moved = np.full(len(self._slots), now)
        self._cpu: dict[int, float | None] = {}
        self._dev_cpu: dict[int, float | None] = {}  # non-vCPU processes (no board slot): CPU per timeout
        self._dev_next = now + timeout

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHECK_EVERY_S
        slots = self._board().copy()
        self._moved[slots != self._slots] = now
        self._slots = slots
        ended = self._ended()
        # slot 0 too: after its timed loop a vCPU re-reads its pages (a page given back faults again)
        for v in np.flatnonzero(now - self._moved >= self.timeout):
            v = int(v)
            if v in ended:
                continue
            cpu, before = cpu_seconds(self.worker_pids[v]), self._cpu.get(v)
            self._cpu[v] = cpu
            if before is None:
                continue  # compared at the next check
            self._cpu.pop(v)
            if cpu is None or cpu != before:
                self._moved[v] = now
                continue
            counts = uffd_counts(self.uffds[v]) if v in self.uffds else None
            if counts is not None and counts[1] == 0 and process_state(self.worker_pids[v]) not in (
                    psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                self._moved[v] = now  # no fault of its own waits (the finish line, a busy host): not the handler's
                continue
            self._fail(v, int(slots[v]) - 1, counts)
        if now >= self._dev_next:
            self._check_devices(len(slots), ended, now)

    def _check_devices(self, first: int, ended: set[int], now: float) -> None:
        """Non-vCPU processes (run --non-vcpu) have no board slot: still for a whole timeout, with a
        fault waiting on their uffd, they are stalled too."""
        self._dev_next = now + self.timeout
        for w in range(first, len(self.worker_pids)):
            if w in ended:
                continue
            cpu, before = cpu_seconds(self.worker_pids[w]), self._dev_cpu.get(w)
            self._dev_cpu[w] = cpu
            if before is None or cpu is None or cpu != before:
                continue
            counts = uffd_counts(self.uffds[w]) if w in self.uffds else None
            if counts is not None and counts[1] > 0:
                self._fail(w, -1, counts)

    def _fail(self, v: int, page: int, counts: tuple[int, int] | None) -> None:
        # looked at only now (a stalled vCPU): with one handler process per uffd there may be thousands
        for hpid in self.handler_pids:  # a stopped handler first: every vCPU waits on it
            state = process_state(hpid)
            if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                raise RunFailed(f"the handler {self.handler} (pid {hpid}) is {state}: no fault is answered "
                                f"(--stall-timeout)")
        pid = self.worker_pids[v]
        state = process_state(pid)
        who = f"{self.worker_name(v)} (pid {pid})"
        if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            raise RunFailed(f"{who} is {state} (--stall-timeout)")
        present = page >= 0 and self._present(page)
        where = (f"page {page}" if page >= 0 else "a page it re-read after its timed loop" if v < len(self._slots)
                 else "a page")
        if counts is not None and counts[0] > 0:
            why = (f"{counts[0]} message(s) on its uffd were never read (its fault, or a REMOVE event it waits on): "
                   "the handler does not serve this uffd")
        elif present:
            why = (f"page {page} is in guest RAM, but this vCPU's uffd was never woken: a copy refused with "
                   "EEXIST was taken for success, or a page placed through another vCPU's uffd got no UFFDIO_WAKE "
                   "on this one")
        elif page >= 0 and self._piece_words(v, page):
            why = f"the handler read the fault but page {page} was never placed{self._piece_words(v, page)}"
        elif page >= 0:
            why = (f"the handler read the fault but page {page} was never placed: a UFFDIO_COPY that failed "
                   "(EAGAIN during a REMOVE event, or an error) was dropped instead of retried")
        else:
            why = "the handler read its fault and never answered it"
        raise RunFailed(f"the handler {self.handler} stopped answering: {who} has waited on {where} for "
                        f"{self.timeout:g} s (state: {state}); {why} (--stall-timeout)")

    def _piece_words(self, v: int, page: int) -> str:
        """With --unmap-events: what this vCPU did to the piece of guest RAM holding ``page``, if anything."""
        if self._pieces is None or page < 0 or v >= len(self._slots):
            return ""
        unmapped, moved = self._pieces(v)
        if unmapped and unmapped - 1 <= page < unmapped - 1 + UNMAP_PAGES:
            return (f"; page {page} is in the piece this vCPU unmapped and mapped back at the same address and "
                    "registered again (UFFD_EVENT_UNMAP): the handler does not serve the range once it is back")
        if moved and moved - 1 <= page < moved - 1 + UNMAP_PAGES:
            return (f"; page {page} is in the piece this vCPU moved with mremap (UFFD_EVENT_REMAP): the handler "
                    "does not serve it at its new address")
        return ""
