"""Nothing unchecked gets in: each attack a local user could try on a run, tried for real.

TCP page channels: a stranger connecting first (silent, garbage, wrong key, replayed proof) gets no
page and the run completes.  The uffd hand-off socket: another uid, a process of the same uid that
is not a worker of the run, garbage and silent connections, hellos that do not fit the geometry and
a second registration of one vCPU are refused, never fatal; its name cannot be guessed, a squatted
one is retried under a new name, and once the workers are in it refuses every connection.  Refusals
are told once and counted, never one line each.  Shared memory: a squatted name changes nothing, a
clash is one line, and a SIGKILLed orchestrator leaves no /dev/shm entry.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import psutil
import pytest

from postcopy_core import auth, kernel
from postcopy_core.channel import CHANNEL_STREAM, CHANNEL_URGENT, tcp_accept_channels, tcp_connect, tcp_listener
from postcopy_core.handoff import HELLO, MAGIC, VERSION, Expected, HandoffError, WorkerHello, collect_uffds, send_uffd
from tests.conftest import requires_uffd
from tests.test_teardown import SLOW_RUN, finish, start_cli

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")


# ---------------------------------------------------------------- helpers


def fork_child(body) -> int:
    """Run ``body()`` in a child of this process; its return value is the exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish")


def recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (a reset, when it closed with our bytes unread, is a close)."""
    out = b""
    sock.settimeout(10)
    while len(out) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def wait_child(proc, name: str, count: int = 1, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name().startswith(name)]
        if len(kids) >= count:
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError(f"no {name} process appeared")


# ---------------------------------------------------------------- TCP page channels


def accept_in_thread(ls: socket.socket, key: bytes, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def body() -> None:
        try:
            out["channels"] = tcp_accept_channels(ls, key, **kw)
        except Exception as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def test_tcp_listener_binds_loopback_by_default():
    with tcp_listener() as ls:
        assert ls.getsockname()[0] == "127.0.0.1"


def test_strangers_first_get_no_page_and_the_real_destination_still_connects(capfd):
    key = auth.new_key()
    ls = tcp_listener()
    port = ls.getsockname()[1]
    t, out = accept_in_thread(ls, key, handshake_timeout=1.0)
    silent = socket.create_connection(("127.0.0.1", port))
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
    guesser = socket.create_connection(("127.0.0.1", port))
    guesser.sendall(auth.MAGIC + bytes([auth.VERSION]) + CHANNEL_STREAM + os.urandom(auth.NONCE))
    reply = b""
    while len(reply) < auth.NONCE + auth.MAC:
        reply += guesser.recv(64)
    guesser.sendall(os.urandom(auth.MAC))  # a guessed proof
    time.sleep(1.3)  # the silent one's handshake time runs out
    wrong_key = None
    with pytest.raises(auth.AuthError):  # a peer with another key cannot even prove the source to itself
        wrong_key = tcp_connect(port, CHANNEL_STREAM, auth.new_key())
    assert wrong_key is None
    stream = tcp_connect(port, CHANNEL_STREAM, key)
    urgent = tcp_connect(port, CHANNEL_URGENT, key)
    t.join(10)
    assert "channels" in out, out.get("error")
    s_src, u_src = out["channels"]
    s_src.setblocking(True)
    s_src.sendall(b"page data")
    stream.setblocking(True)
    assert stream.recv(64) == b"page data"
    for s in (garbage, guesser, silent):  # refused: nothing (the guesser: the challenge alone), then EOF
        assert recv_all(s) == b""
    err = capfd.readouterr().err
    assert "authentication failed (wrong key)" in err
    assert "not a postcopy-harness page channel" in err
    assert "no valid handshake in time" in err
    assert "closed the connection during the handshake" in err  # the one with another key
    # the first refusal in full, the three others counted into one line
    assert err.count("refused a page-channel connection") == 1
    assert err.count("refused 3 more page-channel connections") == 1 and "4 refused in all" in err
    assert len(err.strip().splitlines()) == 2, err
    for s in (silent, garbage, guesser, stream, urgent, s_src, u_src):
        s.close()


def test_a_second_connection_for_a_channel_is_refused(capfd):
    key = auth.new_key()
    ls = tcp_listener()
    port = ls.getsockname()[1]
    t, out = accept_in_thread(ls, key)
    first = tcp_connect(port, CHANNEL_STREAM, key)
    second = tcp_connect(port, CHANNEL_STREAM, key)  # proves the key, but the channel is taken
    assert recv_all(second) == b""
    urgent = tcp_connect(port, CHANNEL_URGENT, key)
    t.join(10)
    assert "channels" in out, out.get("error")
    assert "is connected already" in capfd.readouterr().err
    for s in (first, second, urgent, *out["channels"]):
        s.close()


def test_a_flood_of_silent_connections_does_not_lock_the_destination_out(capfd):
    from postcopy_core.channel import MAX_PENDING

    key = auth.new_key()
    ls = tcp_listener()
    port = ls.getsockname()[1]
    t, out = accept_in_thread(ls, key)
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_PENDING + 20)]
    time.sleep(0.3)  # all of them taken in
    stream = tcp_connect(port, CHANNEL_STREAM, key)
    urgent = tcp_connect(port, CHANNEL_URGENT, key)
    t.join(10)
    assert "channels" in out, out.get("error")
    assert "handshakes pending at once" in capfd.readouterr().err
    for s in (*flood, stream, urgent, *out["channels"]):
        s.close()


def test_a_replayed_proof_is_refused():
    """What one connection showed (opening and client proof) is worth nothing on the next one."""
    key = auth.new_key()
    nc = os.urandom(auth.NONCE)
    opening = auth.MAGIC + bytes([auth.VERSION]) + CHANNEL_STREAM + nc
    first = auth.ServerHandshake(key, (CHANNEL_STREAM,))
    ns = first.feed(opening)[: auth.NONCE]
    proof = auth._proof(key, b"client", CHANNEL_STREAM, nc, ns)
    first.feed(proof)
    assert first.channel == CHANNEL_STREAM
    replay = auth.ServerHandshake(key, (CHANNEL_STREAM,))
    replay.feed(opening)
    with pytest.raises(auth.AuthError, match="wrong key"):
        replay.feed(proof)
    assert replay.channel is None
    reflected = auth.ServerHandshake(key, (CHANNEL_STREAM,))  # the source's own proof sent back
    answer = reflected.feed(opening)
    with pytest.raises(auth.AuthError):
        reflected.feed(answer[auth.NONCE:])


def test_the_destination_refuses_a_fake_source():
    key = auth.new_key()
    fake = tcp_listener()

    def serve() -> None:
        conn, _ = fake.accept()
        conn.recv(auth.OPENING)
        conn.sendall(os.urandom(auth.NONCE + auth.MAC))
        conn.recv(64)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(auth.AuthError, match="the source failed authentication"):
        tcp_connect(fake.getsockname()[1], CHANNEL_STREAM, key, timeout=5)
    t.join(5)
    fake.close()


@pytest.mark.parametrize("content,mode,message", [
    (b"short\n", 0o600, "at least 16 bytes"),
    (b"k" * 32, 0o644, "readable or writable by others"),
    (b"k" * 5000, 0o600, "larger than 4096 bytes"),
])
def test_auth_key_file_errors_are_one_line(tmp_path, content, mode, message):
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(auth.AuthError, match=message):
        auth.key_from_file(str(path))
    with pytest.raises(auth.AuthError, match="not a regular file"):
        auth.key_from_file(str(tmp_path))
    with pytest.raises(auth.AuthError, match="No such file"):
        auth.key_from_file(str(tmp_path / "missing"))


def test_auth_key_file_gives_the_same_key_to_both_ends(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    path.chmod(0o600)
    assert auth.run_key(str(path)) == auth.run_key(str(path)) == b"0123456789abcdef0123456789abcdef"
    assert auth.run_key() != auth.run_key()  # without a file: a fresh key per run


def tcp_listen_port(pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                return c.laddr.port
        time.sleep(0.005)
    raise AssertionError("the source never listened")


@pytest.mark.kernel
@requires_uffd
def test_stranger_connecting_first_on_tcp_gets_no_page_and_the_run_completes(clean_machine):
    proc = start_cli(["run", "--vcpus", "16", "--ram", "16M", "--transport", "tcp", "--quiet"])
    [source] = wait_child(proc, "pch-source")
    port = tcp_listen_port(source.pid)
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    strangers[1].sendall(auth.MAGIC + bytes([auth.VERSION]) + CHANNEL_STREAM + os.urandom(auth.NONCE))
    challenge = b""
    while len(challenge) < auth.NONCE + auth.MAC:
        challenge += strangers[1].recv(64)  # the source answered: we were there before the destination
    strangers[1].sendall(os.urandom(auth.MAC))
    assert recv_all(strangers[1]) == b""  # refused: no page, not one byte more
    code, err = finish(proc)
    assert code == 0, err
    assert "refused a page-channel connection" in err and "authentication failed" in err
    assert recv_all(strangers[0]) == b""  # the silent one was dropped, it stalled nothing
    for s in strangers:
        s.close()


# ---------------------------------------------------------------- uffd hand-off

RAM = 1 << 20


@pytest.fixture
def handoff_run():
    """A listener, guest RAM and the expectations of a 2-vCPU run whose workers are our children."""
    address = f"\0test-trust-{os.getpid()}-{os.urandom(4).hex()}"  # children may hold it a moment longer
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(address)
    listener.listen(64)
    memfd = kernel.memfd_create("pch-guest-ram")
    os.ftruncate(memfd, RAM)
    expect = Expected.for_run(2, RAM, kernel.PAGE_SIZE, memfd, os.getpid())
    got: list = []
    yield address, listener, memfd, expect, got
    for _, fd in got:
        os.close(fd)
    listener.close()
    os.close(memfd)


def worker(address: str, memfd: int, vcpu: int, *, pid: int | None = None, base_shift: int = 0,
           length: int = RAM, fake_fd: bool = False, uid: int | None = None):
    """A child body that hands in a uffd like a vCPU worker, with one field bent as asked.

    Exit 0: accepted; 3: refused (EOF instead of the ack)."""

    def body() -> int:
        ram = kernel.mmap_fd(memfd, RAM)
        uffd = kernel.Uffd.open(kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM)
        uffd.register(ram.addr, RAM)
        fd = uffd.fd
        if fake_fd:
            fd, _ = os.pipe()
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)
        hello = WorkerHello(vcpu, os.getpid() if pid is None else pid, ram.addr + base_shift, length)
        try:
            send_uffd(address, hello, fd, timeout=10)
        except HandoffError:
            return 3
        return 0

    return body


def collect_in_thread(listener, expect, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def body() -> None:
        try:
            out["got"] = collect_uffds(listener, expect, **kw)
        except Exception as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict, got: list) -> list[WorkerHello]:
    t.join(30)
    assert not t.is_alive() and "got" in out, out.get("error")
    got += out["got"]
    return [h for h, _ in out["got"]]


def test_garbage_silent_and_strangers_do_not_stop_the_workers(handoff_run, capfd):
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=30, hello_timeout=1.0)
    stranger = socket.socket(socket.AF_UNIX)
    stranger.connect(address)  # same uid, but this process is no worker of the run

    def garbage() -> int:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
            s.sendall(b"\xff" * 7)
            return 3 if recv_all(s) == b"" else 0

    def silent() -> int:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
            return 3 if recv_all(s) == b"" else 0

    def grandchild_with_real_uffd() -> int:  # a process outside the run, with a well-formed hello
        return exit_code(fork_child(worker(address, memfd, 0)))

    kids = [fork_child(garbage), fork_child(silent), fork_child(grandchild_with_real_uffd)]
    assert [exit_code(p) for p in kids] == [3, 3, 3]  # all dropped while the collection goes on
    assert recv_all(stranger) == b""
    stranger.close()
    t0 = time.monotonic()
    workers = [fork_child(worker(address, memfd, v)) for v in (1, 0)]
    assert [h.vcpu for h in joined(t, out, got)] == [0, 1]
    assert time.monotonic() - t0 < 10
    assert sorted(h.pid for h, _ in got) == sorted(workers)
    assert [exit_code(p) for p in workers] == [0, 0]
    err = capfd.readouterr().err
    assert "expected a 32-byte hello with one fd, got 7 bytes and 0 fds" in err
    assert "not a vCPU worker of this run: 2" in err or "not a vCPU worker of this run (later" in err, err
    assert "no hello within 1 s" in err
    assert "refused 3 more uffd hand-offs" in err and "4 refused in all" in err  # counted, not listed


def test_a_second_registration_of_a_vcpu_is_refused(handoff_run, capfd):
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=30)
    first = fork_child(worker(address, memfd, 0))
    assert exit_code(first) == 0
    second = fork_child(worker(address, memfd, 0))
    assert exit_code(second) == 3
    other = fork_child(worker(address, memfd, 1))
    assert [(h.vcpu, h.pid) for h in joined(t, out, got)] == [(0, first), (1, other)]
    assert exit_code(other) == 0
    assert f"claims vCPU 0, registered already by pid {first}" in capfd.readouterr().err


@pytest.mark.parametrize("bend,message", [
    (dict(vcpu=2), "claims vCPU 2, the run has vCPUs 0..1"),
    (dict(vcpu=-1), "claims vCPU -1"),
    (dict(length=RAM // 2), f"claims {RAM // 2} bytes of RAM, the run has {RAM}"),
    (dict(base_shift=kernel.PAGE_SIZE), "does not map this run's guest RAM"),
    (dict(base_shift=1), "not a page-aligned address"),
    (dict(pid=1), "claims pid 1 but SO_PEERCRED says"),
    (dict(fake_fd=True), "sent an fd that is not a userfaultfd"),
])
def test_hello_fields_are_checked_against_the_run(handoff_run, capfd, bend, message):
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=30)
    vcpu = bend.pop("vcpu", 0)
    assert exit_code(fork_child(worker(address, memfd, vcpu, **bend))) == 3
    good = [fork_child(worker(address, memfd, v)) for v in (0, 1)]
    assert sorted(h.pid for h in joined(t, out, got)) == sorted(good)
    assert [exit_code(p) for p in good] == [0, 0]
    assert message in capfd.readouterr().err


@as_root
def test_another_uid_is_refused(handoff_run, capfd):
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=30)
    assert exit_code(fork_child(worker(address, memfd, 0, fake_fd=True, uid=NOBODY))) == 3
    good = [fork_child(worker(address, memfd, v)) for v in (0, 1)]
    assert sorted(h.pid for h in joined(t, out, got)) == sorted(good)
    assert [exit_code(p) for p in good] == [0, 0]
    assert f"runs as uid {NOBODY}, not 0" in capfd.readouterr().err


def test_collection_gives_up_in_one_line_when_workers_never_come(handoff_run):
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=3.0)
    assert exit_code(fork_child(worker(address, memfd, 1))) == 0
    t.join(10)
    assert isinstance(out.get("error"), HandoffError)
    assert "only 1 of 2 vCPU workers handed in their uffd within 3 s" in str(out["error"])


def handoff_sockets(pid: int) -> list[str]:
    """The hand-off socket names of the run whose orchestrator is ``pid`` (as /proc/net/unix shows them)."""
    with open("/proc/net/unix") as f:
        names = {line.split()[-1] for line in f if len(line.split()) >= 8}
    return sorted(n for n in names if n.startswith(f"@pch-{pid}-") and n.endswith("-uffd"))


def wait_handoff_socket(pid: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = handoff_sockets(pid)
        if names:
            return "\0" + names[0][1:]
        time.sleep(0.002)
    raise AssertionError("the hand-off socket never appeared")


@pytest.mark.kernel
@requires_uffd
def test_strangers_on_the_handoff_socket_of_a_real_run_change_nothing(clean_machine):
    """As the issue found it: garbage, a silent connection, another uid, a well-formed hello from a
    process outside the run.  Today each of them is dropped and the run completes."""
    intruders = []
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    if os.geteuid() == 0:
        # another uid, ready before the run starts: it connects the moment the socket exists (the
        # run's own workers hand in their uffds within milliseconds, then the socket is gone)
        def other_uid() -> int:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            address = os.read(go_r, 256).decode()
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(address)
                except ConnectionRefusedError:
                    return 4  # the run had every uffd already: the socket was gone, refused at once
                try:
                    socket.send_fds(s, [HELLO.pack(MAGIC, VERSION, 1, os.getpid(), 1 << 30, 16 << 20)], [w])
                except OSError:
                    pass  # refused before the hello went out: the kernel's word on who we are sufficed
                return 3 if recv_all(s) == b"" else 0

        intruders.append(fork_child(other_uid))
    proc = start_cli(["run", "--vcpus", "16", "--ram", "16M", "--quiet"])
    address = wait_handoff_socket(proc.pid)
    os.write(go_w, address.encode())
    silent = stranger_connect(address)
    garbage = stranger_connect(address, b"PCHW" + b"\0" * 100)
    forged = stranger_connect(address, HELLO.pack(MAGIC, VERSION, 0, os.getpid(), 1 << 30, 16 << 20), [r])
    code, err = finish(proc)
    assert code == 0, err
    codes = [exit_code(p) for p in intruders]
    assert set(codes) <= {3, 4}
    connected = [s for s in (silent, garbage, forged) if s is not None]
    assert connected, "every stranger came after the collection: nothing was tried"
    for s in connected:
        assert recv_all(s) == b""  # dropped, never acknowledged
        s.close()
    for fd in (r, w, go_r, go_w):
        os.close(fd)
    refused = len(connected) + codes.count(3)
    assert refused_in_all(err, "uffd hand-off") == refused, err
    assert err.count("refused a uffd hand-off") == (1 if refused else 0)  # the first in full, the rest counted
    if connected:
        assert "not a vCPU worker of this run" in err
    if codes.count(3):
        assert f"runs as uid {NOBODY}" in err


def stranger_connect(address: str, data: bytes = b"", fds: list[int] = ()) -> socket.socket | None:
    """Connect to ``address`` (and send ``data`` with ``fds``); None when refused at connect (the
    socket is gone).  Refused right after the connect, a send may meet a closed socket: fine too."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(address)
    except ConnectionRefusedError:
        s.close()
        return None
    try:
        if data:
            socket.send_fds(s, [data], list(fds))
    except OSError:
        pass
    return s


