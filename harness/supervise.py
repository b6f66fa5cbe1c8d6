"""Child processes of a run: fork with hygiene, reap, and tear everything down.

Every child dies with the orchestrator (PR_SET_PDEATHSIG), ignores Ctrl-C (the orchestrator
handles it and kills the children), and keeps only the fds it was given.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from postcopy_core.child import run_child


class RunFailed(RuntimeError):
    """The run cannot complete; the message is one line for the user."""


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


@dataclass
class Children:
    """The processes of one run, by role."""

    roles: dict[int, str] = field(default_factory=dict)  # pid -> "source" | "handler" | "vcpu-N"
    exited: dict[int, int] = field(default_factory=dict)  # pid -> wait status

    def spawn(self, role: str, keep: set[int], body: Callable[[], int], cpus: tuple[int, ...] = ()) -> int:
        """Fork a child that runs ``body`` with only ``keep`` fds open (on ``cpus``), then _exits."""
        pid = os.fork()
        if pid == 0:
            run_child(f"pch-{role}", role, keep, body, cpus)
        self.roles[pid] = role
        return pid

    def add(self, pid: int, role: str) -> None:
        self.roles[pid] = role

    def reap(self) -> list[tuple[int, str, int]]:
        """Collect children that have exited, without blocking: [(pid, role, status)]."""
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.roles:
                self.exited[pid] = status
                out.append((pid, self.roles[pid], status))
        return out

    def alive(self) -> list[int]:
        return [p for p in self.roles if p not in self.exited]

    def kill_all(self, grace: float = 0.0) -> None:
        """SIGKILL (after ``grace`` seconds of SIGTERM, if any) and reap every child."""
        pids = self.alive()
        if grace > 0:
            for pid in pids:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.01)
        for pid in self.alive():
            _signal(pid, signal.SIGKILL)
        for pid in self.alive():
            try:
                _, status = os.waitpid(pid, 0)
                self.exited[pid] = status
            except ChildProcessError:
                self.exited[pid] = 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_workers(pids: list[int], timeout: float = 10.0) -> None:
    """Make sure vCPU workers are gone: they die with their zygote (PDEATHSIG) and, as orphans,
    come to us (we are a child subreaper) to be reaped.  Kill any still there, reap until none."""
    import psutil

    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.name().startswith("pch-vcpu"):
                p.kill()
        except psutil.Error:
            pass
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        if not alive:
            return
        time.sleep(0.01)
