"""TLS on the TCP channels between two machines (``source --listen`` / ``run --source`` ``--tls-creds DIR``).

The credentials follow QEMU's ``tls-creds-x509`` directory layout: ``ca-cert.pem`` (the CA both
ends trust), ``server-cert.pem`` + ``server-key.pem`` (the source), ``client-cert.pem`` +
``client-key.pem`` (the destination).  Both ends prove themselves: the source asks for a client
certificate signed by the CA, the destination checks the source's certificate and that it names
the host it connected to.  The run's HMAC handshake (postcopy_core/auth.py) still runs inside the
TLS session, so the key file stays a second, independent proof.

Every file is opened without following a symlink and refused, in one line, when another user owns
it or when group or others may read or write it: a key anyone can read proves nothing, and a CA
file someone else can replace decides whom we trust.

The data path: the source's C lane and the destination's C loop write and read plain file
descriptors (writev, recv into place), which cannot carry TLS records, and Python's ``ssl`` here
offers no kernel TLS (``OP_ENABLE_KTLS`` needs Python 3.12 and an OpenSSL built for it).  So each
page channel gets a :func:`tunnel`: a Unix socket pair whose far end a relay thread copies to and
from the TLS socket.  The C code sees the same kind of socket as on a local run; the relay costs
a copy and Python's record handling (bench/tls_cost.py measures it).  The control line needs no
relay: :class:`~postcopy_core.channel.ControlLine` reads and writes the TLS socket itself.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import stat
import threading

from postcopy_core.auth import warn

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
RELAY_CHUNK = 1 << 18  # bytes read from one side at a time (a TLS record carries at most 16 KiB of it)
RELAY_BACKLOG = 4 << 20  # bytes buffered in one direction before the relay stops reading that side
KTLS = False  # see the top: the C lanes talk to the relay, never to a TLS socket


class TlsError(ConnectionError):
    """Unusable credentials or a failed TLS handshake; the message says why in one line."""


def _checked_path(directory: str, name: str) -> tuple[int, str]:
    """An fd on ``directory/name`` that is ours alone, and a path that names exactly that file."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise TlsError(f"--tls-creds {directory}: {name}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    elif st.st_mode & 0o077:
        problem = f"mode {stat.S_IMODE(st.st_mode):04o}: group or others may read or change it (chmod 600 it)"
    if problem:
        os.close(fd)
        raise TlsError(f"--tls-creds {directory}: {name}: {problem}")
    # loading through /proc/self/fd reads the very file checked above, whatever the path does meanwhile
    return fd, f"/proc/self/fd/{fd}"


def _load(ctx: ssl.SSLContext, directory: str, cert: str, key: str) -> None:
    opened = []
    try:
        for name in (CA_CERT, cert, key):
            opened.append(_checked_path(directory, name))
        (_, ca), (_, cert_path), (_, key_path) = opened
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"--tls-creds {directory}: {CA_CERT}: not a usable CA certificate ({_reason(e)})") from None
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"--tls-creds {directory}: {cert} / {key}: not a usable certificate and key "
                           f"({_reason(e)})") from None
    finally:
        for fd, _ in opened:
            os.close(fd)


def _reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


def server_context(directory: str) -> ssl.SSLContext:
    """The source's side: its certificate, and a client certificate from the CA required of every peer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no session resumption: and no post-handshake records on the control line
    _load(ctx, directory, SERVER_CERT, SERVER_KEY)
    return ctx


def client_context(directory: str) -> ssl.SSLContext:
    """The destination's side: the source's certificate must come from the CA and name its host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, directory, CLIENT_CERT, CLIENT_KEY)
    return ctx


