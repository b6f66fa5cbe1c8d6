"""bench/bench_replay.py runs and reports every engine's columnar replay at 256 vCPUs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from postcopy_core.blocktime import ENGINE_NAMES

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_replay.py"


def test_bench_replay_quick_prints_every_engine_at_256_vcpus():
    out = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=240,
                         env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"columnar\s*│\s*(\w+)\s*│\s*256\s*│[^│]*│[^│]*│\s*([\d,]+)\s*│", out.stdout)
    assert sorted(name for name, _ in rows) == sorted(ENGINE_NAMES)
    assert all(int(rate.replace(",", "")) > 0 for _, rate in rows)
