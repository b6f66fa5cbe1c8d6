"""Child processes of a run: fork with hygiene, reap, and tear everything down.

Every child dies with the orchestrator (PR_SET_PDEATHSIG), ignores Ctrl-C (the orchestrator
handles it and kills the children), and keeps only the fds it was given.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from postcopy_core.child import run_child

STARTUP_TIMEOUT = 120.0  # seconds a process of the run may take to come up (sources, handler, workers)


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

    def spawn(self, role: str, keep: set[int], body: Callable[[], int], cpus: tuple[int, ...] = (),
              stderr: int | None = None) -> int:
        """Fork a child that runs ``body`` with only ``keep`` fds open (on ``cpus``, its fd 2 on
        ``stderr`` if given), then _exits."""
        pid = os.fork()
        if pid == 0:
            if stderr is not None:
                os.dup2(stderr, 2)
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


class ChildStderr:
    """Each child's stderr through a pipe of its own, so a failure can say why a child died.

    A child that fails writes its reason as its last line (``source: ValueError: ...``, or the last
    line of a Python traceback).  The orchestrator drains the pipes without blocking while it
    supervises and keeps the last lines of each; after a good run they are passed on to its own
    stderr (warnings), after a failure only the dead child's last line is shown, in the one-line error.
    """

    TAIL = 256

    def __init__(self) -> None:
        self._read: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self.lines: dict[str, deque[str]] = {}

    def pipe(self, role: str) -> int:
        """A new pipe for ``role``; returns the write end (the caller closes it once the child has it)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        if role in self._read:  # a later process in the same role (a replacement source): one history
            self.drain()
            os.close(self._read[role])
        else:
            self.lines[role] = deque(maxlen=self.TAIL)
        self._read[role], self._partial[role] = r, b""
        return w

    def drain(self) -> None:
        """Read whatever the children wrote so far (never blocks)."""
        for role, fd in self._read.items():
            while True:
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                *done, self._partial[role] = (self._partial[role] + data).split(b"\n")
                self.lines[role].extend(x.decode(errors="replace").strip() for x in done if x.strip())

    def reason(self, role: str, label: str | None = None) -> str:
        """The last line ``role``'s pipe holds (from ``label``'s process if given), as ``": why"``,
        without the child's own label; empty when it said nothing."""
        self.drain()
        pending = self._partial.get(role, b"").decode(errors="replace").strip()
        lines = [*self.lines.get(role, ()), *([pending] if pending else [])]
        if label is not None:
            lines = [x for x in lines if x.startswith(f"{label}: ")]
        if not lines:
            return ""
        line = lines[-1]
        for prefix in (f"{label or role}: ", f"{role}: "):
            line = line.removeprefix(prefix)
        return f": {' '.join(line.split())}"

    def forget(self, role: str) -> None:
        """Drop what ``role``'s process said so far: it was lost and replaced, and its last words are
        in the recovery log already (a dropped link's EPIPE is no warning for a run that resumed)."""
        self.drain()
        if role in self.lines:
            self.lines[role].clear()
            self._partial[role] = b""

    def close(self, forward: bool) -> None:
        """Close the pipes; with ``forward`` write what the children said to our own stderr."""
        self.drain()
        for role, fd in self._read.items():
            os.close(fd)
            if forward and self.lines[role]:
                try:
                    os.write(2, ("\n".join(self.lines[role]) + "\n").encode())
                except OSError:
                    pass
        self._read.clear()


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
