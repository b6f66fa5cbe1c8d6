"""Sockets between the processes of a run: page channels, the outbox, and the control line.

Page channels are a Unix socketpair by default, or TCP (on loopback unless told otherwise) when
asked; either way each end is a connected, non-blocking stream socket.  A TCP connection carries no
page before the peer has proved it knows the run's key (postcopy_core/auth.py); strangers are
refused (the first told, the rest counted: postcopy_core/refusals.py) while the source keeps
waiting for the real destination.  Control channels
(orchestrator <-> source / destination) are socketpairs, which no other process can connect to, and
carry one JSON object per line.

Between machines the TCP channels may run over TLS (``--tls-creds``, postcopy_core/tls.py): the
handshake comes first, the HMAC proof then runs inside it; a page channel comes back as the plain end
of a relay (tls.tunnel) for the C lanes, the control channel as the TLS socket itself.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import socket
import ssl
import time
from collections import deque

from postcopy_core.auth import AuthError, ServerHandshake, client_handshake
from postcopy_core.refusals import Refusals
from postcopy_core.tls import TlsError, client_wrap, server_handshake_step, tunnel

CHANNEL_STREAM = b"S"
CHANNEL_URGENT = b"U"
CHANNEL_CONTROL = b"C"  # source --listen: the remote orchestrator's control line, authenticated the same way
IOV_MAX = 512
SOCKET_BUFFER = 16 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; not in Python's socket module
LOOPBACK = "127.0.0.1"
HANDSHAKE_TIMEOUT = 10.0  # a connection that has not proved itself by then is dropped
MAX_PENDING = 64  # connections in the middle of their handshake at once; the oldest makes room


def socket_buffer() -> int:
    """Bytes of send and receive buffer per channel: SOCKET_BUFFER, or ``PCH_SOCKET_BUFFER`` from the
    environment (e.g. 1: the smallest the kernel allows, where every frame crosses in many pieces and
    every send may find the socket full; the tests of the loop that never blocks use it)."""
    text = os.environ.get("PCH_SOCKET_BUFFER", "")
    return int(text) if text.isdigit() and int(text) > 0 else SOCKET_BUFFER


def tune(sock: socket.socket) -> socket.socket:
    """Non-blocking, no Nagle on TCP (a page request must not wait for more to batch with)."""
    sock.setblocking(False)
    size = socket_buffer()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # room for several 2 MiB huge-page frames in flight; the *FORCE options (root) go past
    # net.core.wmem_max/rmem_max, which default to ~208 KiB on many hosts
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        for opt in (force, plain):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue
    return sock


class ListenError(OSError):
    """A listener could not be made; ``str()`` is one line that names the address."""

    def __str__(self) -> str:
        return str(self.strerror)


def tcp_listener(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A listening socket on ``host`` (loopback by default), port kernel-chosen unless given;
    :class:`ListenError` naming the address if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
    except OSError as e:
        ls.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise ListenError(e.errno, f"cannot listen on TCP {where}: {e.strerror}") from None
    return ls


def tcp_connect(port: int, channel: bytes, key: bytes, host: str = LOOPBACK,
                timeout: float = HANDSHAKE_TIMEOUT, tls: ssl.SSLContext | None = None) -> socket.socket:
    """Destination side: connect one channel and authenticate (both ways) before any page; with
    ``tls``, inside a TLS session that checked the source's certificate first (see the top)."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            s = client_wrap(tls, s, host)
        try:
            client_handshake(s, key, channel)
        except ssl.SSLError as e:  # TLS 1.3: the source judges our certificate after our handshake ended
            raise TlsError(f"TLS: the source refused this destination ({e.reason or e})") from None
    except (AuthError, OSError):
        s.close()
        raise
    return _tls_channel(s, channel)


def _tls_channel(s: socket.socket, channel: bytes) -> socket.socket:
    """A page channel over TLS becomes the plain end of its relay; anything else stays as it is."""
    if isinstance(s, ssl.SSLSocket) and channel != CHANNEL_CONTROL:
        s.settimeout(None)
        return tune(tunnel(tune(s), channel.decode()))
    return tune(s)


