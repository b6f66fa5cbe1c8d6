"""Each side's CPU over the workload (harness/cpu_time.py, the report's ``cpu`` section) and the
destination policy's tuning knob (PCH_DEST_POLICY)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from harness.config import RunConfig
from harness.cpu_time import CpuWindow, cpu_section, host_ipis, process_cpu_ns
from harness.report import build_report
from harness.run import execute
from postcopy_core.handler import DestPolicy, policy_from_env
from tests.conftest import requires_uffd


def test_a_busy_process_gains_cpu_time_an_idle_one_does_not():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both started (the interpreter's start-up is CPU too)
        w = CpuWindow()
        w.start({"busy": busy.pid, "idle": idle.pid})
        time.sleep(0.4)
        w.stop()
        assert w.used_s["busy"] > 0.1  # a spinning process, even sharing a CPU with the tests
        assert w.used_s["idle"] < 0.02
        assert 0.35 < w.window_s < 5
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert process_cpu_ns(busy.pid) is None  # gone: None, not a stale figure


def test_cpu_section_divides_each_side_by_the_faults():
    w = CpuWindow()
    w.used_s, w.window_s, w.idle_s, w.ipis = {"handler": 0.3, "source": 0.1}, 1.0, 0.2, {"reschedule": 500}
    sec = cpu_section(w, vcpus_cpu_ns=200_000_000, faults=100_000, spin_ns=50_000_000)
    assert sec["per-fault-us"] == {"vcpus": 2.0, "handler": 3.0, "source": 1.0, "orchestrator": None,
                                   "destination": 5.0, "handler-spin": 0.5}
    assert sec["ipis-per-fault"] == {"reschedule": 0.005}
    assert cpu_section(None, 0, 0)["per-fault-us"]["destination"] is None


def test_the_host_counts_reschedule_ipis():
    assert host_ipis().get("reschedule", 0) >= 0
    assert set(host_ipis()) <= {"reschedule", "function-call", "tlb-shootdown"}


@pytest.mark.kernel
@requires_uffd
def test_a_run_reports_the_cpu_of_each_side(clean_machine):
    cfg = RunConfig(vcpus=4, ram=32 << 20, workload="sequential", background=False, write_ratio=0.0).validate()
    rep = build_report(cfg, execute(cfg))
    assert rep["status"] == "completed", rep["error"]
    cpu = rep["cpu"]
    assert cpu["faults"] == rep["pages"]["requested"] > 0
    assert cpu["vcpus-s"] > 0 and cpu["handler-s"] > 0 and cpu["source-s"] > 0
    # nothing can use more CPU than the host has over the window (each side's clock is its own)
    assert cpu["vcpus-s"] + cpu["handler-s"] + cpu["source-s"] <= cpu["window-s"] * os.cpu_count() * 1.05
    per = cpu["per-fault-us"]
    assert per["destination"] == pytest.approx(per["vcpus"] + per["handler"], abs=0.002)
    assert "reschedule" in cpu["ipis"]
    assert 0 <= per["handler-spin"] and rep["handler"]["spin-s"] >= 0


def test_dest_policy_from_the_environment():
    assert policy_from_env(None) == DestPolicy() == policy_from_env("")
    assert policy_from_env("spin_ns=0, rx_turn=65536") == DestPolicy(spin_ns=0, rx_turn=65536)
    for bad, words in (("spin=3", "give name=value pairs"), ("spin_ns", "give name=value pairs"),
                       ("spin_ns=fast", "is not a whole number"), ("spin_ns=-1", "must be 0 or more")):
        with pytest.raises(ValueError, match=words):
            policy_from_env(bad)


@pytest.mark.kernel
@requires_uffd
def test_a_bad_dest_policy_fails_the_run_in_one_line(clean_machine):
    env = dict(os.environ, PCH_DEST_POLICY="spin=3")
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--vcpus", "1", "--ram", "4M", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith("names board_scan_slots, direct_min, events_ship, "
                                                      "rx_turn, spin_ns, urgent_turns")


@pytest.mark.kernel
@requires_uffd
def test_the_dest_policy_from_the_environment_reaches_the_handler(monkeypatch, clean_machine):
    spun = {}
    for spin in (0, 1_000_000):  # no look before sleeping, then a 1 ms one
        monkeypatch.setenv("PCH_DEST_POLICY", f"spin_ns={spin}")
        cfg = RunConfig(vcpus=2, ram=16 << 20, workload="sequential", background=False, write_ratio=0.0).validate()
        rep = build_report(cfg, execute(cfg))
        assert rep["status"] == "completed", rep["error"]
        spun[spin] = rep["handler"]["spin-s"]
    assert spun[0] < 0.01 < spun[1_000_000]
