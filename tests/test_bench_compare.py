"""``bench/compare_ref.py`` runs on a tiny size and prints its table; bad input is one line, exit 2.

Only that it works is checked here: the measurement itself is the script's job, run by hand.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.reference import compiler
from tests.conftest import HUGEPAGES, requires_uffd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "compare_ref.py"
TINY = ["--vcpus", "1,2", "--ram", "4M", "--repeat", "1", "--rounds", "2"]

can_build = pytest.mark.skipif(compiler() is None, reason="needs a C compiler (cc, gcc or $CC)")


def load_module():
    spec = importlib.util.spec_from_file_location("compare_ref", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def table_rows(stdout: str) -> dict[int, list[str]]:
    """{N: cells} from the rich table (rows start with a vertical bar)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


@pytest.mark.kernel
@requires_uffd
@can_build
def test_tiny_compare_prints_table_ratios_and_command(tmp_path, clean_machine):
    out = tmp_path / "cmp.json"
    p = compare(*TINY, "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    for header in ("ref faults/s", "harness faults/s", "ratio", "ref p50/p99 µs", "harness p50/p99 µs",
                   "p50 ratio"):
        assert header in p.stdout
    rows = table_rows(p.stdout)
    assert sorted(rows) == [1, 2]
    for cells in rows.values():
        assert cells[3].endswith("x") and float(cells[3][:-1]) > 0
        assert cells[6].endswith("x") and float(cells[6][:-1]) > 0
    assert "Reproduce: python bench/compare_ref.py --vcpus 1,2 --ram 4M" in p.stdout
    doc = json.loads(out.read_text())
    assert [pt["vcpus"] for pt in doc["points"]] == [1, 2]
    for pt in doc["points"]:
        assert len(pt["ref"]["runs"]) == len(pt["harness"]["runs"]) == 1
        assert pt["ratio"] > 0 and pt["p50-ratio"] > 0
        assert pt["ref"]["runs"][0]["warm"]["rounds"] == "2..2"  # the WARM line, not round 1
        ref, har = pt["ref"]["median"]["cpu-us"], pt["harness"]["median"]["cpu-us"]
        for side in (ref, har):  # CPU per fault of each part, both sides
            assert side["vcpus"] > 0 and side["handler"] > 0
            assert side["destination"] == pytest.approx(side["vcpus"] + side["handler"], abs=0.01)
        assert ref["source"] is None and har["source"] > 0  # the reference has no source process
        assert pt["ref"]["median"]["ipis-per-fault"] >= 0 and pt["harness"]["median"]["ipis-per-fault"] >= 0
    assert "CPU per fault" in p.stdout and "dest ratio" in p.stdout
    assert doc["reproduce"].startswith("python bench/compare_ref.py")
    assert doc["tool-version"] and doc["started-at"] and doc["host"]["cpus"] >= 1 and doc["argv"]


@pytest.mark.kernel
@requires_uffd
@can_build
def test_both_placements_are_sides_of_one_run(tmp_path, clean_machine):
    out = tmp_path / "c.json"
    p = compare("--vcpus", "2", "--ram", "2M", "--repeat", "3", "--rounds", "2", "--place", "copy,continue",
                "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "continue" in p.stdout and "--place copy,continue" in p.stdout
    (pt,) = json.loads(out.read_text())["points"]
    assert len(pt["ref"]["runs"]) == 3
    for place in ("copy", "continue"):
        side = pt["by-place"][place]
        assert len(side["runs"]) == 3 and side["ratio"] > 0 and side["p50-ratio"] > 0
    assert pt["harness"]["runs"] == pt["by-place"]["copy"]["runs"]  # the first --place, as before


@pytest.mark.kernel
@requires_uffd
@can_build
def test_pinned_and_shared_workload(clean_machine):
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("--pin needs CPUs 0 and 1")
    if "pin" not in {f.name for f in dataclasses.fields(RunConfig)}:
        pytest.skip("this harness has no RunConfig.pin yet")
    p = compare("--vcpus", "2", "--ram", "2M", "--repeat", "2", "--rounds", "2", "--pin", "--workload", "shared")
    assert p.returncode == 0, p.stderr
    assert "pinned" in p.stdout and "-p same -A" in p.stdout
    assert sorted(table_rows(p.stdout)) == [2]


@pytest.mark.kernel
@requires_uffd
@can_build
def test_hugetlb_reserves_and_restores_the_pool(clean_machine):
    if os.geteuid() != 0:
        pytest.skip("--reserve-hugepages needs root")
    before = Path(HUGEPAGES).read_text()
    p = compare("--vcpus", "1", "--ram", "4M", "--repeat", "1", "--rounds", "2", "--backing", "hugetlb",
                "--reserve-hugepages")
    assert Path(HUGEPAGES).read_text() == before
    assert p.returncode == 0, p.stderr
    assert "hugetlb" in p.stdout and "-H" in p.stdout


@pytest.mark.parametrize("argv, words", [
    (["--rounds", "1"], "--rounds"),
    (["--vcpus", "3", "--ram", "4M"], "split evenly"),
    (["--vcpus", "1,a"], "--vcpus"),
    (["--ram", "1536K"], "whole MiB"),
    (["--repeat", "0"], "--repeat"),
    (["--reference-source", "/nonexistent/ref.c"], "--reference-source"),
    (["--reserve-hugepages"], "--backing hugetlb"),
    (["--place", "copy,copy"], "--place"),
    pytest.param(["--rounds", "100", "--workload", "shared"], "at most", marks=can_build),  # read from the source
])
def test_bad_input_is_one_line_and_exit_2(argv, words):
    p = compare(*argv)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare_ref: ") and words in lines[0], p.stderr
    assert p.stdout == ""


def test_reads_the_warm_line():
    mod = load_module()
    text = (
        "mp round1 N=2 pat=seq psz=4096 npages=1024 rounds=1..1 policy=dedup wall_s=0.02 installs=1024 "
        "msgs=1024 faults_per_s=51611 flt_p50_us=24.96 flt_p99_us=53.59\n"
        "mp WARM N=2 pat=seq psz=4096 npages=1024 rounds=2..3 policy=dedup pinned wall_s=0.0425 installs=2048 "
        "msgs=2048 faults_per_s=48207 GiB_per_s=0.184 flt_mean_us=28.94 flt_p50_us=25.50 flt_p99_us=66.25\n"
        "# totals: installs=3072 msgs=3072 eexist=0 verify_err=0 verified_pages=3072\n"
    )
    row = mod.parse_reference(text)
    assert (row["faults_per_s"], row["flt_p50_us"], row["flt_p99_us"]) == (48207.0, 25.5, 66.25)
    assert row["rounds"] == "2..3" and row["verify_err"] == 0.0
    with pytest.raises(mod.BenchError):
        mod.parse_reference(text.splitlines()[0])