def tcp_accept_channels(ls: socket.socket, key: bytes, timeout: float = 120.0,
                        handshake_timeout: float = HANDSHAKE_TIMEOUT,
                        wanted: tuple[bytes, ...] = (CHANNEL_STREAM, CHANNEL_URGENT), close: bool = True,
                        watch: socket.socket | None = None,
                        refusals: Refusals | None = None,
                        tls: ssl.SSLContext | None = None) -> tuple[socket.socket, ...]:
    """Source side: accept until each channel of ``wanted`` (the stream and the urgent channel) has
    proved it knows ``key``; returns them in that order.

    Connections are served side by side, so a silent or slow stranger delays nobody; one that fails
    its handshake, times out or claims a channel already taken is closed and counted in
    ``refusals`` (one of its own, summed up on return, when none is given: a caller that accepts
    again and again on one listener passes its own).  Closes ``ls`` unless ``close`` is False;
    gives up (ConnectionError) if ``watch`` becomes readable (its peer hung up).
    With ``tls`` every connection completes a TLS handshake (a client certificate from our CA) first.
    """
    got: dict[bytes, socket.socket] = {}
    handshaking: set[socket.socket] = set()  # TLS: connections whose TLS handshake is not done yet
    pending: dict[socket.socket, tuple[ServerHandshake, float, str]] = {}
    sel = selectors.DefaultSelector()
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    if watch is not None:
        sel.register(watch, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    own = refusals is None
    refusals = refusals or Refusals("page-channel connection")

    def drop(s: socket.socket, why: str) -> None:
        refusals.refuse(pending[s][2], why)
        sel.unregister(s)
        del pending[s]
        handshaking.discard(s)
        s.close()

    try:
        while len(got) < len(wanted):
            now = time.monotonic()
            if now > deadline:
                raise ConnectionError(f"no authenticated destination connected within {timeout:g} s")
            for s in [s for s, (_, t, _) in pending.items() if t < now]:
                drop(s, "no valid handshake in time")
            wake = min([deadline] + [t for _, t, _ in pending.values()])
            for sk, _ in sel.select(max(0.0, wake - now)):
                if sk.fileobj is ls:
                    _accept_pending(ls, sel, pending, key, wanted, time.monotonic() + handshake_timeout, refusals,
                                    tls, handshaking)
                    continue
                if sk.fileobj is watch:
                    raise ConnectionError("the destination hung up before connecting its page channels")
                _handshake_step(sk.fileobj, sel, pending, handshaking, got, drop)
    except BaseException:
        for s in got.values():
            s.close()
        raise
    finally:
        for s in pending:
            s.close()
        sel.close()
        if close:
            ls.close()
        if own:
            refusals.flush()
    return tuple(got[c] for c in wanted)


def _handshake_step(s: socket.socket, sel: selectors.BaseSelector, pending: dict, handshaking: set,
                    got: dict[bytes, socket.socket], drop) -> None:
    """Serve one readable connection's handshake (TLS first, then the key proof); a proven channel
    moves from ``pending`` to ``got``, a failed one is dropped."""
    hs = pending[s][0]
    if s in handshaking:
        try:
            wait = server_handshake_step(s)
        except TlsError as e:
            drop(s, str(e))
            return
        sel.modify(s, wait or selectors.EVENT_READ)
        if wait:
            return
        handshaking.discard(s)  # the proof may be in already: read on
    try:
        data = s.recv(max(1, hs.wants))
        if not data:
            raise AuthError("closed the connection during the handshake")
        reply = hs.feed(data)
        if reply:
            s.sendall(reply)  # 64 bytes into a fresh socket's empty buffer: never blocks
    except ssl.SSLWantReadError:
        return  # a TLS record without data for us yet
    except (AuthError, OSError) as e:
        drop(s, str(e))
        return
    if hs.channel is not None:
        if hs.channel in got:
            drop(s, f"channel {hs.channel!r} is connected already")
            return
        sel.unregister(s)
        del pending[s]
        s.setblocking(True)
        got[hs.channel] = _tls_channel(s, hs.channel)


def _accept_pending(ls: socket.socket, sel: selectors.BaseSelector, pending: dict, key: bytes,
                    wanted: tuple[bytes, ...], until: float, refusals: Refusals,
                    tls: ssl.SSLContext | None = None, handshaking: set | None = None) -> None:
    """Take every queued connection into the handshake (evicting the oldest when too many are pending)."""
    while True:
        try:
            s, addr = ls.accept()
        except (BlockingIOError, InterruptedError):
            return
        who = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if len(pending) >= MAX_PENDING:
            # a flood of silent connections must not lock the real destination out: it proves itself
            # within a round trip, so dropping the oldest (not the newcomer) keeps room for it
            oldest = min(pending, key=lambda c: pending[c][1])
            refusals.refuse(pending[oldest][2], f"{MAX_PENDING} handshakes pending at once")
            sel.unregister(oldest)
            del pending[oldest]
            if handshaking is not None:
                handshaking.discard(oldest)
            oldest.close()
        s.setblocking(False)
        if tls is not None:
            s = tls.wrap_socket(s, server_side=True, do_handshake_on_connect=False)
            handshaking.add(s)
        pending[s] = (ServerHandshake(key, wanted), until, who)
        sel.register(s, selectors.EVENT_READ)


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
    """One JSON object per line over a stream socket (orchestrator <-> service process).

    A message may carry fds (SCM_RIGHTS, :meth:`send_fds`): they wait in :attr:`fds` until
    :meth:`take_fds` takes them; the message says how many (``nfds``)."""

    MAX_FDS = 8

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def send(self, **msg) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def send_fds(self, fds: list[int], **msg) -> None:
        """One message with ``fds`` attached (its first byte carries them, so they arrive with it)."""
        data = json.dumps(dict(msg, nfds=len(fds))).encode() + b"\n"
        sent = socket.send_fds(self.sock, [data], fds)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def take_fds(self, n: int) -> list[int]:
        """The first ``n`` fds received (a message's ``nfds``); fewer if fewer came."""
        taken, self.fds = self.fds[:n], self.fds[n:]
        return taken

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message, or None on EOF or when ``timeout`` passes."""
        tls = isinstance(self.sock, ssl.SSLSocket)  # between machines (no fds there); it buffers records
        while b"\n" not in self.buf:
            if timeout is not None and not (tls and self.sock.pending()) \
                    and not select.select([self.sock], [], [], timeout)[0]:
                return None
            try:
                if tls:
                    chunk, fds = self.sock.recv(65536), []
                else:
                    chunk, fds, _, _ = socket.recv_fds(self.sock, 65536, self.MAX_FDS)
            except ConnectionResetError:  # the peer exited with our last message unread: gone all the same
                return None
            except ssl.SSLWantReadError:
                continue  # a record that carried no data
            except ssl.SSLError:  # a broken or forged record: the line is as good as gone
                return None
            self.fds += fds
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def fileno(self) -> int:
        return self.sock.fileno()
