"""``bench/soak.py`` runs a few small runs in one process and finds nothing grown; bad input exit 2.

Only that it works is checked here: the soak itself (minutes at 256 vCPUs) is run by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_uffd

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def soak(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.kernel
@requires_uffd
def test_soak_short(clean_machine):
    r = soak("--minutes", "0.01", "--vcpus", "8", "--ram", "8M", "--small-runs", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum(1 for x in lines if x.startswith("small run")) == 4
    assert any(x.startswith("big   run    1") for x in lines)
    assert "soak: ok: nothing grew" in r.stdout


def test_soak_growth_rule():
    sys.path.insert(0, str(SCRIPT.parent))
    import soak as s

    row = dict(fds=6, rss_mib=50.0, heap_mib=10.0, shm_maps=0, dev_shm=0, dev_shm_mine=0)
    assert s.growth("x", [row, dict(row), dict(row, rss_mib=60.0)], 32) == []
    grown = s.growth("x", [row, dict(row, fds=7), dict(row, rss_mib=90.0, heap_mib=30.0)], 32, 8)
    assert [p.split(":")[1].split()[0] for p in grown] == ["fds", "RSS", "malloc"]
    # a ramp over the first runs, then flat: no growth; still growing at the end: growth
    ramp = [dict(row, rss_mib=50.0 + min(i, 10) * 3) for i in range(40)]
    assert s.growth("x", ramp, 32) == []
    leak = [dict(row, rss_mib=50.0 + i) for i in range(80)]
    assert [p.split(":")[1].split()[0] for p in s.growth("x", leak, 32)] == ["RSS"]
    left = s.growth("x", [row, dict(row, dev_shm_mine=1)], 32)
    assert left == ["x: a /dev/shm entry named after this process was left"]


@pytest.mark.parametrize("argv", [["--small-runs", "-1"], ["--vcpus", "0"], ["--ram", "12Q", "--minutes", "0.01"]])
def test_soak_bad_input(argv):
    r = soak(*argv, "--small-runs" if "--small-runs" not in argv else "--minutes", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr, r.stderr
