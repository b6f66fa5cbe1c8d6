"""The leftover check itself: it sees a pch-* process of this test session, and not one that belongs
to somebody else's run on the same machine (no session tag in its environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import leftovers

NAMED = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'pch-probe'); time.sleep(30)"


def _wait_named(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/comm") as f:
            if f.read().strip() == "pch-probe":
                return
        time.sleep(0.01)
    raise AssertionError("the probe never took its name")


def test_a_process_of_this_session_is_a_leftover():
    proc = subprocess.Popen([sys.executable, "-c", NAMED])  # inherits the session tag
    try:
        _wait_named(proc)
        assert f"process pch-probe pid {proc.pid}" in leftovers()
    finally:
        proc.kill()
        proc.wait()
    assert f"process pch-probe pid {proc.pid}" not in leftovers()


def test_another_sessions_process_is_not():
    env = {k: v for k, v in os.environ.items() if k != "PCH_TEST_SESSION"}
    proc = subprocess.Popen([sys.executable, "-c", NAMED], env=env)
    try:
        _wait_named(proc)
        assert not [x for x in leftovers() if f"pid {proc.pid}" in x]
    finally:
        proc.kill()
        proc.wait()
