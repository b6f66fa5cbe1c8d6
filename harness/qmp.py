"""A small synchronous QMP client over a Unix socket, and the QEMU process it talks to.

Shared by ``postcopy-harness qemu`` and ``tools/qemu_capture``.  Only the standard library; every
wait is bounded, and ``QemuProcess.stop`` always leaves no process behind.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path


class QmpError(RuntimeError):
    """QEMU refused a command, went away, or did not answer in time (one line)."""


class QMP:
    """One QMP connection: ``cmd(name, **args)`` returns the ``return`` value; events are kept."""

    def __init__(self, path: Path, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if proc is not None and proc.poll() is not None:
                    raise QmpError(f"QEMU exited with status {proc.returncode} before its QMP socket came up") from None
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not come up in {timeout:g} s") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {str(greeting)[:80]}")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"QMP read failed: {exc}") from None
            if not chunk:
                raise QmpError("QEMU closed its QMP connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args):
        """Run one command; raises ``QmpError`` with QEMU's own description if it fails."""
        msg: dict = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP {name}: {exc}") from None
        while True:
            resp = self._read()
            if "event" in resp:
                self.events.append(resp)
                continue
            if "error" in resp:
                raise QmpError(f"QMP {name}: {resp['error'].get('desc', resp['error'])}")
            return resp.get("return")

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the harness dies, so no QEMU outlives a killed run."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class QemuProcess:
    """A QEMU started with a QMP socket at ``qmp_path``; ``stop()`` quits it, then signals, then kills."""

    def __init__(self, cmd: list[str], qmp_path: Path, out_path: Path) -> None:
        self.cmd = cmd
        with open(out_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        self.out_path = out_path
        self.qmp: QMP | None = None
        try:
            self.qmp = QMP(qmp_path, self.proc)
        except QmpError:
            self.stop()
            raise

    def output(self) -> str:
        try:
            return Path(self.out_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.sock.settimeout(5)
                self.qmp.cmd("quit")
            except (QmpError, OSError, ValueError):
                pass
        if self.qmp is not None:
            self.qmp.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            if sig is not None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=10 if sig is None else 5)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            proc.wait(timeout=5)


def wait_status(q: QMP, want: set[str], timeout: float, poll: float = 0.02) -> dict:
    """``query-migrate`` once its status is one of ``want``; a failed migration or a timeout raises."""
    deadline = time.monotonic() + timeout
    while True:
        info = q.cmd("query-migrate")
        st = info.get("status")
        if st in want:
            return info
        if st in ("failed", "cancelled", "failing"):  # "failing": QEMU 10.2+, on its way to failed
            raise QmpError(f"migration {st}: {info.get('error-desc', '')}".rstrip(": "))
        if time.monotonic() > deadline:
            raise QmpError(f"migration still {st!r} after {timeout:g} s")
        time.sleep(poll)
