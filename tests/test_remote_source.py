"""``postcopy-harness source --listen`` and ``run --source``: a source that is not forked by the run.

Both ends are real processes on loopback TCP with a key file; the run side is the CLI, so its
failures are checked as the one line a user sees.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import requires_uffd
from tests.listening_source import CLI, ListeningSource

pytestmark = [pytest.mark.kernel, requires_uffd]

def _key(path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def key(tmp_path):
    return _key(tmp_path / "key", b"0123456789abcdef0123456789abcdef")


Source = ListeningSource  # no arguments of its own: each test says what it serves


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", "--quiet", *args], capture_output=True, text=True, timeout=timeout)


def test_run_from_a_listening_source_completes(key, tmp_path, clean_machine):
    src = Source(key, "--ram", "4M", "--seed", "7")
    try:
        out = tmp_path / "r.json"
        r = run_cli("--vcpus", "2", "--ram", "4M", "--seed", "7", "--source", src.where, "--auth-key-file", key,
                    "--json", str(out))
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        v = rep["verification"]
        assert v["mismatches"] == 0 and v["ram-pages-verified"] == rep["pages"]["total"] == 1024
        assert rep["source"]["requests"] > 0  # the remote source answered this run's faults
        code, err = src.finish()
        assert code == 0, err
        assert "migrated 1024 pages" in err
    finally:
        src.stop()


def test_wrong_key_and_mismatched_ram_are_one_line_and_the_source_waits_on(key, tmp_path, clean_machine):
    src = Source(key, "--ram", "4M")
    try:
        wrong = _key(tmp_path / "wrong", b"fedcba9876543210fedcba9876543210")
        r = run_cli("--vcpus", "1", "--ram", "4M", "--source", src.where, "--auth-key-file", wrong)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "failed authentication" in r.stderr
        r = run_cli("--vcpus", "1", "--ram", "8M", "--source", src.where, "--auth-key-file", key)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "the source serves 4 MiB in 4096-byte pages, this run has 8 MiB" in r.stderr
        r = run_cli("--vcpus", "1", "--ram", "4M", "--seed", "2", "--source", src.where, "--auth-key-file", key)
        assert r.returncode == 1 and "--seed 1" in r.stderr and "--seed 2" in r.stderr, r.stderr
        assert src.p.poll() is None  # still serving: none of them got a page
        r = run_cli("--vcpus", "1", "--ram", "4M", "--source", src.where, "--auth-key-file", key)
        assert r.returncode == 0, r.stderr
        code, err = src.finish()
        assert code == 0, err
        assert "refused a page-channel connection" in err  # the wrong key, as the source saw it
    finally:
        src.stop()


@pytest.mark.parametrize("args, match", [
    (["--source", "127.0.0.1:1"], "--source needs --auth-key-file"),
    (["--source", ":7000", "--auth-key-file", "KEY"], "give the source's host"),
    (["--source", "127.0.0.1:1", "--auth-key-file", "KEY", "--link", "1gbit"], "the link model runs in the source"),
    (["--source", "127.0.0.1:1", "--auth-key-file", "KEY", "--link-mode", "netns"], "exclude each other"),
])
def test_run_source_bad_input_is_one_line(args, match, key):
    r = run_cli(*[key if a == "KEY" else a for a in args])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr


def test_source_needs_a_key_and_stops_on_ctrl_c(key, clean_machine):
    r = subprocess.run([*CLI, "source", "--listen", ":0", "--auth-key-file", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    src = Source(key, "--ram", "1M")
    try:
        src.p.send_signal(signal.SIGINT)
        code, err = src.finish()
        assert code == 130 and err.strip().splitlines()[-1] == "postcopy-harness source: interrupted", err
    finally:
        src.stop()


def test_an_image_is_served_and_checked(key, tmp_path, clean_machine):
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(range(256)) * 2048 + bytes(512 << 10))  # 512 KiB of data, 512 KiB of zero pages
    src = Source(key, "--image", str(image))
    try:
        r = run_cli("--vcpus", "1", "--ram", "1M", "--source", src.where, "--auth-key-file", key)
        assert r.returncode == 1 and "the source serves the image ram.img, this run expects generated" in r.stderr
        r = run_cli("--vcpus", "1", "--image", str(image), "--source", src.where, "--auth-key-file", key)
        assert r.returncode == 0, r.stderr
        code, err = src.finish()
        assert code == 0 and "migrated 256 pages" in err, err
    finally:
        src.stop()


def test_a_lost_remote_source_is_waited_for_and_resumes(key, tmp_path, clean_machine):
    """Postcopy recovery with a source the run did not fork: the source dies mid-run, the destination
    pauses, and a `source --listen` started again at the same address resumes it from the received map."""
    flags = ("--ram", "8M", "--link", "200mbit,1ms")
    src = Source(key, *flags)
    out = tmp_path / "r.json"
    run = subprocess.Popen([*CLI, "run", "--quiet", "--vcpus", "2", "--ram", "8M", "--workload", "sequential",
                            "--no-background", "--source", src.where, "--auth-key-file", key, "--json", str(out)],
                           stderr=subprocess.PIPE, text=True)
    again = None
    try:
        time.sleep(1.2)  # the workload is under way (about 2.5 s of demand paging over the 1 ms link)
        assert run.poll() is None
        src.stop()  # SIGKILL: the page channels and the control channel drop at once
        time.sleep(0.3)  # paused, retrying the address
        port = src.where.rsplit(":", 1)[1]
        again = subprocess.Popen([*CLI, "source", "--listen", f"127.0.0.1:{port}", "--auth-key-file", key, *flags],
                                 stderr=subprocess.PIPE, text=True)
        _, err = run.communicate(timeout=90)
        assert run.returncode == 0, err
        rep = json.loads(out.read_text())
        assert rep["verification"]["mismatches"] == 0 and rep["verification"]["ram-bad-pages"] == 0
        rec = rep["recovery"]
        assert (rec["pauses"], rec["resumes"]) == (1, 1), rec
        _, serr = again.communicate(timeout=30)
        assert again.returncode == 0, serr
        assert "migrated 2048 pages" in serr
    finally:
        for p in (run, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        src.stop()


def test_a_dropped_link_to_a_remote_source_resumes_with_the_same_source(key, tmp_path, clean_machine):
    """--inject link-drop cuts the page channels of a run --source: the source itself waits for the
    destination to come back, and the same `source --listen` process resumes it."""
    src = Source(key, "--ram", "8M", "--link", "200mbit,1ms")
    try:
        out = tmp_path / "r.json"
        r = run_cli("--vcpus", "2", "--ram", "8M", "--workload", "sequential", "--no-background", "--source",
                    src.where, "--auth-key-file", key, "--inject", "link-drop@0.5", "--json", str(out))
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["verification"]["mismatches"] == 0 and rep["verification"]["ram-bad-pages"] == 0
        assert (rep["recovery"]["pauses"], rep["recovery"]["resumes"]) == (1, 1), rep["recovery"]
        code, err = src.finish()
        assert code == 0, err
        assert "waiting for it to resume" in err and "1 resume(s)" in err
    finally:
        src.stop()


def _wait_migrating(src: Source, run: subprocess.Popen, timeout: float = 60) -> None:
    """Until the source holds its three channels (control, stream, urgent): it is migrating."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()
        conns = psutil.Process(src.p.pid).net_connections("tcp")
        if sum(c.status == psutil.CONN_ESTABLISHED for c in conns) >= 3:
            time.sleep(0.2)
            return
        time.sleep(0.02)
    raise AssertionError("the migration never started")


