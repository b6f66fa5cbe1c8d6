"""CPU time of each side of a run over the workload: what one fault costs the vCPUs, the handler
and the source (the report's ``cpu`` section, bench/compare_ref.py's CPU columns).

The vCPU workers time their own loop (``cpu_ns`` in their result record).  The handler and the
source are sampled from outside at "go" and when the last worker ends, from ``/proc/PID/task/*/
schedstat`` (nanoseconds on a CPU, every thread), which unlike ``getrusage`` or psutil's ticks
resolves a one-second window.  ``/proc/stat`` gives the host's idle time over the same window and
``/proc/interrupts`` the inter-processor interrupts: a task woken on another CPU (a vCPU by the
handler's UFFDIO_COPY, the source by a request, the handler by an answer) costs one when that CPU
must be kicked out of idle or into the scheduler; in a VM each is an exit on both ends."""

from __future__ import annotations

import os
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_ns(pid: int) -> int | None:
    """Nanoseconds ``pid``'s threads have run so far, or None once it is gone."""
    total, seen = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            seen = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended in between
    return total if seen else None


def host_idle_s() -> float:
    """Seconds all CPUs have been idle since boot (idle + iowait from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / CLK_TCK


IPI_KINDS = {"RES": "reschedule", "CAL": "function-call", "TLB": "tlb-shootdown"}


def host_ipis() -> dict[str, int]:
    """Inter-processor interrupts since boot, all CPUs, by kind (IPI_KINDS); {} where unreadable."""
    out: dict[str, int] = {}
    try:
        lines = Path("/proc/interrupts").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, rest = line.strip().partition(":")
        if name in IPI_KINDS:
            out[IPI_KINDS[name]] = sum(int(x) for x in rest.split() if x.isdigit())
    return out


class CpuWindow:
    """The CPU the named processes (and the host, idle) used between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.before: dict[str, int | None] = {}
        self.used_s: dict[str, float | None] = {}
        self.idle0 = self.t0 = 0.0
        self.idle_s = self.window_s = 0.0
        self.ipis0: dict[str, int] = {}
        self.ipis: dict[str, int] = {}

    def start(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.t0, self.idle0, self.ipis0 = time.monotonic(), host_idle_s(), host_ipis()
        self.before = {role: process_cpu_ns(pid) for role, pid in self.pids.items()}

    def stop(self) -> None:
        for role, pid in self.pids.items():
            now, then = process_cpu_ns(pid), self.before.get(role)
            self.used_s[role] = None if now is None or then is None else (now - then) / 1e9
        self.window_s = time.monotonic() - self.t0
        self.idle_s = host_idle_s() - self.idle0
        now = host_ipis()
        self.ipis = {k: now[k] - v for k, v in self.ipis0.items() if k in now}


def cpu_section(window: CpuWindow | None, vcpus_cpu_ns: int, faults: int, spin_ns: int | None = None) -> dict:
    """The report's ``cpu`` section: seconds per side over the workload and microseconds per fault
    (faults: the pages asked for on demand, as faults/s counts them); ``destination`` is vCPUs +
    handler, the side the C reference also has.  ``spin_ns``: the handler's time looking for the
    next event before sleeping (its policy's spin; the whole run), the most of its CPU that was
    polling rather than work, as ``handler-spin`` per fault."""
    used = dict(window.used_s) if window is not None else {}
    sides = {"vcpus": vcpus_cpu_ns / 1e9, "handler": used.get("handler"), "source": used.get("source"),
             "orchestrator": used.get("orchestrator")}  # the harness's own (events, supervision)
    per = {k: (None if v is None or not faults else round(v / faults * 1e6, 3)) for k, v in sides.items()}
    dest = sides["handler"]
    per["destination"] = None if dest is None or not faults else round((sides["vcpus"] + dest) / faults * 1e6, 3)
    per["handler-spin"] = None if spin_ns is None or not faults else round(spin_ns / 1e3 / faults, 3)
    return {
        "window-s": round(window.window_s, 4) if window is not None else None,
        "host-idle-s": round(window.idle_s, 3) if window is not None else None,
        **{f"{k}-s": (None if v is None else round(v, 4)) for k, v in sides.items()},
        "faults": faults,
        "per-fault-us": per,
        "ipis": dict(window.ipis) if window is not None else {},
        "ipis-per-fault": ({k: round(v / faults, 3) for k, v in window.ipis.items()}
                           if window is not None and faults else {}),
    }
