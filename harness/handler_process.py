"""An external fault handler (``run --handler CMD``): start it, hand it the vCPUs' uffds, stop it.

Two hand-offs, both described for implementers in docs/handler-protocol.md:

- ``pch`` (the default): the harness listens on a SOCK_SEQPACKET Unix socket whose path is in
  ``$PCH_HANDLER_SOCKET``; the handler connects once and receives one JSON message describing the
  run, then one message per uffd (the fd attached with SCM_RIGHTS), then ``end``; it answers
  ``ready`` once it holds them all, and exits when told ``quit``.
- ``firecracker``: the handler is started as ``CMD SOCKET MEMFILE`` and binds SOCKET itself; the
  harness connects once per uffd and sends Firecracker's region-mapping JSON with the uffd attached,
  as Firecracker does when it restores a snapshot with a Uffd memory backend.  Firecracker's own
  example handlers accept one connection: ``per_uffd`` starts one instance per uffd instead.

The handler runs in a process group of its own (every instance joins the first's), so teardown
stops whatever it forked; its stderr goes through a pipe so a failure can quote its last line.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

HANDOFFS = ("pch", "firecracker")
PROTOCOL = "pch-handler"
PROTOCOL_VERSION = 1
MAX_MESSAGE = 65536
QUIT_GRACE = 5.0  # pch: how long a handler told to quit may take before SIGTERM


def _die_with_parent() -> None:
    from postcopy_core import kernel

    kernel.die_with_parent()


def workdir_prefix(pid: int | None = None) -> str:
    """The name of a run's private folder starts so: the orchestrator's pid, for the sweep below."""
    return f"pch-handler-{os.getpid() if pid is None else pid}-"


def sweep_stale_workdirs(root: str | None = None) -> list[str]:
    """Remove our own handler folders (memory file, sockets) left by runs whose orchestrator is gone."""
    import re
    import shutil
    import tempfile

    root = root or tempfile.gettempdir()
    swept = []
    try:
        names = os.listdir(root)
    except OSError:
        return swept
    for name in names:
        m = re.match(r"pch-handler-(\d+)-", name)
        path = os.path.join(root, name)
        if not m or int(m.group(1)) == os.getpid() or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        swept.append(path)
    return swept


class HandlerError(RuntimeError):
    """The handler could not be started, refused the hand-off or broke the protocol (one line)."""


@dataclass(frozen=True)
class HandlerSpec:
    """Which external handler to run and how to hand it the uffds."""

    command: tuple[str, ...]
    handoff: str = "pch"
    per_uffd: bool = False  # firecracker: one handler process per uffd (for one-connection handlers)

    @classmethod
    def parse(cls, command: str, handoff: str = "pch", per_uffd: bool = False) -> HandlerSpec:
        """``command`` split as a shell would; HandlerError (one line) for an empty or unknown one."""
        try:
            argv = tuple(shlex.split(command))
        except ValueError as e:
            raise HandlerError(f"--handler {command!r}: {e}") from None
        if not argv:
            raise HandlerError("--handler: empty command")
        if handoff not in HANDOFFS:
            raise HandlerError(f"--handoff {handoff!r}: one of {', '.join(HANDOFFS)}")
        if per_uffd and handoff != "firecracker":
            raise HandlerError("--handler-per-uffd needs --handoff firecracker")
        return cls(argv, handoff, per_uffd)

    def describe(self) -> str:
        return shlex.join(self.command)


@dataclass(frozen=True)
class UffdEntry:
    """One worker's uffd as the handler is told of it."""

    vcpu: int  # -1: a non-vCPU process
    pid: int
    base: int
    fd: int