def refused_in_all(err: str, what: str) -> int:
    """How many connections a process said it refused: its count line, else its one refusal line."""
    m = re.findall(r"(\d+) refused in all", err)
    return int(m[-1]) if m else err.count(f"refused a {what}")


@pytest.mark.kernel
@requires_uffd
def test_handoff_socket_refuses_at_once_once_the_workers_are_in(clean_machine):
    """The issue: strangers' connections hung in the queue of the orchestrator's copy of the
    listener for the whole run.  Once every worker handed in its uffd no copy is left: refused."""
    proc = start_cli(SLOW_RUN)
    address = wait_handoff_socket(proc.pid)
    assert re.fullmatch(rf"\0pch-{proc.pid}-[0-9a-f]{{16}}-uffd", address), address  # unguessable
    wait_child(proc, "pch-vcpu", 4)
    deadline = time.monotonic() + 20
    while (s := stranger_connect(address)) is not None and time.monotonic() < deadline:  # still collecting
        s.close()
        time.sleep(0.01)
    assert s is None, "the hand-off socket still takes connections while the workload runs"
    assert handoff_sockets(proc.pid) == []
    assert proc.poll() is None  # mid-run
    os.killpg(proc.pid, signal.SIGINT)
    finish(proc)


class FixedSecrets:
    """Stands in for the secrets module inside postcopy_core.handoff: the names it hands out are
    known in advance (``first`` values, then the real random ones, or ``first`` forever)."""

    def __init__(self, first: list[str], forever: bool = False) -> None:
        self.first, self.forever = list(first), forever

    def token_hex(self, n: int) -> str:
        import secrets

        if self.first:
            return self.first[0] if self.forever else self.first.pop(0)
        return secrets.token_hex(n)


