"""Fault injection (``run --inject KIND@SECONDS[:HOLD][,vcpu=N]``): the orchestrator hurts its own run.

The injector lives in the orchestrator's supervision loop and acts on the run's processes from
outside (signals, a socket shutdown), like a real failure would; nothing of it is in the fault path.
``SECONDS`` counts from the start of the workload ("go").

- ``worker-crash``: SIGKILL vCPU N (default 0): a lost vCPU, the run ends ``completed-degraded``.
- ``worker-stall``: SIGSTOP vCPU N, SIGCONT after ``HOLD`` seconds (default 2).
- ``source-stall``: SIGSTOP the source, SIGCONT after ``HOLD`` seconds (default 2).
- ``handler-crash``: SIGKILL the fault handler: the run fails (a lost handler is never survivable
  here: its uffds close and the kernel would fill zero pages).
- ``source-crash`` (SIGKILL the source) and ``link-drop`` (shut both page channels down, on the
  Unix or the TCP transport): postcopy recovery.  The destination goes to postcopy-paused (vCPUs stay
  blocked), the orchestrator starts a new source (after ``HOLD`` seconds if given: the source or the
  link is down that long), the destination sends its received map and asks again for what its
  vCPUs wait for, and the run completes.
- ``recovery-crash``: SIGKILL the next replacement source started after SECONDS the moment it starts,
  before the resume completes (a failure during recovery itself); the one after it resumes.

A stall longer than ``--stall-timeout`` fails the run as a real one would, and so does a pause that
no new source ends within ``--stall-timeout``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.recovery import RecoveryLog

KINDS = ("worker-crash", "worker-stall", "source-crash", "source-stall", "handler-crash", "link-drop",
         "recovery-crash")
STALLS = ("worker-stall", "source-stall")
OUTAGES = ("source-crash", "link-drop")  # survived by postcopy recovery; :HOLD = how long it stays down
DEFAULT_HOLD_S = 2.0
SYNTAX = "KIND@SECONDS[:HOLD][,vcpu=N]"
_RE = re.compile(r"([a-z-]+)@([0-9.]+)(?::([0-9.]+))?(?:,vcpu=(\d+))?")


@dataclass(frozen=True)
class Injection:
    """One ``--inject``: what, when (seconds after go), for how long (stalls), on which vCPU."""

    kind: str
    at_s: float
    hold_s: float | None = None
    vcpu: int | None = None

    def __str__(self) -> str:
        hold = f":{self.hold_s:g}" if self.hold_s is not None else ""
        vcpu = f",vcpu={self.vcpu}" if self.vcpu is not None else ""
        return f"{self.kind}@{self.at_s:g}{hold}{vcpu}"


def parse_injection(text: str, vcpus: int) -> Injection:
    """``worker-stall@1:2,vcpu=3`` -> Injection; ValueError (one line) for anything else."""
    m = _RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"--inject {text!r}: use {SYNTAX}, e.g. worker-stall@1:2 (KIND: {', '.join(KINDS)})")
    kind, at, hold, vcpu = m.groups()
    if kind not in KINDS:
        raise ValueError(f"--inject {text!r}: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    try:
        at_s = float(at)
        hold_s = float(hold) if hold is not None else None
    except ValueError:
        raise ValueError(f"--inject {text!r}: SECONDS and HOLD are numbers of seconds") from None
    if not 0 <= at_s < 1e6 or (hold_s is not None and not 0 < hold_s < 1e6):
        raise ValueError(f"--inject {text!r}: SECONDS must be 0..1e6 and HOLD positive")
    if hold_s is not None and kind not in STALLS + OUTAGES:
        raise ValueError(f"--inject {text!r}: only {', '.join(STALLS + OUTAGES)} take :HOLD")
    if vcpu is not None and not kind.startswith("worker-"):
        raise ValueError(f"--inject {text!r}: only worker-crash and worker-stall take vcpu=N")
    if vcpu is not None and int(vcpu) >= vcpus:
        raise ValueError(f"--inject {text!r}: vcpu={vcpu} but the run has {vcpus} vCPUs (0..{vcpus - 1})")
    if kind in STALLS and hold_s is None:
        hold_s = DEFAULT_HOLD_S
    if kind.startswith("worker-") and vcpu is None:
        vcpu = "0"
    return Injection(kind, at_s, hold_s, None if vcpu is None else int(vcpu))


class InjectionFailed(RuntimeError):
    """An injection the run cannot survive (yet); the message names it."""


class Injector:
    """Fires the run's injections on time; :meth:`record` is the report's ``recovery`` section.

    ``pid_of`` maps "source", "fault" or a vCPU index to a pid; ``link`` holds the orchestrator's
    copies of the destination's page-channel sockets (kept current across recoveries), which
    ``link-drop`` shuts down.
    """

    def __init__(self, injections: list[Injection], pid_of: Callable[[str | int], int | None],
                 link: list[socket.socket]) -> None:
        self.t_go = time.monotonic()
        self.pid_of, self.link = pid_of, link
        self.todo = sorted(injections, key=lambda i: i.at_s)
        self.held: list[tuple[float, int, dict]] = []  # (when to SIGCONT, pid, its record)
        self.done: list[dict] = []
        self.armed: list[dict] = []  # recovery-crash records waiting for the next replacement source
        self.down_until = 0.0  # monotonic time before which no new source may start (an outage's HOLD)

    def poll(self) -> None:
        """Fire what is due, continue what was held long enough; raises InjectionFailed when an
        injection makes the run fail by design."""
        now = time.monotonic()
        for until, pid, rec in [h for h in self.held if h[0] <= now]:
            self.held.remove((until, pid, rec))
            _signal(pid, signal.SIGCONT)
            rec["outcome"] = f"stopped, continued after {rec['hold-s']:g} s"
        while self.todo and now - self.t_go >= self.todo[0].at_s:
            self._fire(self.todo.pop(0), now)

    def _fire(self, inj: Injection, now: float) -> None:
        target = inj.vcpu if inj.kind.startswith("worker-") else "fault" if inj.kind == "handler-crash" else "source"
        pid = self.pid_of(target)
        who = (f"vCPU {inj.vcpu}" if isinstance(target, int) else "the page channels" if inj.kind == "link-drop"
               else "the fault handler" if target == "fault" else "the source")
        rec = {"injection": str(inj), "kind": inj.kind, "at-s": inj.at_s, "fired-at-s": round(now - self.t_go, 3),
               "target": who, "pid": pid, "outcome": ""}
        if inj.hold_s is not None:
            rec["hold-s"] = inj.hold_s
        self.done.append(rec)
        if pid is None and inj.kind not in ("link-drop", "recovery-crash"):
            rec["outcome"] = f"not fired: {who} had already ended"
            return
        if inj.kind in STALLS:
            _signal(pid, signal.SIGSTOP)
            rec["outcome"] = "stopped"
            self.held.append((now + inj.hold_s, pid, rec))
        elif inj.kind == "worker-crash":
            _signal(pid, signal.SIGKILL)
            rec["outcome"] = "killed: a lost vCPU, the run goes on without it"
        elif inj.kind == "handler-crash":
            _signal(pid, signal.SIGKILL)
            rec["outcome"] = "killed: the run fails (a lost handler cannot be survived)"
        elif inj.kind == "recovery-crash":
            rec["target"], rec["pid"] = "the next replacement source", None
            rec["outcome"] = "armed: no recovery started after it"
            self.armed.append(rec)
        else:
            if inj.kind == "source-crash":
                _signal(pid, signal.SIGKILL)
            else:
                for s in self.link:  # the destination's end of each page channel: both sides see the link go
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            rec["outcome"] = "killed" if inj.kind == "source-crash" else "both page channels shut down"
            rec["_t"] = now
            self.down_until = max(self.down_until, now + (inj.hold_s or 0.0))

    def replaced(self, pid: int) -> None:
        """The run killed ``pid`` (a source stopped past --stall-timeout) and replaces it: no SIGCONT
        is owed to it any more."""
        for held in [h for h in self.held if h[1] == pid]:
            self.held.remove(held)
            held[2]["outcome"] = "stopped; past --stall-timeout it was killed and replaced by a new source"

    def source_started(self, pid: int) -> bool:
        """A replacement source was just started: kill it at once if a recovery-crash is armed
        (True then)."""
        if not self.armed:
            return False
        rec = self.armed.pop(0)
        _signal(pid, signal.SIGKILL)
        rec["pid"] = pid
        rec["fired-at-s"] = round(time.monotonic() - self.t_go, 3)
        rec["outcome"] = "killed the replacement source as it started, before the resume completed"
        return True

    def finish(self) -> None:
        """Continue anything still stopped (the run ended or failed meanwhile) and mark what never fired."""
        for _, pid, rec in self.held:
            _signal(pid, signal.SIGCONT)
            rec["outcome"] = "stopped; the run ended before the hold did"
        self.held.clear()
        for rec in self.armed:
            rec["outcome"] = "armed; no replacement source was started after it"
        self.armed.clear()
        for inj in self.todo:
            self.done.append({"injection": str(inj), "kind": inj.kind, "at-s": inj.at_s, "fired-at-s": None,
                              "target": None, "pid": None, "outcome": "not fired: the run ended first"})
        self.todo.clear()

    def record(self, log: RecoveryLog | None = None) -> dict:
        """The report's ``recovery`` section: each injection with what came of it, and the run's
        pauses, resumes and paused time (``log``)."""
        log = log or RecoveryLog(self.t_go)
        done = []
        for rec in self.done:
            rec = dict(rec)
            t = rec.pop("_t", None)
            if t is not None:  # an outage: what the destination did after it
                rec["outcome"] += "; " + _after_outage(log, round(t - self.t_go, 3))
            done.append(rec)
        return {"injected": done, **log.summary()}


def _after_outage(log: RecoveryLog, at: float) -> str:
    """What the destination did after an outage at ``at`` s: paused, resumed (when), or not."""
    events = [e for e in log.events if e["at-s"] >= at - 0.001]
    paused = next((e for e in events if e["event"] in ("paused", "still-paused")), None)
    if paused is None:
        return "the destination did not pause (every page was in, or the run ended first)"
    resumed = next((e for e in events if e["event"] == "resumed" and e["at-s"] >= paused["at-s"]), None)
    if resumed is None:
        return "the destination paused (postcopy-paused) and no new source resumed it"
    return (f"the destination paused (postcopy-paused) and resumed with a new source "
            f"{resumed['at-s'] - at:.3f} s later")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass




def failure_note(rec: dict) -> str:
    """Words to add to a failed run's error when an injection fired: ' (after --inject X, Y)'."""
    fired = [d["injection"] for d in rec["injected"] if d.get("fired-at-s") is not None]
    return f" (after --inject {', '.join(fired)})" if fired else ""
