"""Faults during a run: a lost vCPU degrades the run, a stall fails it naming who, messages name causes.

Real runs of the CLI in their own session; the tests kill or stop parts of them and check the exit
code, the one-line message, the report, and that nothing is left behind.
"""

from __future__ import annotations

import json
import signal

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
