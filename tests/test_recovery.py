"""Postcopy recovery: a lost source or a dropped link pauses the destination, a new source resumes it.

Real runs of the CLI (real processes, userfaultfd, sockets) in their own session.  Every vCPU
worker checks every byte it reads, so a zero page or a stale page placed across a pause fails the
run (exit 1), and the handler checks all of RAM at the end; the tests also check the report's
``recovery`` section and that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from postcopy_core.protocol import encode_received
from tests.conftest import HUGEPAGES, requires_uffd
from tests.test_teardown import assert_clean, finish, start_cli, wait_for_children

pytestmark = [pytest.mark.kernel, requires_uffd]

# every page is requested over a 1 ms link, 1024 pages per vCPU: about 2.5 s of workload, so
# injections at 0.3-0.8 s land mid-run with every vCPU waiting for pages
DEMAND = ["run", "--vcpus", "2", "--ram", "8M", "--workload", "sequential", "--no-background",
          "--link", "200mbit,1ms", "--quiet"]


def _run(tmp_path, *inject: str, base=DEMAND, extra: tuple[str, ...] = (), timeout: float = 90
         ) -> tuple[int, str, dict]:
    out = tmp_path / "r.json"
    args = [*base, "--json", str(out), *extra]
    for text in inject:
        args += ["--inject", text]
    code, err = finish(start_cli(args), timeout)
    assert out.exists(), err  # a run refused up front writes no report
    return code, err, json.loads(out.read_text())


def _assert_complete(code: int, err: str, rep: dict) -> None:
    """Completed, every page placed once and verified, no word read wrong."""
    assert code == 0, err
    assert rep["status"] == "completed" and rep["error"] is None
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0 and v["ram-pages-verified"] == rep["pages"]["total"]
    assert rep["pages"]["placed"] == rep["pages"]["total"]
    assert v["pages-checked"] >= rep["pages"]["total"]  # sequential slices: every page read by a vCPU
    assert "Traceback" not in err


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_source_crash_pauses_and_resumes(tmp_path, transport, clean_machine):
    code, err, rep = _run(tmp_path, "source-crash@0.3", extra=("--transport", transport))
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (1, 1, 1)
    assert 0 < rec["paused-s"] < 10
    [inj] = rec["injected"]
    assert inj["kind"] == "source-crash" and inj["fired-at-s"] >= 0.3
    assert inj["outcome"].startswith("killed; the destination paused (postcopy-paused) and resumed with a new source")
    assert [e["event"] for e in rec["events"] if e["event"] in ("paused", "resumed")] == ["paused", "resumed"]
    assert_clean()


def test_two_source_crashes_in_a_row(tmp_path, clean_machine):
    code, err, rep = _run(tmp_path, "source-crash@0.3", "source-crash@0.8")
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (2, 2, 2)
    first, second = rec["injected"]
    assert first["pid"] != second["pid"]  # the second crash killed the replacement
    assert all("resumed with a new source" in i["outcome"] for i in rec["injected"])
    assert_clean()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_link_drop_pauses_and_resumes(tmp_path, transport, clean_machine):
    code, err, rep = _run(tmp_path, "link-drop@0.3", extra=("--transport", transport))
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"]) == (1, 1)
    [inj] = rec["injected"]
    assert inj["outcome"].startswith("both page channels shut down; the destination paused")
    # the old source, cut off, was replaced (not left running); under load it may see its own EOF
    # and end first, which the log says as it is
    lost = [e["cause"] for e in rec["events"] if e["event"] == "source-lost"]
    assert lost and (lost[0].endswith("(replaced: its destination had paused)")
                     or lost[0].endswith("exited with status 0")), lost
    assert_clean()


def test_crash_during_recovery(tmp_path, clean_machine):
    """The first replacement source is killed as it starts, before the resume completes: the
    destination stays paused and the next one resumes it."""
    code, err, rep = _run(tmp_path, "source-crash@0.3", "recovery-crash@0.3")
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (1, 1, 2)
    crash, during = rec["injected"]
    assert during["kind"] == "recovery-crash" and during["pid"] not in (None, crash["pid"])
    assert during["outcome"] == "killed the replacement source as it started, before the resume completed"
    started = [e["pid"] for e in rec["events"] if e["event"] == "source-started"]
    assert started[0] == during["pid"] and len(started) == 2
    assert_clean()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_stopped_source_is_replaced_and_the_run_completes(tmp_path, transport, clean_machine):
    """The issue: a source stopped from outside (SIGSTOP: its sockets stay open, the destination sees
    no EOF) failed the run after --stall-timeout, where a killed one is replaced.  Now it is treated
    like a lost one: killed and reaped, the destination pauses, a new source resumes it."""
    out = tmp_path / "r.json"
    proc = start_cli([*DEMAND, "--stall-timeout", "1.5", "--transport", transport, "--json", str(out)])
    wait_for_children(proc, "pch-vcpu", 2)  # and the workload has begun
    [source] = [c for c in psutil.Process(proc.pid).children() if c.name() == "pch-source"]
    t0 = time.monotonic()
    source.send_signal(signal.SIGSTOP)
    code, err = finish(proc, 90)
    rep = json.loads(out.read_text())
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (1, 1, 1), rec
    [stalled] = [e for e in rec["events"] if e["event"] == "source-stalled"]
    assert stalled["why"] == f"the source (pid {source.pid}) made no progress for 1.5 s (state: stopped) " \
                             "(--stall-timeout)", stalled
    [lost] = [e["cause"] for e in rec["events"] if e["event"] == "source-lost"]
    assert lost.startswith(f"the source (pid {source.pid}) was killed by SIGKILL (replaced: the source"), lost
    started = [e["pid"] for e in rec["events"] if e["event"] == "source-started"]
    assert len(started) == 1 and started[0] != source.pid
    assert stalled["at-s"] < [e["at-s"] for e in rec["events"] if e["event"] == "resumed"][0]
    assert time.monotonic() - t0 < 60
    assert not psutil.pid_exists(source.pid)  # killed and reaped: no stopped process, no zombie
    assert_clean()


class Freezer:
    """A cgroup (v1 freezer) of its own for one process: frozen, it sits in the kernel with its
    sockets open (``disk-sleep``), deaf even to SIGKILL until thawed: a hung process, not a stopped one."""

    ROOT = "/sys/fs/cgroup/freezer"

    def __init__(self) -> None:
        self.path = os.path.join(self.ROOT, f"pch-test-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(self.path)

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def freeze(self, pid: int) -> None:
        self._write("tasks", str(pid))
        self._write("freezer.state", "FROZEN")

    def thaw(self) -> None:
        self._write("freezer.state", "THAWED")

    def remove(self) -> None:
        self.thaw()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its process dies of the SIGKILL it was sent, then the group is empty
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.path} still holds a process")


@pytest.fixture
def freezer():
    if os.geteuid() != 0 or not os.path.isfile(os.path.join(Freezer.ROOT, "tasks")):
        pytest.skip("needs root and the cgroup v1 freezer")
    try:
        fz = Freezer()
    except OSError as e:
        pytest.skip(f"cannot make a freezer cgroup: {e.strerror}")
    yield fz
    fz.remove()


def test_hung_source_is_replaced_and_the_run_completes(tmp_path, freezer, clean_machine):
    """A source hung with its sockets open (frozen in the kernel, so even SIGKILL waits): after
    --stall-timeout the destination's page channels are shut down and a new source resumes the run;
    the hung one dies of its pending SIGKILL once it thaws, and is reaped."""
    out = tmp_path / "r.json"
    proc = start_cli([*DEMAND, "--stall-timeout", "1.5", "--json", str(out)])
    wait_for_children(proc, "pch-vcpu", 2)  # and the workload has begun
    [source] = [c for c in psutil.Process(proc.pid).children() if c.name() == "pch-source"]
    freezer.freeze(source.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:  # until the replacement is up
        kids = psutil.Process(proc.pid).children()
        if any(k.pid != source.pid and k.name() == "pch-source" for k in kids):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    freezer.thaw()
    code, err = finish(proc, 90)
    rep = json.loads(out.read_text())
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (1, 1, 1), rec
    [stalled] = [e for e in rec["events"] if e["event"] == "source-stalled"]
    assert f"the source (pid {source.pid}) sent no page while vCPUs wait for 1.5 s (state: disk-sleep)" \
        in stalled["why"], stalled
    lost = [e["cause"] for e in rec["events"] if e["event"] == "source-lost"]
    assert lost == [f"the source (pid {source.pid}) was killed by SIGKILL (replaced: {stalled['why']})"], lost
    assert not psutil.pid_exists(source.pid)
    assert_clean()


def test_hung_handler_is_named_not_blamed_on_the_source(tmp_path, freezer, clean_machine):
    """A handler hung in the kernel looks, from outside, like a source that sends nothing: the source is
    cut off first, and when the destination does not pause after that, the run fails naming the handler."""
    proc = start_cli([*DEMAND, "--stall-timeout", "1.5"])
    wait_for_children(proc, "pch-vcpu", 2)
    [handler] = [c for c in psutil.Process(proc.pid).children() if c.name() == "pch-fault"]
    freezer.freeze(handler.pid)
    time.sleep(6)  # two stall timeouts and some: the run has failed and waits to reap the frozen handler
    freezer.thaw()
    code, err = finish(proc, 60)
    assert code == 1, err
    assert f"the fault handler (pid {handler.pid}) did not pause when its source was cut off (state: disk-sleep); " \
           "before: the source (pid" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert_clean()


def test_injected_source_stall_past_the_stall_timeout_is_replaced(tmp_path, clean_machine):
    code, err, rep = _run(tmp_path, "source-stall@0.3:30", extra=("--stall-timeout", "1.5"))
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["source-restarts"]) == (1, 1, 1), rec
    [inj] = rec["injected"]
    assert inj["outcome"] == "stopped; past --stall-timeout it was killed and replaced by a new source", inj
    assert not psutil.pid_exists(inj["pid"])
    assert_clean()


def test_blocktime_counts_across_the_pause(tmp_path, clean_machine):
    """The source stays down 1 s: each vCPU is blocked on one page across the whole pause, and
    both the handler-side oracle (exact) and the vCPUs' own clocks (truth) show a fault that
    long (the log2 latency histogram's buckets from 2^19 us = 0.52 s up) and that much blocktime."""
    code, err, rep = _run(tmp_path, "source-crash@0.5:1")
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert rec["pauses"] == 1 and rec["paused-s"] >= 1.0
    for name in ("exact", "truth"):
        eng = rep["engines"][name]
        long_faults = sum(eng["postcopy-latency-dist"][19:])
        assert long_faults >= rep["vcpus"], (name, eng["postcopy-latency-dist"])
        assert all(ms >= 1000 for ms in eng["postcopy-vcpu-blocktime"]), (name, eng)
        assert eng["postcopy-blocktime"] >= 1000, (name, eng)  # every vCPU blocked at once, all through
    assert rep["latency-us"]["max"] >= 1e6
    assert_clean()


def test_source_killed_from_outside_is_survived(tmp_path, clean_machine):
    """No --inject: SIGKILL of pch-source with the background stream on a modelled link."""
    out = tmp_path / "r.json"
    proc = start_cli(["run", "--vcpus", "2", "--ram", "64M", "--link", "100mbit,1ms", "--json", str(out), "--quiet"])
    wait_for_children(proc, "pch-vcpu", 2)
    [victim] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "pch-source"]
    victim.kill()
    code, err = finish(proc, 90)
    rep = json.loads(out.read_text())
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert rec["injected"] == [] and (rec["pauses"], rec["resumes"]) == (1, 1)
    causes = [e["cause"] for e in rec["events"] if e["event"] == "source-lost"]
    assert causes and causes[0].startswith(f"the source (pid {victim.pid}) was killed by SIGKILL"), causes
    assert rep["pages"]["background"] > 0  # the new source streamed the rest...
    # ...and only the rest: the pages the destination held when it paused were not sent again
    [paused] = [e for e in rec["events"] if e["event"] == "paused"]
    missing = rep["pages"]["total"] - paused["pages-placed"]
    assert paused["pages-placed"] > 0
    assert rep["source"]["bytes-sent"] < missing * rep["page-size"] * 1.05 + (1 << 20), (missing, rep["source"])
    assert_clean()


