"""Handing a worker's userfaultfd to the fault handler over a Unix socket (SCM_RIGHTS).

The handler listens on an abstract-namespace socket (no file to leave behind); each vCPU worker
connects, sends a fixed-size hello and its uffd.  An abstract socket has no permissions: any local
process can connect.  So the handler trusts nothing it is told: the kernel's word on who connected
(SO_PEERCRED) must name a worker of this run (a child of the run's zygote, same uid), the fd must be
a userfaultfd, and every hello field must fit the run's geometry: a vCPU index of this run not
registered yet, the RAM size, and a base where /proc/<pid>/maps shows that very process mapping this
run's guest-RAM memfd.  Anything else is dropped at once and the collection goes on (the first
refusal is told in a warning line, later ones counted into one line: postcopy_core/refusals.py);
connections are served side by side, so a silent one delays nobody.

The name carries a random part: a predictable one (``pch-<pid>-uffd``) let any local user bind it
first and stop the run at start.  A name that is taken anyway is retried under a new one.
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import selectors
import socket
import struct
import time
from dataclasses import dataclass

from postcopy_core.channel import ListenError
from postcopy_core.layouts import struct_format
from postcopy_core.refusals import Refusals

# magic, version, vcpu, pid, base, length: made from csrc/pch.h's struct pch_handoff_hello (declared there)
HELLO = struct_format("struct pch_handoff_hello")
MAGIC = b"PCHW"
VERSION = 1
ACK = b"k"
_CRED = struct.Struct("3i")
HELLO_TIMEOUT = 10.0  # from connect to hello; a worker sends it at once
SEND_TIMEOUT = 30.0  # a worker waits this long to connect, send and get the ack
BIND_TRIES = 8  # names tried before giving up: each is fresh, so a clash twice is already a squatter


class HandoffError(ConnectionError):
    """A worker's hand-off was malformed or came from the wrong process."""


@dataclass(frozen=True)
class WorkerHello:
    vcpu: int
    pid: int
    base: int
    length: int


@dataclass(frozen=True)
class Expected:
    """What a hand-off must match: this run's workers and geometry."""

    vcpus: int
    ram_size: int
    page_size: int
    ram_id: tuple[int, int]  # (st_dev, st_ino) of the guest-RAM memfd every worker maps
    workers_parent: int  # pid of the process that forks the workers (the zygote)

    @classmethod
    def for_run(cls, vcpus: int, ram_size: int, page_size: int, memfd: int, workers_parent: int) -> Expected:
        st = os.fstat(memfd)
        return cls(vcpus, ram_size, page_size, (st.st_dev, st.st_ino), workers_parent)


def abstract_address(tag: str) -> str:
    """A fresh abstract socket name for this process (leading NUL: lives in the kernel only), with
    an unguessable part: ``pch-<pid>-<16 hex digits>-<tag>`` (the pid first, for leftover checks)."""
    return f"\0pch-{os.getpid()}-{secrets.token_hex(8)}-{tag}"


def shown(address: str) -> str:
    """An abstract address as ``ss`` and /proc/net/unix show it: '@' for the leading NUL."""
    return "@" + address[1:] if address.startswith("\0") else address


