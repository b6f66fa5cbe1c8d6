"""Sockets between the processes of a run: page channels, the outbox, and the control line.

Page channels are a Unix socketpair by default, or TCP on loopback when asked; either way each
end is a connected, non-blocking stream socket.  Control channels (orchestrator <-> source /
destination) carry one JSON object per line.
"""

from __future__ import annotations

import json
import select
import socket
from collections import deque

CHANNEL_STREAM = b"S"
CHANNEL_URGENT = b"U"
IOV_MAX = 512


def tune(sock: socket.socket) -> socket.socket:
    """Non-blocking, no Nagle on TCP (a page request must not wait for more to batch with)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    return sock


def tcp_listener() -> socket.socket:
    """A listening socket on loopback with a kernel-chosen port."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    return ls


def tcp_connect(port: int, channel: bytes, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(channel)
    return tune(s)


def tcp_accept_channels(ls: socket.socket, timeout: float = 10.0) -> tuple[socket.socket, socket.socket]:
    """Accept the stream and the urgent connection (each announces itself with one byte)."""
    got: dict[bytes, socket.socket] = {}
    ls.settimeout(timeout)
    while len(got) < 2:
        s, _ = ls.accept()
        s.settimeout(timeout)
        kind = s.recv(1)
        if kind not in (CHANNEL_STREAM, CHANNEL_URGENT) or kind in got:
            s.close()
            raise ConnectionError(f"unexpected channel announcement {kind!r}")
        got[kind] = tune(s)
    return got[CHANNEL_STREAM], got[CHANNEL_URGENT]


class Outbox:
    """Buffers that a non-blocking socket has not taken yet, sent with scatter-gather sendmsg."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.q: deque[memoryview] = deque()
        self.queued = 0

    def push(self, *bufs) -> None:
        for b in bufs:
            mv = memoryview(b)
            if mv.nbytes:
                self.q.append(mv)
                self.queued += mv.nbytes

    def flush(self) -> bool:
        """Send as much as the socket takes; True when everything has gone."""
        q = self.q
        while q:
            batch = [q[i] for i in range(min(len(q), IOV_MAX))]
            try:
                n = self.sock.sendmsg(batch)
            except BlockingIOError:
                return False
            self.queued -= n
            while n:
                head = q[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    q.popleft()
                else:
                    q[0] = head[n:]
                    n = 0
        return True


class ControlLine:
    """One JSON object per line over a stream socket (orchestrator <-> service process)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, **msg) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message, or None on EOF or when ``timeout`` passes."""
        while b"\n" not in self.buf:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def fileno(self) -> int:
        return self.sock.fileno()
