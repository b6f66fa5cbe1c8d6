"""``bench/link_modes.py`` runs on a tiny size and prints its table; bad input is one line, exit 2.

Only that it works is checked here: the measurement itself is the script's job, run by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_uffd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "link_modes.py"


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.kernel
@requires_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="--link-mode netns needs root")
def test_tiny_comparison_prints_the_table(tmp_path, clean_machine):
    from harness.netns import probe_support

    support = probe_support()
    if not (support["netns"] and support["tbf"]):
        pytest.skip(f"no netns/tbf here: {support['detail']}")
    out = tmp_path / "b.json"
    p = bench("--links", "50mbit", "--vcpus", "1", "--ram", "1M", "--repeat", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "model → netns" in p.stdout and "reproduce: python bench/link_modes.py" in p.stdout
    doc = json.loads(out.read_text())
    assert set(doc["50mbit"]) == {"model", "netns"}


def test_bad_link_is_one_line():
    p = bench("--links", "fast")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "bad bandwidth" in p.stderr
