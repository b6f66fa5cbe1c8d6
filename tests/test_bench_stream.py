"""``bench/stream_faults.py`` runs on a tiny size and prints both tables; bad input is one line, exit 2.

Only that it works is checked here: the measurement itself is the script's job, run by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.reference import compiler
from tests.conftest import requires_uffd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "stream_faults.py"

can_build = pytest.mark.skipif(compiler() is None, reason="needs a C compiler (cc, gcc or $CC)")


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.kernel
@requires_uffd
@can_build
def test_tiny_run_prints_both_tables_and_json(tmp_path, clean_machine):
    out = tmp_path / "b.json"
    p = bench("--vcpus", "1,2", "--ram", "4M", "--stream-ram", "4M", "--repeat", "1", "--rounds", "2",
              "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "with and without the stream" in p.stdout and "uffd_ref -m raw" in p.stdout
    assert "reproduce: python bench/stream_faults.py" in p.stdout
    doc = json.loads(out.read_text())
    assert [r["vcpus"] for r in doc["latency"]] == [1, 2]
    for r in doc["latency"]:
        assert r["stream"]["p50"] > 0 and r["demand"]["p50"] > 0
    (row,) = doc["stream"]
    assert row["backing"] == "shmem" and row["harness-pages-per-s"] > 0 and row["raw-pages-per-s"] > 0
    assert {r["side"] for r in doc["runs"] if r["table"] == "stream"} == {"harness", "ref"}


@pytest.mark.kernel
@requires_uffd
@can_build
def test_both_placements_one_row_each(tmp_path, clean_machine):
    out = tmp_path / "b.json"
    p = bench("--no-latency", "--stream-ram", "4M", "--repeat", "2", "--rounds", "2", "--place", "copy,continue",
              "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["latency"] == [] and "with and without the stream" not in p.stdout
    assert [r["place"] for r in doc["stream"]] == ["copy", "continue"]
    assert all(r["harness-pages-per-s"] > 0 and r["ratio"] > 0 for r in doc["stream"])
    assert sorted(r.get("place", "ref") for r in doc["runs"]) == ["continue"] * 2 + ["copy"] * 2 + ["ref"] * 2


@pytest.mark.parametrize("argv", [["--ram", "lots"], ["--stream-ram", "1500K"], ["--repeat", "0"],
                                  ["--reference-source", "/nonexistent.c"], ["--place", "copy,move"]])
def test_bad_input_is_one_line(argv):
    p = bench(*argv)
    assert p.returncode == 2
    assert p.stderr.startswith("stream_faults: ") and len(p.stderr.strip().splitlines()) == 1


ACCURACY = REPO / "bench" / "accuracy.py"


@pytest.mark.kernel
@requires_uffd
def test_accuracy_tiny_run_has_every_cell(tmp_path, clean_machine):
    out = tmp_path / "a.json"
    p = subprocess.run([sys.executable, str(ACCURACY), "--vcpus", "2", "--ram", "4M", "--repeat", "1",
                        "--workloads", "shared", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    cells = json.loads(out.read_text())["cells"]
    assert {(c["link"], c["stream"]) for c in cells} == {("unlimited", False), ("unlimited", True),
                                                         ("1gbit,2ms", False), ("1gbit,2ms", True)}
    for c in cells:  # a handler-side engine sees no more per-vCPU stall than the vCPUs lived (but for
        share = c["shares"]["exact"]["vcpu"]  # the handler's clock read after a copy)
        if c["stream"] and share is None:  # the stream placed every page before a vCPU touched it
            assert c["truth-all-ms"] == 0
            continue
        assert 0 < share <= 1.05  # demand only: every page is a fault, truth must see a stall