def test_strangers_on_a_listening_source_are_refused_at_once_and_counted(key, tmp_path, clean_machine):
    """The issue: 945 stderr lines in 40 s from hostile connections, and connections made during a
    migration waited in the listen queue.  Now each is refused at once (before and during the
    migration), and the source tells the first and counts the rest into one line."""
    from tests.test_trust import recv_all

    flags = ("--ram", "8M", "--link", "200mbit,1ms")
    src = Source(key, *flags)
    host, port = src.where.rsplit(":", 1)
    run = None
    try:
        for _ in range(100):  # before any destination: garbage, refused after its opening
            with socket.create_connection((host, int(port)), timeout=10) as s:
                try:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
                except OSError:
                    pass
                assert recv_all(s) == b""
        out = tmp_path / "r.json"
        run = subprocess.Popen([*CLI, "run", "--quiet", "--vcpus", "2", "--ram", "8M", "--workload", "sequential",
                                "--no-background", "--source", src.where, "--auth-key-file", key, "--json",
                                str(out)], stderr=subprocess.PIPE, text=True)
        _wait_migrating(src, run)  # mid-migration: about 2.5 s of demand paging over the 1 ms link
        t0 = time.monotonic()
        for _ in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                assert recv_all(s) == b""  # closed by the source, not left in its queue
        assert time.monotonic() - t0 < 5
        _, rerr = run.communicate(timeout=90)
        assert run.returncode == 0, rerr
        code, err = src.finish()
        assert code == 0, err
        lines = [line for line in err.splitlines() if "refused" in line]
        assert len(lines) == 2, err
        assert "refused a page-channel connection" in lines[0] and "not a postcopy-harness page channel" in lines[0]
        assert "refused 119 more page-channel connections" in lines[1] and "120 refused in all" in lines[1]
        assert "not a postcopy-harness page channel (bad opening): 99" in lines[1]
        assert "a migration is in progress: 20" in lines[1]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        src.stop()


def test_a_stalled_remote_source_is_cut_off_and_resumes_the_run_once_it_moves(key, tmp_path, clean_machine):
    """A `source --listen` stopped mid-migration is not the run's to kill: past --stall-timeout the run
    shuts its page channels down (postcopy-paused) and tries the address again; once the source moves
    (SIGCONT) it sees the channels gone, waits for the destination, and resumes it."""
    src = Source(key, "--ram", "8M", "--link", "200mbit,1ms")
    out = tmp_path / "r.json"
    run = subprocess.Popen([*CLI, "run", "--quiet", "--vcpus", "2", "--ram", "8M", "--workload", "sequential",
                            "--no-background", "--source", src.where, "--auth-key-file", key, "--stall-timeout", "4",
                            "--json", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_migrating(src, run)
        src.p.send_signal(signal.SIGSTOP)
        time.sleep(5.5)  # the stall is seen at 4 s; the run pauses and knocks on the stopped source
        src.p.send_signal(signal.SIGCONT)
        _, err = run.communicate(timeout=90)
        assert run.returncode == 0, err
        rep = json.loads(out.read_text())
        assert rep["verification"]["mismatches"] == 0 and rep["verification"]["ram-bad-pages"] == 0
        rec = rep["recovery"]
        assert (rec["pauses"], rec["resumes"]) == (1, 1), rec
        [stalled] = [e for e in rec["events"] if e["event"] == "source-stalled"]
        assert stalled["why"] == ("the source sent no page while vCPUs wait for 4 s (state: not a process of this "
                                  "run) (--stall-timeout)"), stalled
        code, serr = src.finish()
        assert code == 0, serr
        assert "waiting for it to resume" in serr and "1 resume(s)" in serr
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        src.p.send_signal(signal.SIGCONT)
        src.stop()