def squat(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(address)
    s.listen(1)
    return s


@pytest.mark.kernel
@requires_uffd
def test_squatted_handoff_names_do_not_stop_the_run(monkeypatch, capsys, clean_machine):
    """A local user binds the names a run would take (the old predictable one, and the first two
    fresh ones it will draw): the run takes the next fresh name and completes."""
    from harness import cli
    from postcopy_core import handoff

    me = os.getpid()
    drawn = ["0" * 16, "1" * 16]
    monkeypatch.setattr(handoff, "secrets", FixedSecrets(drawn))
    squatters = [squat(f"\0pch-{me}-uffd")] + [squat(f"\0pch-{me}-{t}-uffd") for t in drawn]
    try:
        code = cli.main(["run", "--vcpus", "2", "--ram", "4M", "--quiet"])
    finally:
        for s in squatters:
            s.close()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Address already in use" not in err


def test_a_taken_handoff_name_every_time_is_one_line_naming_it(monkeypatch, capsys, clean_machine):
    from harness import cli
    from postcopy_core import handoff

    name = f"pch-{os.getpid()}-{'2' * 16}-uffd"
    monkeypatch.setattr(handoff, "secrets", FixedSecrets(["2" * 16], forever=True))
    squatter = squat("\0" + name)
    try:
        code = cli.main(["run", "--vcpus", "1", "--ram", "1M", "--quiet"])
    finally:
        squatter.close()
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"@{name}: Address already in use" in err and "the vCPU hand-off socket" in err, err


def test_refusals_are_summed_up_at_most_once_an_interval(capfd):
    from postcopy_core.refusals import Refusals

    r = Refusals("test connection", summary_every_s=0.3)
    for i in range(50):
        r.refuse(f"peer {i}", "odd" if i % 10 else "even")
    time.sleep(0.35)
    r.refuse("peer 50", "late")  # the interval has passed: this one brings the summary
    r.refuse("peer 51", "later")
    r.flush()
    r.flush()  # nothing new: no line
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    assert "refused a test connection from peer 0: even" in lines[0]
    assert "refused 50 more test connections" in lines[1] and "odd: 45, even: 4, late: 1" in lines[1]
    assert "51 refused in all" in lines[1]
    assert "refused 1 more test connection in" in lines[2] and "52 refused in all" in lines[2]


def test_a_taken_tcp_address_is_one_line_naming_it():
    with tcp_listener() as first:
        port = first.getsockname()[1]
        with pytest.raises(OSError) as e:
            tcp_listener(port=port)
    assert str(e.value) == f"cannot listen on TCP 127.0.0.1:{port}: Address already in use"


def test_strangers_on_the_handoff_socket_are_counted_not_listed(handoff_run, capfd):
    """A flood of connections from a process that is no worker of the run: each refused at once
    (EOF before any byte), one warning line for the first and one count line, not one line each."""
    address, listener, memfd, expect, got = handoff_run
    t, out = collect_in_thread(listener, expect, timeout=30)
    t0 = time.monotonic()
    for _ in range(200):
        s = stranger_connect(address)
        assert recv_all(s) == b""
        s.close()
    assert time.monotonic() - t0 < 10  # refused at once, not after a hello timeout
    workers = [fork_child(worker(address, memfd, v)) for v in (0, 1)]
    assert sorted(h.pid for h in joined(t, out, got)) == sorted(workers)
    assert [exit_code(p) for p in workers] == [0, 0]
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "refused a uffd hand-off from pid" in lines[0] and "not a vCPU worker of this run" in lines[0]
    assert "refused 199 more uffd hand-offs" in lines[1] and "not a vCPU worker of this run: 199" in lines[1]
    assert "200 refused in all" in lines[1]


# ---------------------------------------------------------------- shared memory


def shm_entries(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"pch-{pid}-")]