def client_wrap(ctx: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    """The destination's TLS handshake on a connected blocking socket (its timeout bounds it)."""
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        raise TlsError(f"TLS: the source's certificate does not check: {e.verify_message}") from None
    except ssl.SSLError as e:
        raise TlsError(f"TLS handshake failed: {_reason(e)} (is the source started with --tls-creds?)") from None


def server_handshake_step(sock: ssl.SSLSocket) -> int:
    """One step of the source's non-blocking handshake: 0 when done, else the selector events to wait
    for (EVENT_READ = 1, EVENT_WRITE = 2); TlsError when the peer fails it."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return 1
    except ssl.SSLWantWriteError:
        return 2
    except ssl.SSLError as e:
        raise TlsError(f"TLS handshake failed: {_reason(e)}") from None
    return 0


def tunnel(tls_sock: ssl.SSLSocket, name: str) -> socket.socket:
    """A plain connected socket for the C lanes; a daemon thread relays it to and from ``tls_sock``.

    An end of stream on either side reaches the other (so the C code sees a source or destination
    that went away exactly as without TLS); the thread closes ``tls_sock`` when it is done."""
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=_relay, args=(tls_sock, outer), name=f"pch-tls-{name}", daemon=True).start()
    return inner


def _relay(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Copy both ways between ``tls`` and ``plain`` until both have ended (or one broke); whatever
    ends it, both sockets close, which the C side and the peer see as the channel's end."""
    try:
        _copy_both_ways(tls, plain)
    except OSError:
        pass  # a side that broke: its end is all there is to pass on
    except Exception as e:  # a bug here must not print a traceback over the run's output
        warn(f"TLS relay {threading.current_thread().name} stopped: {type(e).__name__}: {e}")
    finally:
        _close_tls(tls)
        plain.close()


def _copy_both_ways(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    _Relay(tls, plain).run()


class _RelayDone(Exception):
    """One side of the relay broke or closed: the relay ends (closing ours tells the other side)."""


class _Relay:
    """The bytes between a TLS socket (the network) and a plain one (the C side), both ways, in one
    thread: each turn moves what it can in each direction, and polls only when nothing moved."""

    def __init__(self, tls: ssl.SSLSocket, plain: socket.socket) -> None:
        tls.setblocking(False)
        plain.setblocking(False)
        self.tls, self.plain = tls, plain
        self.down = bytearray()  # from the network, for the C side
        self.up = bytearray()  # from the C side, for the network
        self.view = memoryview(bytearray(RELAY_CHUNK))
        self.tls_eof = self.plain_eof = self.plain_shut = False
        self.tls_wants = select.POLLIN
        self.poller = select.poll()

    def run(self) -> None:
        while True:
            try:
                moved = self._pull_network()
                moved = self._push_local() or moved
                if self.tls_eof and not self.down and not self.plain_shut:
                    self.plain.shutdown(socket.SHUT_WR)  # the peer's end of stream, passed on
                    self.plain_shut = True
                moved = self._pull_local() or moved
                moved = self._push_network() or moved
            except _RelayDone:
                return
            if self.plain_eof and not self.up:
                return  # the C side closed its end: nothing more will go out, the peer learns it from us
            if moved or self.tls.pending():
                continue
            self._wait()

    def _pull_network(self) -> bool:
        """Every record that is in (a record is at most 16 KiB): fewer, bigger writes to the C side."""
        moved = False
        view = self.view
        while not self.tls_eof and len(self.down) < RELAY_BACKLOG:
            try:
                n = self.tls.recv_into(view)
            except ssl.SSLWantReadError:
                self.tls_wants = select.POLLIN
                break
            except ssl.SSLWantWriteError:
                self.tls_wants = select.POLLOUT
                break
            except (ssl.SSLError, OSError):
                raise _RelayDone from None  # the network side broke: closing ours tells the C side
            if not n:
                self.tls_eof = True
                break
            self.down += view[:n]
            moved = True
            if len(self.down) >= RELAY_CHUNK:
                break
        return moved

    def _push_local(self) -> bool:
        if not self.down:
            return False
        try:
            n = self.plain.send(self.down)
        except BlockingIOError:
            return False
        except OSError:
            raise _RelayDone from None  # the C side is gone
        del self.down[:n]
        return True

    def _pull_local(self) -> bool:
        if self.plain_eof or len(self.up) >= RELAY_BACKLOG:
            return False
        try:
            n = self.plain.recv_into(self.view)
        except BlockingIOError:
            return False
        except OSError:
            self.plain_eof = True
            return False
        if not n:
            self.plain_eof = True
            return False
        self.up += self.view[:n]
        return True

    def _push_network(self) -> bool:
        if not self.up:
            return False
        try:
            n = self.tls.send(self.up)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        except (ssl.SSLError, OSError):
            raise _RelayDone from None
        del self.up[:n]
        return True

    def _wait(self) -> None:
        """Poll for only what we wait for: an ended side would report POLLHUP on every turn."""
        want = {self.tls.fileno(): (self.tls_wants if not self.tls_eof and len(self.down) < RELAY_BACKLOG else 0)
                | (select.POLLOUT if self.up else 0),
                self.plain.fileno(): (select.POLLIN if not self.plain_eof and len(self.up) < RELAY_BACKLOG else 0)
                | (select.POLLOUT if self.down else 0)}
        for fd, events in want.items():
            if events:
                self.poller.register(fd, events)
        self.poller.poll(1000)
        for fd, events in want.items():
            if events:
                self.poller.unregister(fd)


def _close_tls(tls: ssl.SSLSocket) -> None:
    """Say goodbye in TLS where the socket still takes it (close_notify), then close."""
    try:
        tls.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        pass
    tls.close()
