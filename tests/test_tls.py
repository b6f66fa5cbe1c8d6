"""``--tls-creds``: migrations between ``source --listen`` and ``run --source`` over TLS.

Real processes on loopback with a throw-away CA made for the test (bench/tls_cost.py's
``make_creds``, the ``openssl`` command): a migration that completes and verifies every page over
TLS, peers without TLS or with another CA's certificates refused (and the source serving the real
destination afterwards), credentials that others own or may read refused in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from postcopy_core import tls
from tests.conftest import requires_uffd
from tests.listening_source import CLI, ListeningSource

REPO = Path(__file__).resolve().parent.parent
KEY = b"0123456789abcdef0123456789abcdef"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="making certificates needs openssl")


def _bench():
    spec = importlib.util.spec_from_file_location("tls_cost", REPO / "bench" / "tls_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("making certificates needs openssl")
    return _bench().make_creds(tmp_path_factory.mktemp("tls") / "creds")


@pytest.fixture(scope="module")
def other_creds(tmp_path_factory) -> Path:
    """Another CA's, which the first trusts in no way."""
    if shutil.which("openssl") is None:
        pytest.skip("making certificates needs openssl")
    return _bench().make_creds(tmp_path_factory.mktemp("tls") / "other", ca_name="someone-else-ca")


@pytest.fixture
def key(tmp_path) -> str:
    path = tmp_path / "key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return str(path)


class Source(ListeningSource):
    """A listening source of 8 MiB, the size every run here asks for."""

    def __init__(self, key: str, *args: str) -> None:
        super().__init__(key, "--ram", "8M", *args)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", "--ram", "8M", "--vcpus", "2", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.kernel
@requires_uffd
def test_migration_over_tls_completes_and_verifies(tmp_path, creds, key, clean_machine):
    src = Source(key, "--tls-creds", str(creds))
    try:
        out = tmp_path / "r.json"
        p = run_cli("--source", src.where, "--auth-key-file", key, "--tls-creds", str(creds), "--json", str(out))
        code, err = src.finish()
    finally:
        src.stop()
    assert p.returncode == 0, p.stderr
    assert "(TLS)" in src.listening
    rep = json.loads(out.read_text())
    v = rep["verification"]
    assert rep["status"] == "completed" and v["ram-pages-verified"] == 2048 and v["ram-bad-pages"] == 0
    assert v["mismatches"] == 0 and v["pages-checked"] > 0
    assert code == 0 and "migrated 2048 pages" in err and "refused" not in err


@pytest.mark.kernel
@requires_uffd
def test_plaintext_and_foreign_peers_are_refused_and_the_source_keeps_serving(tmp_path, creds, other_creds, key,
                                                                              clean_machine):
    # a destination whose certificate comes from another CA, but which trusts ours
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(creds / tls.CA_CERT, mixed / tls.CA_CERT)
    for name in (tls.CLIENT_CERT, tls.CLIENT_KEY):
        shutil.copy(other_creds / name, mixed / name)
    for f in mixed.iterdir():
        f.chmod(0o600)
    src = Source(key, "--tls-creds", str(creds))
    try:
        plain = run_cli("--source", src.where, "--auth-key-file", key, timeout=60)
        assert plain.returncode == 1
        assert "--tls-creds takes only TLS" in _one_error_line(plain)
        # it trusts another CA: our source's certificate does not check
        wrong_ca = run_cli("--source", src.where, "--auth-key-file", key, "--tls-creds", str(other_creds), timeout=60)
        assert wrong_ca.returncode == 1
        assert "certificate does not check" in _one_error_line(wrong_ca)
        # its own certificate is from another CA: the source refuses it
        foreign = run_cli("--source", src.where, "--auth-key-file", key, "--tls-creds", str(mixed), timeout=60)
        assert foreign.returncode == 1
        assert "refused this destination" in _one_error_line(foreign)
        # a raw TCP peer that speaks the page protocol in clear gets nothing and changes nothing
        host, port = src.where.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"PCHA\x01C" + bytes(32))
            s.settimeout(10)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        ok = run_cli("--source", src.where, "--auth-key-file", key, "--tls-creds", str(creds))
        code, err = src.finish()
    finally:
        src.stop()
    assert ok.returncode == 0, ok.stderr
    assert code == 0 and "migrated 2048 pages" in err
    # the first refusal is told in full, the rest are counted into one line (postcopy_core/refusals.py)
    first = [ln for ln in err.splitlines() if "refused a page-channel connection" in ln]
    assert len(first) == 1 and "TLS handshake failed" in first[0], err
    m = re.search(r"; (\d+) refused in all", err)
    assert m and int(m.group(1)) >= 3 and err.count("TLS handshake failed") >= 3, err


