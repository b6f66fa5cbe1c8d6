"""Handing a worker's userfaultfd to the fault handler over a Unix socket (SCM_RIGHTS).

The handler listens on an abstract-namespace socket (no file to leave behind); each vCPU worker
connects, sends a fixed-size hello and its uffd.  The handler checks the kernel's word on who
connected (SO_PEERCRED) against what the hello claims before it trusts the fd.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

HELLO = struct.Struct("<4sIiiQQ")  # magic, version, vcpu, pid, base, length
MAGIC = b"PCHW"
VERSION = 1
_CRED = struct.Struct("3i")


class HandoffError(ConnectionError):
    """A worker's hand-off was malformed or came from the wrong process."""


@dataclass(frozen=True)
class WorkerHello:
    vcpu: int
    pid: int
    base: int
    length: int


def abstract_address(tag: str) -> str:
    """A per-run abstract socket name (leading NUL: lives in the kernel only)."""
    return f"\0pch-{os.getpid()}-{tag}"


def listen(address: str, backlog: int = 1024) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(address)
    s.listen(backlog)
    return s


def send_uffd(address: str, hello: WorkerHello, uffd: int, timeout: float = 30.0) -> None:
    """Worker side: connect and send the hello with the uffd attached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(address)
        msg = HELLO.pack(MAGIC, VERSION, hello.vcpu, hello.pid, hello.base, hello.length)
        socket.send_fds(s, [msg], [uffd])
        s.recv(1)  # wait for the handler's ack, so our fd is in its hands before we go on


def accept_uffd(listener: socket.socket, timeout: float = 30.0) -> tuple[WorkerHello, int]:
    """Handler side: accept one worker, check its credentials, return its hello and uffd."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout)
        pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        msg, fds, _flags, _addr = socket.recv_fds(conn, HELLO.size, 1)
        if len(fds) != 1 or len(msg) != HELLO.size:
            for fd in fds:
                os.close(fd)
            raise HandoffError(f"worker pid {pid}: expected a {HELLO.size}-byte hello with one fd")
        magic, version, vcpu, claimed_pid, base, length = HELLO.unpack(msg)
        problem = None
        if magic != MAGIC or version != VERSION:
            problem = f"bad hello magic/version {magic!r}/{version}"
        elif claimed_pid != pid:
            problem = f"claims pid {claimed_pid} but SO_PEERCRED says {pid}"
        elif uid != os.geteuid():
            problem = f"runs as uid {uid}, not {os.geteuid()}"
        if problem:
            os.close(fds[0])
            raise HandoffError(f"worker hand-off refused: {problem}")
        conn.sendall(b"k")
        return WorkerHello(vcpu, pid, base, length), fds[0]