def test_recovery_on_an_unlimited_link(tmp_path, clean_machine):
    """The C lanes (no --link): a crash and a link drop during demand paging at full speed (128M: at
    full speed 64M was over before the drop at 0.3 s)."""
    base = ["run", "--vcpus", "2", "--ram", "128M", "--workload", "sequential", "--no-background", "--quiet"]
    code, err, rep = _run(tmp_path, "source-crash@0.1", "link-drop@0.3", base=base)
    _assert_complete(code, err, rep)
    rec = rep["recovery"]
    assert [i["fired-at-s"] is not None for i in rec["injected"]] == [True, True]
    assert rec["pauses"] >= 1 and rec["resumes"] == rec["pauses"]
    assert_clean()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_recovery_with_the_stream_on_a_1gbit_link(tmp_path, transport, clean_machine):
    """Background stream and faults on --link 1gbit,1ms: a crash, then a link drop, mid-stream."""
    base = ["run", "--vcpus", "2", "--ram", "64M", "--link", "1gbit,1ms", "--quiet"]
    code, err, rep = _run(tmp_path, "source-crash@0.2", "link-drop@0.4", base=base, extra=("--transport", transport))
    assert code == 0 and rep["status"] == "completed", err
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0 and rep["pages"]["placed"] == rep["pages"]["total"]
    rec = rep["recovery"]
    assert [i["fired-at-s"] is not None for i in rec["injected"]] == [True, True]
    assert rec["pauses"] >= 1 and rec["resumes"] == rec["pauses"]
    assert rep["pages"]["background"] > 0 and rep["pages"]["requested"] > 0
    assert_clean()


