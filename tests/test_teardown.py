"""Nothing lost, nothing hung: a dead child fails the run loudly, Ctrl-C tears everything down.

The CLI runs in its own session (as from a terminal); the tests kill parts of it and check the
exit code, the one-line message, and that no process, /dev/shm segment or socket is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import requires_uffd, wait_no_leftovers

pytestmark = [pytest.mark.kernel, requires_uffd]

# long enough to interrupt: every page is requested over a 1 ms link
SLOW_RUN = ["run", "--vcpus", "4", "--ram", "64M", "--workload", "sequential", "--no-background",
            "--link", "200mbit,1ms", "--quiet"]


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_children(proc: subprocess.Popen, name: str, count: int = 1, timeout: float = 30) -> list[psutil.Process]:
    """Wait until ``count`` children of the run called ``name`` are up, and the workload has begun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name().startswith(name)]
        if len(kids) >= count:
            time.sleep(0.7)  # let the vCPUs start faulting
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {name} process appeared")


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the run hung after the failure") from None
    return proc.returncode, err


def assert_clean() -> None:
    left = wait_no_leftovers(5.0)
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("role", ["pch-fault", "pch-zygote"])
def test_service_killed_mid_run_fails_loudly(role):
    """Losing the handler would let the kernel fill zero pages: the run must fail, never pass.
    Losing the zygote takes the workers with it (PDEATHSIG): that fails the run too.  (Losing the
    source is survived by postcopy recovery: tests/test_recovery.py.)"""
    proc = start_cli(SLOW_RUN)
    wait_for_children(proc, "pch-vcpu", 4)
    [svc] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == role]
    svc.kill()
    code, err = finish(proc)
    assert code == 1, err
    assert "failed" in err and "Traceback" not in err
    assert_clean()


def test_ctrl_c_tears_everything_down():
    proc = start_cli(SLOW_RUN)
    wait_for_children(proc, "pch-vcpu", 4)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    code, err = finish(proc)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
    assert_clean()


def test_sigterm_tears_everything_down():
    proc = start_cli(SLOW_RUN)
    wait_for_children(proc, "pch-vcpu", 4)
    proc.terminate()
    code, err = finish(proc)
    assert code == 143, err  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
    assert err.strip().splitlines()[-1] == "postcopy-harness run: failed: terminated"
    assert "Traceback" not in err
    assert_clean()


def test_orchestrator_sigkilled_children_die_with_it():
    """Even a SIGKILLed orchestrator leaves no process (PDEATHSIG) and no segment (unlinked at once)."""
    proc = start_cli(SLOW_RUN)
    wait_for_children(proc, "pch-vcpu", 4)
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("pch-")]:
            break
        time.sleep(0.05)
    assert_clean()
