"""``bench/fault_breakdown.py`` runs on a tiny size and prints its table; bad input is one line, exit 2.

Only that it works is checked here: the measurement itself is the script's job, run by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_uffd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "fault_breakdown.py"
sys.path.insert(0, str(REPO / "bench"))
import fault_breakdown  # noqa: E402  (a script, not a package)


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.kernel
@requires_uffd
@pytest.mark.parametrize("perf", [True, False])
def test_tiny_run_prints_every_step(tmp_path, perf, clean_machine):
    if perf and fault_breakdown.perf_usable():
        pytest.skip(fault_breakdown.perf_usable())
    out = tmp_path / "b.json"
    p = bench("--vcpus", "1,2", "--ram", "2M", "--json", str(out), *([] if perf else ["--no-perf"]))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["perf"] is perf and [r["vcpus"] for r in doc["results"]] == [1, 2]
    nsteps = len(fault_breakdown.STEPS) if perf else len(fault_breakdown.NO_PERF_STEPS)
    for r in doc["results"]:
        assert r["faults"] > 0 and len(r["steps"]) == nsteps
        assert abs(sum(s["share"] for s in r["steps"]) - 1) < 1e-6  # the means add up to one fault's
        assert all(s["mean-us"] >= 0 for s in r["steps"])
    assert "Reproduce: python bench/fault_breakdown.py" in p.stdout


def test_bad_input_is_one_line_and_exit_2():
    p = bench("--vcpus", "1", "--ram", "lots")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