def test_source_that_never_comes_back_fails_in_one_line(tmp_path, clean_machine):
    """Every replacement killed as it starts: after the restart limit the run fails, naming why."""
    t0 = time.monotonic()
    code, err, rep = _run(tmp_path, "source-crash@0.3", *["recovery-crash@0.3"] * 4)
    assert code == 1 and rep["status"] == "failed"
    line = err.strip().splitlines()[-1]
    assert "the source could not be restarted: 4 new sources in a row were lost before the destination " \
           "resumed (last: the source (pid" in line and "killed by SIGKILL" in line, err
    assert time.monotonic() - t0 < 30
    assert rep["recovery"]["pauses"] == 1 and rep["recovery"]["resumes"] == 0
    assert "Traceback" not in err
    assert_clean()


def test_pause_longer_than_the_stall_timeout_fails_named(tmp_path, clean_machine):
    """The source stays down longer than --stall-timeout: failed when the timeout passes, not later."""
    t0 = time.monotonic()
    code, err, rep = _run(tmp_path, "source-crash@0.3:30", extra=("--stall-timeout", "2"))
    assert code == 1
    assert "the destination stayed postcopy-paused for 2 s: no new source resumed it (last: the source" in err, err
    assert time.monotonic() - t0 < 20
    assert rep["recovery"]["paused-s"] >= 2
    assert_clean()