@pytest.mark.parametrize("problem", ["group-readable", "world-readable", "owned-by-another", "symlink", "missing"])
@pytest.mark.parametrize("name", [tls.CA_CERT, tls.SERVER_KEY, tls.SERVER_CERT])
def test_credentials_others_could_read_or_own_are_refused_in_one_line(tmp_path, creds, key, problem, name):
    d = tmp_path / "c"
    shutil.copytree(creds, d)
    f = d / name
    if problem == "group-readable":
        f.chmod(0o640)
    elif problem == "world-readable":
        f.chmod(0o604)
    elif problem == "owned-by-another":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(f, 65534, 65534)
    elif problem == "symlink":
        f.rename(d / "real.pem")
        f.symlink_to(d / "real.pem")
    else:
        f.unlink()
    with pytest.raises(tls.TlsError) as e:
        tls.server_context(str(d))
    assert name in str(e.value) and "\n" not in str(e.value)
    p = subprocess.run([*CLI, "source", "--listen", "127.0.0.1:0", "--auth-key-file", key, "--tls-creds", str(d)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    line = _one_error_line(p)
    assert line.startswith("postcopy-harness source: --tls-creds ") and name in line
    assert {"group-readable": "chmod 600", "world-readable": "chmod 600", "owned-by-another": "owned by uid 65534",
            "symlink": "symbolic links", "missing": "No such file"}[problem] in line


def test_run_checks_its_credentials_before_anything_runs(tmp_path, creds, key):
    d = tmp_path / "c"
    shutil.copytree(creds, d)
    (d / tls.CLIENT_KEY).chmod(0o644)
    p = run_cli("--source", "127.0.0.1:1", "--auth-key-file", key, "--tls-creds", str(d), timeout=60)
    assert p.returncode == 2 and "client-key.pem" in _one_error_line(p) and "chmod 600" in p.stderr
    p = run_cli("--tls-creds", str(creds), timeout=60)  # a forked source is on this machine: no TLS for it
    assert p.returncode == 2 and "--tls-creds is for --source" in _one_error_line(p)
    (d / tls.CLIENT_KEY).chmod(0o600)
    (d / tls.CLIENT_KEY).write_text("not a key\n")
    with pytest.raises(tls.TlsError, match="not a usable certificate and key"):
        tls.client_context(str(d))


def test_tunnel_carries_both_ways_and_passes_the_end_on(creds):
    """The relay between a TLS socket and the C lanes' plain socket: bytes both ways, EOF both ways."""
    server, client = tls.server_context(str(creds)), tls.client_context(str(creds))
    ls = socket.create_server(("127.0.0.1", 0))
    with ls:
        c = socket.create_connection(ls.getsockname(), timeout=10)
        s, _ = ls.accept()
    s.settimeout(10)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("s", server.wrap_socket(s, server_side=True)))
    t.start()
    tc = tls.client_wrap(client, c, "127.0.0.1")
    t.join(10)
    ts = done["s"]
    plain = tls.tunnel(ts, "test")
    plain.settimeout(10)
    big = os.urandom(3 << 20)  # more than the relay's backlog: back-pressure on the way
    sender = threading.Thread(target=tc.sendall, args=(big,))
    sender.start()
    got = bytearray()
    while len(got) < len(big):
        got += plain.recv(1 << 20)
    sender.join(10)
    assert bytes(got) == big
    plain.sendall(b"answer")
    assert tc.recv(100) == b"answer"
    tc.close()  # the network side ends: the C side reads its end of stream
    assert plain.recv(100) == b""
    plain.close()


@needs_openssl
@pytest.mark.kernel
@requires_uffd
def test_bench_tls_cost_runs_tiny(tmp_path, clean_machine):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "tls_cost.py"), "--ram", "8M", "--repeat", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "TLS / plain postcopy time" in p.stdout and "reproduce: python bench/tls_cost.py" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["median"]["tls"]["postcopy-s"] > 0 and doc["median"]["plain"]["postcopy-s"] > 0


