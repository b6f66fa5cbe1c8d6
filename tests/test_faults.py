"""Faults during a run: a lost vCPU degrades the run, a stall fails it naming who, messages name causes.

Real runs of the CLI in their own session; the tests kill or stop parts of them and check the exit
code, the one-line message, the report, and that nothing is left behind.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from harness.stall import SourceStalled, StallWatch
from harness.supervise import RunFailed
from tests.conftest import requires_uffd
from tests.test_teardown import SLOW_RUN, assert_clean, finish, start_cli, wait_for_children

pytestmark = [pytest.mark.kernel, requires_uffd]


@pytest.mark.parametrize("wake", ["waiters", "all"])
def test_lost_vcpu_degrades_the_run(tmp_path, wake, clean_machine):
    """Two vCPUs SIGKILLed mid-run: the others finish, every page is verified, exit 3, workers.lost."""
    out = tmp_path / "r.json"
    proc = start_cli([*SLOW_RUN, "--vcpus", "6", "--wake-policy", wake, "--json", str(out)])
    kids = wait_for_children(proc, "pch-vcpu", 6)
    victims = sorted((k for k in kids if k.name() in ("pch-vcpu-1", "pch-vcpu-4")), key=lambda k: k.name())
    for v in victims:
        v.kill()
    code, err = finish(proc, 60)
    assert code == 3, err
    assert "completed-degraded: lost vCPU 1" in err and "killed by SIGKILL" in err
    rep = json.loads(out.read_text())
    assert rep["status"] == "completed-degraded" and rep["error"] is None
    assert rep["workers"]["lost"] == [{"vcpu": 1, "pid": victims[0].pid, "how": "killed by SIGKILL"},
                                      {"vcpu": 4, "pid": victims[1].pid, "how": "killed by SIGKILL"}]
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0 and v["ram-pages-verified"] == rep["pages"]["total"]
    assert rep["pages"]["placed"] == rep["pages"]["total"]
    # the four others read their whole share (sequential: npages / 6 each, checked page by page)
    assert v["pages-checked"] >= 4 * (rep["pages"]["total"] // 6)
    # each dead uffd is marked dead once (its first ESRCH), never retried
    assert rep["handler"]["dead-ports"] <= 2
    assert_clean()


@pytest.mark.parametrize(("name", "words"), [("pch-vcpu-2", "vCPU 2 (pid {pid}) made no progress for 2 s"),
                                             ("pch-fault", "the fault handler (pid {pid}) made no progress for 2 s")])
def test_stopped_process_fails_the_run_named(name, words, clean_machine):
    """SIGSTOP of a vCPU or the handler: failed after --stall-timeout, not --timeout.  (A stopped
    source is replaced like a lost one: tests/test_recovery.py.)"""
    proc = start_cli([*SLOW_RUN, "--stall-timeout", "2", "--timeout", "120"])
    wait_for_children(proc, "pch-vcpu", 4)
    [victim] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == name]
    victim.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    code, err = finish(proc, 60)
    assert code == 1, err
    assert words.format(pid=victim.pid) in err and "(state: stopped)" in err, err
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in err
    assert_clean()


def test_every_vcpu_lost_fails_the_run(tmp_path, clean_machine):
    """The issue: with every vCPU SIGKILLed the run said completed-degraded, "the others finished"
    (exit 3), with no other left.  Nothing ran the workload: failed, exit 1, both named."""
    out = tmp_path / "r.json"
    proc = start_cli([*SLOW_RUN, "--vcpus", "2", "--json", str(out)])
    kids = sorted(wait_for_children(proc, "pch-vcpu", 2), key=lambda k: k.name())
    for k in kids:
        k.kill()
    code, err = finish(proc, 60)
    assert code == 1, err
    assert "degraded" not in err and "the others finished" not in err, err
    words = (f"every vCPU was lost, none finished its workload: vCPU 0 (pid {kids[0].pid}, killed by SIGKILL), "
             f"vCPU 1 (pid {kids[1].pid}, killed by SIGKILL)")
    assert f"failed: {words}" in err and len(err.strip().splitlines()) == 1, err
    rep = json.loads(out.read_text())
    assert rep["status"] == "failed" and rep["error"] == words
    assert [w["vcpu"] for w in rep["workers"]["lost"]] == [0, 1]
    assert_clean()


def test_slow_link_that_moves_is_never_a_stall(clean_machine):
    """Pages trickle in over a slow link, vCPUs wait far longer than --stall-timeout in total: completed."""
    proc = start_cli(["run", "--vcpus", "4", "--ram", "8M", "--link", "20mbit,5ms", "--stall-timeout", "0.5",
                      "--quiet"])
    code, err = finish(proc, 90)
    assert code == 0, err
    assert_clean()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize(("name", "who"), [("pch-fault", "the fault handler")])
def test_killed_service_is_named_with_its_signal(name, who, transport, clean_machine):
    """SIGKILL of the handler, with the background stream on: the line names which process and how
    it died, not the EOF it caused elsewhere ("closed its control channel").  (A killed source is
    survived: tests/test_recovery.py.)"""
    args = ["run", "--vcpus", "4", "--ram", "64M", "--link", "100mbit,1ms", "--transport", transport, "--quiet"]
    proc = start_cli(args)
    wait_for_children(proc, "pch-vcpu", 4)
    [victim] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == name]
    victim.kill()
    code, err = finish(proc)
    assert code == 1, err
    assert f"failed: {who} (pid {victim.pid}) was killed by SIGKILL" in err, err
    assert "control channel" not in err and "Traceback" not in err
    assert_clean()


def _nofile(n: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return limit


def test_fd_limit_is_named_and_check_agrees(clean_machine):
    """`ulimit -n 256` with 512 vCPUs: run refuses at once naming RLIMIT_NOFILE; check says FAIL too."""
    cmd = [sys.executable, "-m", "harness.cli"]
    t0 = time.monotonic()
    run = subprocess.run([*cmd, "run", "--vcpus", "512", "--ram", "64M", "--quiet"], capture_output=True,
                         text=True, timeout=60, preexec_fn=_nofile(256))
    assert run.returncode == 1
    assert "exceed the fd limit" in run.stderr and "RLIMIT_NOFILE" in run.stderr and "need 576" in run.stderr
    assert time.monotonic() - t0 < 30
    check = subprocess.run([*cmd, "check", "--vcpus", "512", "--json"], capture_output=True, text=True,
                           timeout=60, preexec_fn=_nofile(256))
    rep = json.loads(check.stdout)
    assert check.returncode == 1 and not rep["can-run"]
    [fd] = [c for c in rep["checks"] if c["name"].startswith("fd limit")]
    assert not fd["ok"] and "need 576" in fd["detail"]


def test_check_and_run_refuse_the_same_vcpus():
    cmd = [sys.executable, "-m", "harness.cli"]
    for sub in ("check", "run"):
        r = subprocess.run([*cmd, sub, "--vcpus", "5000"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--vcpus 5000: must be 1..4096" in r.stderr, (sub, r.stderr)


def _run_injected(tmp_path, *inject: str, extra: tuple[str, ...] = ()) -> tuple[int, str, dict]:
    out = tmp_path / "r.json"
    args = [*SLOW_RUN, "--json", str(out), *extra]
    for text in inject:
        args += ["--inject", text]
    code, err = finish(start_cli(args), 90)
    return code, err, json.loads(out.read_text())


def test_inject_worker_crash_and_stall(tmp_path, clean_machine):
    """vCPU 2 killed at 0.5 s, vCPU 1 stopped 1 s at 0.3 s: completed-degraded, both in recovery."""
    code, err, rep = _run_injected(tmp_path, "worker-crash@0.5,vcpu=2", "worker-stall@0.3:1,vcpu=1")
    assert code == 3, err
    assert rep["status"] == "completed-degraded"
    assert [w["vcpu"] for w in rep["workers"]["lost"]] == [2]
    rec = rep["recovery"]
    assert (rec["pauses"], rec["resumes"], rec["paused-s"], rec["source-restarts"]) == (0, 0, 0.0, 0)
    stall, crash = rec["injected"]  # in the order they fired
    assert stall["injection"] == "worker-stall@0.3:1,vcpu=1" and stall["target"] == "vCPU 1"
    assert stall["outcome"] == "stopped, continued after 1 s" and stall["fired-at-s"] >= 0.3
    assert crash["kind"] == "worker-crash" and crash["pid"] == rep["workers"]["lost"][0]["pid"]
    assert rep["verification"]["mismatches"] == 0 and rep["verification"]["ram-bad-pages"] == 0
    assert_clean()


def test_inject_source_stall_shorter_than_the_stall_timeout_completes(tmp_path, clean_machine):
    code, err, rep = _run_injected(tmp_path, "source-stall@0.3:1.5", extra=("--stall-timeout", "5"))
    assert code == 0, err
    [rec] = rep["recovery"]["injected"]
    assert rec["target"] == "the source" and rec["outcome"] == "stopped, continued after 1.5 s"
    assert_clean()


def test_inject_stall_longer_than_the_stall_timeout_fails_named(tmp_path, clean_machine):
    code, err, rep = _run_injected(tmp_path, "worker-stall@0.3:30,vcpu=3", extra=("--stall-timeout", "2"))
    assert code == 1
    assert "vCPU 3 (pid" in err and "made no progress for 2 s (state: stopped)" in err
    assert "after --inject worker-stall@0.3:30,vcpu=3" in err
    assert rep["recovery"]["injected"][0]["outcome"] == "stopped; the run ended before the hold did"
    assert_clean()


@pytest.mark.parametrize(("kind", "words"), [
    ("handler-crash", "the fault handler (pid {pid}) was killed by SIGKILL (after --inject handler-crash@0.3)"),
])
def test_inject_fatal_kinds_fail_naming_the_injection(tmp_path, kind, words, clean_machine):
    code, err, rep = _run_injected(tmp_path, f"{kind}@0.3")
    assert code == 1 and rep["status"] == "failed"
    [rec] = rep["recovery"]["injected"]
    assert rec["kind"] == kind and rec["fired-at-s"] >= 0.3
    assert words.format(pid=rec["pid"]) in err, err
    assert "Traceback" not in err
    assert_clean()


@pytest.mark.parametrize(("text", "words"), [
    ("disk-crash@1", "unknown kind 'disk-crash'"),
    ("worker-crash", "use KIND@SECONDS[:HOLD][,vcpu=N]"),
    ("worker-crash@1,vcpu=4", "vcpu=4 but the run has 4 vCPUs"),
    ("handler-crash@1:2", "only worker-stall, source-stall, source-crash, link-drop take :HOLD"),
    ("source-stall@1,vcpu=1", "only worker-crash and worker-stall take vcpu=N"),
    ("worker-stall@1:0", "HOLD positive"),
])
def test_bad_inject_is_one_line(text, words):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--vcpus", "4", "--inject", text],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _watch(received, source_pid: int, vcpu_pid: int, board=None) -> StallWatch:
    board = np.zeros(1, np.uint64) if board is None else board
    return StallWatch(0.3, [vcpu_pid], board=lambda: board, received=lambda: received, events=lambda: 0,
                      services={"the source": source_pid}, ended=set, worker_name=lambda v: f"vCPU {v}")


def _poll(watch: StallWatch, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watch.check()
        time.sleep(0.02)


def test_stall_watch_rules():
    """With real processes as the source and a vCPU: still while pages are missing -> the source is
    named; still once every page is in (the handler checking RAM) -> no stall; a vCPU on a page that
    is in and no CPU time -> named."""
    src = subprocess.Popen(["sleep", "60"])
    vcpu = subprocess.Popen(["sleep", "60"])
    try:
        _poll(_watch(np.ones(8, np.uint8), src.pid, vcpu.pid), 1.0)  # all in: never a stall
        # a still source (hung, or stopped) is a SourceStalled: the run replaces it like a lost one
        with pytest.raises(SourceStalled, match=rf"the source \(pid {src.pid}\) sent no page while vCPUs wait "
                                                r"for 0.3 s \(state: sleeping\)") as hung:
            _poll(_watch(np.zeros(8, np.uint8), src.pid, vcpu.pid), 3.0)
        assert hung.value.pid == src.pid
        src.send_signal(signal.SIGSTOP)
        with pytest.raises(SourceStalled, match=rf"the source \(pid {src.pid}\) made no progress .*state: stopped"):
            _poll(_watch(np.zeros(8, np.uint8), src.pid, vcpu.pid), 3.0)
        src.send_signal(signal.SIGCONT)
        received = np.zeros(8, np.uint8)
        received[3] = 1  # vCPU 0 sits on page 3, which is in: it waits for nothing
        with pytest.raises(RunFailed, match=rf"vCPU 0 \(pid {vcpu.pid}\) made no progress for 0.3 s") as still:
            _poll(_watch(received, src.pid, vcpu.pid, board=np.array([4], np.uint64)), 3.0)
        assert not isinstance(still.value, SourceStalled)  # a vCPU cannot be replaced: the run fails
    finally:
        for p in (src, vcpu):
            p.kill()
            p.wait()


def test_lost_non_vcpu_process_is_listed_as_such(tmp_path, clean_machine):
    out = tmp_path / "r.json"
    proc = start_cli([*SLOW_RUN, "--non-vcpu", "2", "--json", str(out)])
    wait_for_children(proc, "pch-dev", 2)
    [victim] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "pch-dev-1"]
    victim.kill()
    code, err = finish(proc, 60)
    assert code == 3, err
    assert f"lost non-vCPU process 1 (pid {victim.pid}, killed by SIGKILL)" in err
    rep = json.loads(out.read_text())
    assert rep["workers"]["lost"] == [{"vcpu": None, "pid": victim.pid, "how": "killed by SIGKILL", "non-vcpu": 1}]
    assert rep["verification"]["ram-bad-pages"] == 0 and rep["verification"]["mismatches"] == 0
    assert_clean()