@dataclass
class HandlerProcess:
    """The running handler (one or more instances, one process group)."""

    spec: HandlerSpec
    workdir: str  # private folder of this run: the sockets live here
    mem_file: str
    page_size: int
    ram_size: int
    features: tuple[str, ...] = ("THREAD_ID", "MISSING_SHMEM")  # what the workers negotiated (UFFD_FEATURE_*)
    env_extra: dict = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    pgid: int | None = None
    conns: list[socket.socket] = field(default_factory=list)
    listener: socket.socket | None = None
    stderr_r: int = -1
    said: dict | None = None  # what a pch handler reported before it quit (its own words, unverified)

    # ------------------------------------------------------------ start

    def _spawn(self, argv: list[str], err_w: int, env: dict) -> subprocess.Popen:
        kw = dict(process_group=self.pgid if self.pgid is not None else 0)  # a group of its own, joined by the rest
        try:  # it dies with the orchestrator too (PR_SET_PDEATHSIG survives exec), as the workers do
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err_w, stderr=err_w, env=env,
                                 close_fds=True, preexec_fn=_die_with_parent, **kw)
        except OSError as e:
            raise HandlerError(f"cannot start the handler {shlex.join(argv)!r}: {e.strerror}") from None
        if self.pgid is None:
            self.pgid = p.pid
        p.returncode = 0  # the run reaps it (Children.reap waits on -1); keep Popen from trying
        self.procs.append(p)
        return p

    def start(self, err_w: int, ninstances: int = 1) -> list[int]:
        """Start the handler (``ninstances`` of it with per_uffd); returns the pids."""
        env = dict(os.environ, PCH_MEM_FILE=self.mem_file, PCH_PAGE_SIZE=str(self.page_size),
                   PCH_RAM_SIZE=str(self.ram_size), **self.env_extra)
        if self.spec.handoff == "pch":
            path = os.path.join(self.workdir, "handler.sock")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.bind(path)
            s.listen(1)
            self.listener = s
            env["PCH_HANDLER_SOCKET"] = path
            self._spawn(list(self.spec.command), err_w, env)
        else:
            for i in range(ninstances if self.spec.per_uffd else 1):
                self._spawn([*self.spec.command, self.socket_path(i), self.mem_file], err_w, env)
        return [p.pid for p in self.procs]

    def socket_path(self, i: int = 0) -> str:
        return os.path.join(self.workdir, f"uffd-{i}.sock" if self.spec.per_uffd else "uffd.sock")

    # ------------------------------------------------------------ hand-off

    def hand_off(self, entries: list[UffdEntry], alive, timeout: float) -> None:
        """Give the handler every uffd; ``alive()`` raises if the handler died meanwhile."""
        if self.spec.handoff == "pch":
            self._hand_off_pch(entries, alive, timeout)
        else:
            self._hand_off_firecracker(entries, alive, timeout)

    def region(self, e: UffdEntry) -> dict:
        """Firecracker's GuestRegionUffdMapping for the one region of guest RAM."""
        return {"base_host_virt_addr": e.base, "size": self.ram_size, "offset": 0, "page_size": self.page_size,
                "page_size_kib": self.page_size // 1024}

    def _hand_off_firecracker(self, entries: list[UffdEntry], alive, timeout: float) -> None:
        deadline = time.monotonic() + timeout  # for the handler to bind its socket
        for i, e in enumerate(entries):
            path = self.socket_path(i)
            while True:
                alive()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                s.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))  # a full backlog blocks connect
                try:
                    s.connect(path)
                    break
                except (TimeoutError, BlockingIOError):  # its backlog is full: it does not accept
                    s.close()
                    time.sleep(0.01)
                    if time.monotonic() > deadline:
                        raise HandlerError(f"the handler's socket took {i} of {len(entries)} connections and no "
                                           f"more within {timeout:.0f} s (one that accepts one connection only "
                                           "needs --handler-per-uffd)") from None
                except (FileNotFoundError, ConnectionRefusedError):
                    s.close()
                    if time.monotonic() > deadline:
                        raise HandlerError(f"the handler did not listen on {path} within {timeout:.0f} s") from None
                    time.sleep(0.01)
            body = json.dumps([self.region(e)]).encode()
            s.settimeout(timeout)
            try:
                socket.send_fds(s, [body], [e.fd])
            except OSError as err:
                s.close()
                raise HandlerError(f"the handler closed its socket during the hand-off of uffd {i}: "
                                   f"{err.strerror}") from None
            self.conns.append(s)  # kept open until teardown, as Firecracker keeps its end

    def _hand_off_pch(self, entries: list[UffdEntry], alive, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.listener.settimeout(0.05)
        while True:
            alive()
            try:
                conn, _ = self.listener.accept()
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise HandlerError(f"the handler did not connect to $PCH_HANDLER_SOCKET within {timeout:.0f} s"
                                       ) from None
        self.listener.close()
        self.listener = None
        self.conns.append(conn)
        conn.settimeout(timeout)
        try:
            self._send(conn, {"type": "run", "protocol": PROTOCOL, "version": PROTOCOL_VERSION,
                              "uffds": len(entries), "page_size": self.page_size, "size": self.ram_size,
                              "mem_file": self.mem_file, "features": list(self.features)})
            for e in entries:
                socket.send_fds(conn, [json.dumps({"type": "uffd", "vcpu": e.vcpu, "pid": e.pid,
                                                   **self.region(e)}).encode()], [e.fd])
            self._send(conn, {"type": "end"})
        except OSError as err:
            raise HandlerError(f"the handler closed its socket during the hand-off: {err.strerror or err}") from None
        while True:
            alive()
            msg = self._recv(conn, deadline)
            if msg.get("type") == "ready":
                break
            if msg.get("type") == "error":
                raise HandlerError(f"the handler refused the hand-off: {msg.get('error', '?')}")
        conn.setblocking(False)

    @staticmethod
    def _send(conn: socket.socket, msg: dict) -> None:
        conn.sendall(json.dumps(msg).encode())

    @staticmethod
    def _recv(conn: socket.socket, deadline: float) -> dict:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = conn.recv(MAX_MESSAGE)
        except TimeoutError:
            raise HandlerError("the handler did not answer 'ready' after the hand-off") from None
        if not data:
            raise HandlerError("the handler closed its socket before it said 'ready'")
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:
            raise HandlerError(f"the handler sent a message that is not a JSON object: {data[:60]!r}") from None
        return msg

    # ------------------------------------------------------------ stop

    def stop(self, reaped, grace: float = QUIT_GRACE) -> str:
        """End the handler: ``quit`` (pch) and a grace period, then SIGTERM, then SIGKILL to its whole
        process group; ``reaped()`` says whether every instance has been reaped.  Returns how it ended."""
        how = "killed"
        if self.spec.handoff == "pch" and self.conns:
            try:
                self.conns[0].setblocking(True)
                self._send(self.conns[0], {"type": "quit"})
                self.conns[0].settimeout(grace)
                data = self.conns[0].recv(MAX_MESSAGE)
                if data:
                    self.said = json.loads(data) if data.startswith(b"{") else None
            except (OSError, ValueError):
                pass
            deadline = time.monotonic() + grace
            while not reaped() and time.monotonic() < deadline:
                time.sleep(0.01)
            if reaped():
                how = "quit"
        if not reaped():
            self.kill(signal.SIGTERM)
            deadline = time.monotonic() + 2.0
            while not reaped() and time.monotonic() < deadline:
                time.sleep(0.01)
            how = "terminated" if reaped() else how
        self.kill(signal.SIGKILL)  # anything the handler forked, whatever its own exit
        return how

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        """Kill the group and close the sockets (idempotent; the run's teardown calls it)."""
        self.kill(signal.SIGKILL)
        for s in self.conns:
            s.close()
        self.conns.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