def test_recovery_on_hugetlbfs(tmp_path, hugepages, clean_machine):
    with open(HUGEPAGES) as f:
        hugepages(int(f.read()) + 16)  # on top of what others on the machine hold
    base = ["run", "--vcpus", "2", "--ram", "32M", "--backing", "hugetlb", "--workload", "sequential",
            "--no-background", "--link", "100mbit,1ms", "--quiet"]
    code, err = finish(start_cli([*base, "--json", str(tmp_path / "r.json"), "--inject", "source-crash@0.2"]), 90)
    if code == 1 and "free huge pages" in err:
        pytest.skip(f"another process took the huge pages: {err.strip()}")
    rep = json.loads((tmp_path / "r.json").read_text())
    _assert_complete(code, err, rep)
    assert (rep["recovery"]["pauses"], rep["recovery"]["resumes"]) == (1, 1)
    assert_clean()


# ---------------------------------------------------------------- the resume messages, C and Python


def test_reconnect_drops_the_half_frame_and_sends_the_received_map():
    """The C loop on real sockets: the old source dies in the middle of a frame; pch_dest_reconnect
    drops the half frame (else the new source's bytes would be read as its payload), sends the
    received map exactly as the Python encoder writes it (which the source's parser reads back),
    and takes the new source's HELLO."""
    import select
    import socket

    from postcopy_core import kernel
    from postcopy_core._uffd import ffi, lib
    from postcopy_core.protocol import ReturnPathReader
    from tests.test_dest_c import GEO, HELLO, IMG, NPAGES, PS, CDest, pages_frame

    dest = CDest()
    quit_fd = kernel.eventfd(0)
    pri, ep = select.epoll(), select.epoll()
    socks = [socket.socketpair() for _ in range(4)]  # old stream, old urgent, new stream, new urgent
    (s_old, s_src), (u_old, u_src), (s_new, s_src2), (u_new, u_src2) = socks
    try:
        pri.register(u_old.fileno(), select.EPOLLIN)
        for fd in (pri.fileno(), s_old.fileno(), quit_fd):
            ep.register(fd, select.EPOLLIN)
        port_of_fd = ffi.new("int32_t[]", [-1] * 1024)
        loop = ffi.new("struct pch_dest_loop *", dict(epfd=ep.fileno(), pri_epfd=pri.fileno(), quit_fd=quit_fd,
                                                      stream_fd=s_old.fileno(), urgent_fd=u_old.fileno(),
                                                      port_of_fd=port_of_fd, nfds=1024))
        s_src.sendall(HELLO + pages_frame(2, 3) + pages_frame(12, 1)[: PS // 2])  # dies mid-frame
        u_src.sendall(HELLO + pages_frame(9, 1))
        while dest.stats.placed < 4:
            assert lib.pch_dest_run(dest.d, loop, 20) == lib.PCH_RUN_AGAIN, dest.error
        s_src.close()
        assert lib.pch_dest_run(dest.d, loop, 200) == lib.PCH_RUN_EOF
        # paused: the old channels out of the loop, as the handler does
        pri.unregister(u_old.fileno())
        loop.stream_fd = loop.urgent_fd = -1
        assert lib.pch_dest_run(dest.d, loop, 20) == lib.PCH_RUN_AGAIN  # serves nothing, fails nothing
        assert lib.pch_dest_reconnect(dest.d, s_new.fileno()) == 0  # no fault waits: nothing to ask again
        sent = s_src2.recv(1 << 16)
        reader = ReturnPathReader(GEO)
        assert reader.feed(sent) == [] and reader.resumed
        assert list(reader.received) == [1 if p in (2, 3, 4, 9) else 0 for p in range(NPAGES)]
        assert sent == encode_received(bytes(dest.received))
        assert lib.pch_dest_hellos(dest.d) == 0
        ep.register(s_new.fileno(), select.EPOLLIN)
        pri.register(u_new.fileno(), select.EPOLLIN)
        loop.stream_fd, loop.urgent_fd = s_new.fileno(), u_new.fileno()
        s_src2.sendall(HELLO + pages_frame(12, 1))
        u_src2.sendall(HELLO)
        while lib.pch_dest_hellos(dest.d) < 2 or not dest.received[12]:
            assert lib.pch_dest_run(dest.d, loop, 20) == lib.PCH_RUN_AGAIN, dest.error
        assert bytes(dest.ram.buffer(12 * PS, PS)) == bytes(IMG.mapping.buffer(12 * PS, PS))
        assert dest.stats.reconnects == 1 and dest.stats.placed == 5
    finally:
        for pair in socks:
            for sock in pair:
                sock.close()
        ep.close()
        pri.close()
        os.close(quit_fd)
        dest.close()


@pytest.mark.parametrize(("body", "words"), [
    (lambda: encode_received(bytes(4)) + encode_received(bytes(4)), "after RESUME"),
    (lambda: encode_received(bytes(4))[:-8] + (3).to_bytes(8, "big"), "says 3 pages received, the bitmap holds 0"),
    (lambda: encode_received(bytes(8))[:-12], None),  # no RESUME yet: waiting, not an error
])
def test_return_path_reader_checks_the_received_map(body, words):
    from postcopy_core.protocol import Geometry, ProtocolError, ReturnPathReader

    reader = ReturnPathReader(Geometry(4096, 4 * 4096))
    if words is None:
        reader = ReturnPathReader(Geometry(4096, 8 * 4096))
        assert reader.feed(body()) == [] and not reader.resumed
        return
    with pytest.raises(ProtocolError, match=words):
        reader.feed(body())


def test_received_map_is_sent_in_chunks_that_round_trip():
    """A map larger than one RECV_BITMAP message (2^18 pages each) splits and reads back whole."""
    import random

    from postcopy_core.protocol import Geometry, ReturnPathReader

    npages = 600_001
    rnd = random.Random(5)
    received = bytes(rnd.random() < 0.3 for _ in range(npages))
    data = encode_received(received)
    assert data.count(b"\x00\x07") >= 3  # three RECV_BITMAP messages (be16 type 7)
    reader = ReturnPathReader(Geometry(4096, npages * 4096))
    assert reader.feed(data) == [] and reader.resumed and bytes(reader.received) == received


def test_source_takes_go_and_stream_from_one_read():
    """A replacement source after the workload gets "go" and then "stream" at once; both sit in one
    read of its control line, and the second must not be left unseen in the buffer (the source
    would answer requests only and the run stall)."""
    import socket
    from types import SimpleNamespace

    from postcopy_core.channel import ControlLine
    from postcopy_core.source import Source

    a, b = socket.socketpair()
    try:
        ControlLine(a).send(cmd="go", background=False)
        ControlLine(a).send(cmd="stream")
        line = ControlLine(b)
        assert Source._command(SimpleNamespace(control=line)) is True
        assert line.buf == b""
        ControlLine(a).send(cmd="go", background=False)
        assert Source._command(SimpleNamespace(control=line)) is None  # demand only: nothing to start
    finally:
        a.close()
        b.close()


def test_source_crash_after_precopy_resends_final_content(tmp_path, clean_machine):
    """A replacement source after a precopy with dirtying must send each page's final generation
    (the workers check every byte against it), not the content the RAM started with."""
    code, err, rep = _run(tmp_path, "source-crash@0.3", extra=("--precopy", "0.3", "--dirty-rate", "3000"))
    _assert_complete(code, err, rep)
    assert rep["pages"]["discarded"] > 0 and rep["precopy"]["pages-dirtied"] > 0
    assert (rep["recovery"]["pauses"], rep["recovery"]["resumes"]) == (1, 1)
    assert_clean()


def test_source_crash_with_place_continue(tmp_path, clean_machine):
    """--place continue receives big frames straight into guest RAM: a frame cut off by the crash is
    half written there, never CONTINUEd, and asked for again from the new source."""
    code, err, rep = _run(tmp_path, "source-crash@0.3", extra=("--place", "continue"))
    _assert_complete(code, err, rep)
    assert (rep["recovery"]["pauses"], rep["recovery"]["resumes"]) == (1, 1)
    assert_clean()
