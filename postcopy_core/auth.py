"""Proving that a TCP peer belongs to this run before any page moves.

Both ends of a run's page channels know a secret key: a fresh random one per run (source and
destination are forked from the same orchestrator), or one read from a file when the two ends are
started apart (``--auth-key-file``).  Each TCP connection opens with a mutual challenge-response
over HMAC-SHA256, both nonces fresh, so nothing one connection shows can be replayed on another:

    destination -> source   b"PCHA", version, channel (S/U), 32-byte nonce Nc
    source -> destination   32-byte nonce Ns, HMAC(key, "server" | channel | Nc | Ns)
    destination -> source   HMAC(key, "client" | channel | Nc | Ns)

The destination checks the source's proof before it sends its own; the source hands out no page
until the destination's proof checks.  The labels keep one side's proof from serving as the other's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat

MAGIC = b"PCHA"
VERSION = 1
NONCE = 32
MAC = 32
OPENING = len(MAGIC) + 1 + 1 + NONCE  # magic, version, channel, Nc
KEY_BYTES = 32
MIN_KEY_BYTES = 16
MAX_KEY_FILE = 4096


class AuthError(ConnectionError):
    """A peer failed (or refused us) the authentication step; the message says why, in one line."""


def new_key() -> bytes:
    """A fresh per-run secret."""
    return secrets.token_bytes(KEY_BYTES)


def key_from_file(path: str) -> bytes:
    """The secret in ``path`` (trailing whitespace dropped): a regular file only we may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise AuthError(f"--auth-key-file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"--auth-key-file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise AuthError(f"--auth-key-file {path}: readable or writable by others (chmod 600 it)")
        key = b""
        while len(key) <= MAX_KEY_FILE:
            chunk = os.read(fd, MAX_KEY_FILE + 1 - len(key))
            if not chunk:
                break
            key += chunk
        key = key.rstrip(b" \t\r\n")
    finally:
        os.close(fd)
    if len(key) > MAX_KEY_FILE:
        raise AuthError(f"--auth-key-file {path}: larger than {MAX_KEY_FILE} bytes")
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(f"--auth-key-file {path}: a key needs at least {MIN_KEY_BYTES} bytes, "
                        f"this one has {len(key)} (e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


def run_key(key_file: str | None = None) -> bytes:
    """The key source of a run: the file's key when one is given, else a fresh random one."""
    return key_from_file(key_file) if key_file else new_key()


def _proof(key: bytes, label: bytes, channel: bytes, nc: bytes, ns: bytes) -> bytes:
    return hmac.new(key, label + channel + nc + ns, hashlib.sha256).digest()


class ServerHandshake:
    """The source's side of one connection, fed the bytes as they arrive (the caller multiplexes).

    :meth:`feed` returns bytes to send back (possibly empty) and raises :class:`AuthError` on any
    failure; :attr:`channel` is set once the peer has proved it knows the key.
    """

    def __init__(self, key: bytes, channels: tuple[bytes, ...]) -> None:
        self.key, self.channels = key, channels
        self.buf = b""
        self.nc = self.ns = b""
        self.claimed: bytes | None = None
        self.channel: bytes | None = None

    @property
    def wants(self) -> int:
        """How many more bytes this step needs."""
        return (OPENING if self.claimed is None else MAC) - len(self.buf)

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if self.claimed is None:
            if len(self.buf) < OPENING:
                return b""
            opening, self.buf = self.buf[:OPENING], self.buf[OPENING:]
            if opening[:4] != MAGIC or opening[4] != VERSION:
                raise AuthError("not a postcopy-harness page channel (bad opening)")
            claimed = opening[5:6]
            if claimed not in self.channels:
                raise AuthError(f"unknown channel {claimed!r}")
            self.claimed, self.nc, self.ns = claimed, opening[6:], secrets.token_bytes(NONCE)
            reply = self.ns + _proof(self.key, b"server", claimed, self.nc, self.ns)
            return reply + self.feed(b"") if self.buf else reply
        if len(self.buf) < MAC:
            return b""
        if len(self.buf) > MAC:
            raise AuthError("sent more than its proof before being accepted")
        if not hmac.compare_digest(self.buf, _proof(self.key, b"client", self.claimed, self.nc, self.ns)):
            raise AuthError("authentication failed (wrong key)")
        self.channel = self.claimed
        return b""


def client_handshake(sock: socket.socket, key: bytes, channel: bytes) -> None:
    """The destination's side, on a blocking socket with a timeout: prove the source, then ourselves."""
    nc = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + bytes([VERSION]) + channel + nc)
    reply = _recv_exactly(sock, NONCE + MAC)
    ns, proof = reply[:NONCE], reply[NONCE:]
    if not hmac.compare_digest(proof, _proof(key, b"server", channel, nc, ns)):
        raise AuthError("the source failed authentication (wrong key, or not our source)")
    sock.sendall(_proof(key, b"client", channel, nc, ns))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AuthError("the source closed the connection during authentication")
        buf += chunk
    return buf


def warn(message: str) -> None:
    """One line on stderr for a refused peer: worth a look, never fatal to the run."""
    try:
        os.write(2, f"postcopy-harness: warning: {message}\n".encode())
    except OSError:
        pass