def test_received_map_has_no_name_left_and_is_shared_over_fork():
    from postcopy_core.ramblock import ReceivedMap

    a, b = ReceivedMap(16), ReceivedMap(16)
    try:
        assert a.name != b.name and len(a.name) > len(f"/pch-{os.getpid()}-received") + 8
        assert shm_entries(os.getpid()) == []  # unlinked as soon as it was mapped

        def child() -> int:
            a.view[3] = 1
            return 0

        assert exit_code(fork_child(child)) == 0
        assert a[3] == 1 and b[3] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.kernel
@requires_uffd
def test_a_squatted_name_changes_nothing(clean_machine):
    """Another uid made the name a run used to take (``pch-<pid>-received``): the run never uses it."""
    from harness.config import RunConfig
    from harness.run import execute

    squat = f"/dev/shm/pch-{os.getpid()}-received"
    with open(squat, "wb") as f:
        f.write(b"\1" * 4096)  # "every page received": would have placed nothing and read zeros
    try:
        if os.geteuid() == 0:
            os.chown(squat, NOBODY, NOBODY)
        raw = execute(RunConfig(vcpus=2, ram=4 << 20, background=False).validate())
        assert raw["ram_check"].bad_pages == 0 and raw["handler"]["placed"] == (4 << 20) // kernel.PAGE_SIZE
        with open(squat, "rb") as f:
            assert f.read() == b"\1" * 4096  # untouched
    finally:
        os.unlink(squat)