def listen(address: str, backlog: int = 1024) -> socket.socket:
    """Listen on ``address``; ListenError (one line, naming the address) if it cannot be bound."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(address)
        s.listen(backlog)
    except OSError as e:
        s.close()
        raise ListenError(e.errno, f"cannot listen on the Unix socket {shown(address)}: {e.strerror}") from None
    return s


def listen_fresh(tag: str, backlog: int = 1024, tries: int = BIND_TRIES) -> tuple[socket.socket, str]:
    """Listen on a fresh :func:`abstract_address`, trying new names while one is taken; the
    listener and its address.  HandoffError (one line, the last address tried) when none binds."""
    last = "no name tried"
    for _ in range(max(1, tries)):
        address = abstract_address(tag)
        try:
            return listen(address, backlog), address
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise HandoffError(e.strerror) from None
            last = e.strerror
    raise HandoffError(f"{last} ({tries} fresh names were all taken: someone binds them as they are made)")


def send_uffd(address: str, hello: WorkerHello, uffd: int, timeout: float = SEND_TIMEOUT) -> None:
    """Worker side: connect and send the hello with the uffd attached; wait until it is accepted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(address)
        msg = HELLO.pack(MAGIC, VERSION, hello.vcpu, hello.pid, hello.base, hello.length)
        # the ack means our fd is in the handler's hands; EOF or a reset means it refused us
        try:
            socket.send_fds(s, [msg], [uffd])
            ack = s.recv(1)
        except (BrokenPipeError, ConnectionResetError):
            ack = b""
        if ack != ACK:
            raise HandoffError("the fault handler refused this worker's hand-off")


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` from /proc (-1 if it is gone); the name in stat may hold ')' and spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def maps_ram(pid: int, base: int, length: int, ram_id: tuple[int, int]) -> bool:
    """Does ``pid`` map the memfd ``ram_id`` over [base, base+length), offset 0 at ``base``?"""
    try:  # the usual case, one stat: a single mapping of exactly that range (needs CAP_SYS_ADMIN)
        st = os.stat(f"/proc/{pid}/map_files/{base:x}-{base + length:x}")
        if (st.st_dev, st.st_ino) == ram_id:
            return True
    except OSError:
        pass
    dev = f"{os.major(ram_id[0]):02x}:{os.minor(ram_id[0]):02x}"
    ino = str(ram_id[1])
    spans = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) >= 5 and fields[4] == ino and fields[3] == dev:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((lo, hi, int(fields[2], 16)))
    except (OSError, ValueError):
        return False
    cur, end = base, base + length
    for lo, hi, off in sorted(spans):
        if lo <= cur < hi and off + (cur - lo) == cur - base:
            cur = hi
    return cur >= end


def _is_uffd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def _peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid


def check_peer(pid: int, uid: int, expect: Expected) -> str | None:
    """Why a connected process may not hand in a uffd, or None if it is a worker of this run."""
    if uid != os.geteuid():
        return f"runs as uid {uid}, not {os.geteuid()}"
    if parent_pid(pid) != expect.workers_parent:
        return "not a vCPU worker of this run"
    return None


def check_hello(msg: bytes, fds: list[int], pid: int, expect: Expected, taken: dict[int, int],
                taken_pids: set[int] | None = None) -> str | None:
    """Why this hello (with its fds) is refused, or None if it fits the run; ``taken``: vcpu -> pid,
    ``taken_pids``: its values as a set (kept by the caller: 4096 hellos must not scan 4096 values each)."""
    if len(fds) != 1 or len(msg) != HELLO.size:
        return f"expected a {HELLO.size}-byte hello with one fd, got {len(msg)} bytes and {len(fds)} fds"
    magic, version, vcpu, claimed_pid, base, length = HELLO.unpack(msg)
    if magic != MAGIC or version != VERSION:
        return f"bad hello magic/version {magic!r}/{version}"
    if claimed_pid != pid:
        return f"claims pid {claimed_pid} but SO_PEERCRED says {pid}"
    if not 0 <= vcpu < expect.vcpus:
        return f"claims vCPU {vcpu}, the run has vCPUs 0..{expect.vcpus - 1}"
    if length != expect.ram_size:
        return f"claims {length} bytes of RAM, the run has {expect.ram_size}"
    if base == 0 or base % expect.page_size:
        return f"claims base {base:#x}, not a page-aligned address"
    if not maps_ram(pid, base, length, expect.ram_id):
        return f"does not map this run's guest RAM at {base:#x}"
    if not _is_uffd(fds[0]):
        return "sent an fd that is not a userfaultfd"
    if vcpu in taken:
        return f"claims vCPU {vcpu}, registered already by pid {taken[vcpu]}"
    if pid in (taken_pids if taken_pids is not None else set(taken.values())):
        return "has registered a uffd already"
    return None


def _take_hello(conn: socket.socket, pid: int, expect: Expected, taken: dict[int, int], taken_pids: set[int],
                drop) -> tuple[WorkerHello, int] | None:
    """Read one connection's hello and uffd and ack it: (hello, uffd), or None when nothing came yet
    or the connection was refused (``drop`` said why and closed it)."""
    try:
        msg, fds, flags, _ = socket.recv_fds(conn, HELLO.size, 1)
    except BlockingIOError:
        return None
    except OSError as e:
        drop(conn, pid, f"recvmsg: {e.strerror}")
        return None
    if flags & socket.MSG_CTRUNC and at_fd_limit():  # our limit, not the peer's doing
        raise HandoffError(f"the fd limit cut a vCPU's uffd hand-off short: {fd_limit_words()}")
    why = "file descriptors cut short (MSG_CTRUNC)" if flags & socket.MSG_CTRUNC else None
    why = why or check_hello(msg, fds, pid, expect, taken, taken_pids)
    if why:
        for fd in fds:
            os.close(fd)
        drop(conn, pid, why if msg else "closed without a hello")
        return None
    hello = WorkerHello(*HELLO.unpack(msg)[2:])
    try:
        conn.send(ACK)
    except OSError as e:
        os.close(fds[0])
        drop(conn, pid, f"gone before the ack: {e.strerror}")
        return None
    return hello, fds[0]


def collect_uffds(listener: socket.socket, expect: Expected, timeout: float,
                  hello_timeout: float = HELLO_TIMEOUT) -> list[tuple[WorkerHello, int]]:
    """Handler side: accept until every vCPU of the run has handed in its uffd; [(hello, uffd)].

    Strangers, malformed hellos, second registrations and silent connections are refused at once
    (the first told in a warning, the rest counted into one line), never fatal; only the overall
    ``timeout`` ends the collection with an error.
    """
    got: dict[int, tuple[WorkerHello, int]] = {}
    taken: dict[int, int] = {}
    taken_pids: set[int] = set()
    pending: dict[socket.socket, tuple[int, float]] = {}  # conn -> (pid, deadline)
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    refusals = Refusals("uffd hand-off")

    def drop(conn: socket.socket, pid: int, why: str) -> None:
        refusals.refuse(f"pid {pid}", why)
        if conn in pending:
            sel.unregister(conn)
            del pending[conn]
        conn.close()

    try:
        while len(got) < expect.vcpus:
            now = time.monotonic()
            if now > deadline:
                raise HandoffError(f"only {len(got)} of {expect.vcpus} vCPU workers handed in their uffd "
                                   f"within {timeout:g} s")
            # deadlines grow in accept order (dicts keep it): only the oldest connections can be late,
            # so a turn costs O(1), not O(pending), with thousands of workers connecting at once
            while pending:
                conn, (pid, t) = next(iter(pending.items()))
                if t >= now:
                    break
                drop(conn, pid, f"no hello within {hello_timeout:g} s")
            wake = min(deadline, next(iter(pending.values()))[1]) if pending else deadline
            for sk, _ in sel.select(max(0.0, wake - now)):
                if sk.fileobj is listener:
                    _accept(listener, sel, pending, expect, time.monotonic() + hello_timeout, drop)
                    continue
                conn = sk.fileobj
                pid = pending[conn][0]
                took = _take_hello(conn, pid, expect, taken, taken_pids, drop)
                if took is None:
                    continue
                hello, uffd = took
                taken[hello.vcpu] = pid
                taken_pids.add(pid)
                got[hello.vcpu] = (hello, uffd)
                sel.unregister(conn)
                del pending[conn]
                conn.close()
    except BaseException:
        for _, fd in got.values():
            os.close(fd)
        raise
    finally:
        for conn in pending:
            conn.close()
        sel.close()
        refusals.flush()
    return [got[v] for v in sorted(got)]


def at_fd_limit() -> bool:
    """Are this process's fds (nearly) all used?"""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft != resource.RLIM_INFINITY and len(os.listdir("/proc/self/fd")) >= soft - 2


def fd_limit_words() -> str:
    """Which limit, and how close: RLIMIT_NOFILE soft/hard and the fds open now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"RLIMIT_NOFILE is {soft} (hard {hard}) and {len(os.listdir('/proc/self/fd'))} fds are open; "
            "the fault handler holds one uffd per vCPU (raise it: ulimit -n)")


def _accept(listener: socket.socket, sel: selectors.BaseSelector, pending: dict, expect: Expected,
            until: float, drop) -> None:
    """Take every queued connection; refuse at once (before reading a byte) any that is not ours."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise HandoffError(f"cannot take more vCPU hand-offs: {e.strerror}; {fd_limit_words()}") from None
            raise
        pid, uid = _peer(conn)
        why = check_peer(pid, uid, expect)
        if why:
            drop(conn, pid, why)
            continue
        conn.setblocking(False)
        pending[conn] = (pid, until)
        sel.register(conn, selectors.EVENT_READ)
