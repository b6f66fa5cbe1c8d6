"""``bench/write_check.py`` on tiny inputs: its three tables print, every planted bug is caught, no
write is lost, and its figures come out as JSON.  The real sweep (>= 200 runs) is run by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_uffd

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "write_check.py"


@pytest.mark.kernel
@requires_uffd
def test_write_check_tiny(clean_machine, tmp_path):
    out = tmp_path / "w.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--vcpus", "2", "--runs", "1", "--plant-runs", "1",
                        "--repeat", "1", "--scenarios", "stream", "--ram", "8M", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for title in ("Table 1: lost writes", "Table 2: planted bugs caught", "Table 3: what the write check costs"):
        assert title in r.stdout
    runs = json.loads(out.read_text())["runs"]
    assert all(x["lost-writes"] == 0 and x["status"] == "completed" for x in runs if x["table"] == 1)
    planted = [x for x in runs if x["table"] == 2]
    assert len(planted) == 11 and all(x["caught"] for x in planted)


def test_write_check_bad_flag():
    r = subprocess.run([sys.executable, str(SCRIPT), "--vcpus", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid literal" in r.stderr