def test_a_clash_on_the_name_is_one_line(monkeypatch, capsys, clean_machine):
    from harness import cli
    from postcopy_core import ramblock

    monkeypatch.setattr(ramblock.secrets, "token_hex", lambda n: "0" * (2 * n))
    name = f"/dev/shm/pch-{os.getpid()}-{'0' * 16}-received"
    with open(name, "wb"):
        pass
    try:
        code = cli.main(["run", "--vcpus", "1", "--ram", "1M", "--quiet"])
    finally:
        os.unlink(name)
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "already exists" in err and "Traceback" not in err, err


@pytest.mark.kernel
@requires_uffd
def test_sigkilled_orchestrator_leaves_no_dev_shm_entry(clean_machine):
    proc = start_cli(SLOW_RUN)
    kids = wait_child(proc, "pch-vcpu", 4)
    time.sleep(0.5)  # mid-run: the vCPUs fault
    assert shm_entries(proc.pid) == []  # gone while the run is live already
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.communicate(timeout=10)
    psutil.wait_procs(kids, timeout=10)  # they die with it (PDEATHSIG)
    assert shm_entries(proc.pid) == []  # no later run needed to sweep anything


# ---------------------------------------------------------------- run --auth-key-file


@pytest.mark.parametrize("extra,mode,message", [
    (["--transport", "tcp"], 0o644, "readable or writable by others (chmod 600 it)"),
    ([], 0o600, "--auth-key-file needs --transport tcp"),
])
def test_run_auth_key_file_errors_are_one_line(tmp_path, capsys, extra, mode, message):
    from harness import cli

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(mode)
    assert cli.main(["run", "--auth-key-file", str(key), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.kernel
@requires_uffd
def test_tcp_run_with_a_key_from_a_file(tmp_path, clean_machine):
    from harness.config import RunConfig
    from harness.report import build_report
    from harness.run import execute

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    cfg = RunConfig(vcpus=2, ram=4 << 20, transport="tcp", auth_key_file=str(key)).validate()
    rep = build_report(cfg, execute(cfg))
    assert rep["status"] == "completed", rep.get("error")
    assert rep["verification"]["ram-bad-pages"] == 0


def dead_pid() -> int:
    pid = fork_child(lambda: 0)
    exit_code(pid)
    return pid  # free until the kernel wraps around


@as_root
def test_the_sweep_leaves_other_users_files_alone_and_never_fails():
    """Names under our prefix for dead pids: a sweep removes only its own user's, and one that
    could not remove another's (sticky /dev/shm) does not fail on it."""
    from postcopy_core.ramblock import sweep_stale_segments

    roots = f"/dev/shm/pch-{dead_pid()}-received"
    theirs = f"/dev/shm/pch-{dead_pid()}-received"
    for path, owner in ((roots, 0), (theirs, NOBODY)):
        with open(path, "wb"):
            pass
        os.chown(path, owner, owner)
    try:
        def unprivileged() -> int:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.unlink(theirs)  # its own: gone; root's next to it must not make the sweep fail
            sweep_stale_segments()
            return 0

        assert exit_code(fork_child(unprivileged)) == 0
        assert os.path.exists(roots)
        with open(theirs, "wb"):
            pass
        os.chown(theirs, NOBODY, NOBODY)
        swept = sweep_stale_segments()
        assert os.path.basename(roots) in swept and not os.path.exists(roots)
        assert os.path.basename(theirs) not in swept and os.path.exists(theirs)
    finally:
        for path in (roots, theirs):
            if os.path.exists(path):
                os.unlink(path)
