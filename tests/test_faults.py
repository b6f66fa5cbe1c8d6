"""Faults during a run: a lost vCPU degrades the run, a stall fails it naming who, messages name causes.

Real runs of the CLI in their own session; the tests kill or stop parts of them and check the exit
code, the one-line message, the report, and that nothing is left behind.
"""

from __future__ import annotations

import json
import signal
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