@pytest.mark.kernel
@requires_uffd
def test_a_dropped_tls_link_resumes_with_the_same_source(tmp_path, creds, key, clean_machine):
    """Postcopy recovery over TLS: --inject link-drop cuts the destination's page channels (the plain
    ends of its relays); the relays pass the end on, the same source waits, and the run resumes through
    new TLS sessions, every page verified."""
    src = Source(key, "--link", "200mbit,1ms", "--tls-creds", str(creds))
    try:
        out = tmp_path / "r.json"
        r = run_cli("--workload", "sequential", "--no-background", "--source", src.where, "--auth-key-file", key,
                    "--tls-creds", str(creds), "--inject", "link-drop@0.5", "--json", str(out))
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["verification"]["mismatches"] == 0 and rep["verification"]["ram-bad-pages"] == 0
        assert (rep["recovery"]["pauses"], rep["recovery"]["resumes"]) == (1, 1), rep["recovery"]
        code, err = src.finish()
        assert code == 0, err
        assert "waiting for it to resume" in err and "1 resume(s)" in err
    finally:
        src.stop()


def _tls_pair_through(creds: Path, middle) -> tuple:
    """(client TLS socket, server TLS socket) connected through ``middle(client_side, server_side)``,
    a function run in a thread that carries the bytes between the two TCP connections."""
    server, client = tls.server_context(str(creds)), tls.client_context(str(creds))
    front, back = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    with front, back:
        c = socket.create_connection(front.getsockname(), timeout=10)
        c_side, _ = front.accept()
        s_out = socket.create_connection(back.getsockname(), timeout=10)
        s, _ = back.accept()
    threading.Thread(target=middle, args=(c_side, s_out), daemon=True).start()
    s.settimeout(10)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("s", server.wrap_socket(s, server_side=True)))
    t.start()
    tc = tls.client_wrap(client, c, "127.0.0.1")
    t.join(10)
    return tc, done["s"]


def test_a_tampered_record_ends_the_channel_and_never_reaches_the_c_side(creds):
    """Someone on the path flips one bit of the page stream: the relay passes on only what checked
    (a prefix of what was sent) and then the end of the channel, never the forged bytes."""
    sent = os.urandom(1 << 20)
    flipped = {}

    def flip_one_bit(a: socket.socket, b: socket.socket) -> None:
        total = 0
        threading.Thread(target=lambda: _pipe(b, a), daemon=True).start()  # the way back, untouched
        try:
            while chunk := a.recv(65536):
                chunk = bytearray(chunk)
                if total < 200_000 <= total + len(chunk) and "at" not in flipped:  # well after the handshake
                    flipped["at"] = total
                    chunk[200_000 - total] ^= 0x10
                total += len(chunk)
                b.sendall(chunk)
        except OSError:
            pass  # the receiver dropped the connection at the forged record: as it should
        finally:
            a.close()
            b.close()

    tc, ts = _tls_pair_through(creds, flip_one_bit)
    plain = tls.tunnel(ts, "tampered")
    plain.settimeout(10)
    threading.Thread(target=lambda: _send_quietly(tc, sent), daemon=True).start()
    got = bytearray()
    while chunk := plain.recv(1 << 20):
        got += chunk
    assert "at" in flipped
    assert len(got) < len(sent) and bytes(got) == sent[: len(got)]  # what came is what was sent, then EOF
    tc.close()
    plain.close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while chunk := a.recv(65536):
            b.sendall(chunk)
    except OSError:
        pass


def _send_quietly(s, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass


@pytest.mark.kernel
@requires_uffd
def test_huge_pages_over_tls(tmp_path, creds, key, hugepages, clean_machine):
    """2 MiB pages: the source's splice path writes into the relay's socket pair (or copies when it
    cannot), the destination receives whole huge pages through its relay."""
    with open("/proc/sys/vm/nr_hugepages") as f:
        hugepages(int(f.read()) + 4)
    src = Source(key, "--backing", "hugetlb", "--tls-creds", str(creds))
    try:
        out = tmp_path / "r.json"
        p = run_cli("--backing", "hugetlb", "--source", src.where, "--auth-key-file", key, "--tls-creds", str(creds),
                    "--json", str(out))
        code, err = src.finish()
    finally:
        src.stop()
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert rep["status"] == "completed" and rep["page-size"] == 2 << 20
    assert rep["verification"]["ram-pages-verified"] == 4 and rep["verification"]["ram-bad-pages"] == 0
    assert code == 0 and "migrated 4 pages" in err
