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

import psutil
import pytest

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
                                             ("pch-source", "the source (pid {pid}) made no progress for 2 s"),
                                             ("pch-fault", "the fault handler (pid {pid}) made no progress for 2 s")])
def test_stopped_process_fails_the_run_named(name, words, clean_machine):
    """SIGSTOP of a vCPU, the source or the handler: failed after --stall-timeout, not --timeout."""
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


def test_slow_link_that_moves_is_never_a_stall(clean_machine):
    """Pages trickle in over a slow link, vCPUs wait far longer than --stall-timeout in total: completed."""
    proc = start_cli(["run", "--vcpus", "4", "--ram", "8M", "--link", "20mbit,5ms", "--stall-timeout", "0.5",
                      "--quiet"])
    code, err = finish(proc, 90)
    assert code == 0, err
    assert_clean()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize(("name", "who"), [("pch-source", "the source"), ("pch-fault", "the fault handler")])
def test_killed_service_is_named_with_its_signal(name, who, transport, clean_machine):
    """SIGKILL of the source or the handler, with the background stream on: the line names which
    process and how it died, not the EOF it caused elsewhere ("closed its control channel")."""
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
