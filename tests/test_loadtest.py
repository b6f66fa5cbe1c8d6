"""The ``loadtest`` subcommand: rows, CSV and JSON columns, failed points, bad input, Ctrl-C.

Real sweeps are tiny (8 MiB, 1-2 vCPUs) and nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from harness import loadtest
from harness.config import RunConfig
from harness.reference import compiler
from harness.report import build_report
from tests.conftest import requires_uffd

TINY = ["--vcpus", "1,2", "--workload", "sequential,shared", "--ram", "8M", "--no-background"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["loadtest", *argv])


def sweep(tmp_path, argv: list[str]) -> tuple[int, list[dict], dict]:
    csv_path, json_path = tmp_path / "points.csv", tmp_path / "points.json"
    args = parse([*argv, "--csv", str(csv_path), "--json", str(json_path)])
    code = args.func(args)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == loadtest.COLUMNS
        rows = list(reader)
    return code, rows, json.loads(json_path.read_text())


def fake_report(vcpus: int, fps: float, p50: float, mx: float) -> dict:
    """A completed report with just the fields the loadtest row reads."""
    return {
        "status": "completed", "error": None,
        "faults": {"total": 100, "per-second": fps},
        "latency-us": {"p50": p50, "p99": 2 * p50, "max": mx},
        "engines": {"seed": {"postcopy-blocktime": 3}, "exact": {"postcopy-blocktime": 5}},
        "handler": {"cpu-s": 0.5}, "source": {"cpu-s": 0.25},
        "workers": {"vcpu-stall-ms": [1.0] * vcpus}, "duration-s": {"workload": 0.1},
    }


# ------------------------------------------------------------------ real sweeps


@pytest.mark.kernel
@requires_uffd
def test_tiny_sweep_writes_one_row_per_point(tmp_path, capsys, clean_machine):
    code, rows, doc = sweep(tmp_path, TINY)
    assert code == 0
    points = [(r["backing"], r["workload"], r["wake-policy"], int(r["vcpus"])) for r in rows]
    assert points == [("shmem", w, "waiters", n) for w in ("sequential", "shared") for n in (1, 2)]
    for r in rows:
        assert r["status"] == "completed" and r["error"] == ""
        assert int(r["ram-bytes"]) == 8 << 20 and r["repeats"] == "1"
        assert float(r["faults"]) > 0 and float(r["faults-per-s"]) > 0
        assert 0 < float(r["p50-us"]) <= float(r["p99-us"]) <= float(r["max-us"])
        assert float(r["handler-cpu-s"]) >= 0
    # the JSON holds the same rows plus each point's full run reports
    assert doc["status"] == "completed" and doc["columns"] == list(loadtest.COLUMNS)
    assert doc["sweep"]["vcpus"] == [1, 2] and doc["sweep"]["background"] is False
    assert len(doc["points"]) == 4
    for point, row in zip(doc["points"], rows, strict=True):
        assert point["workload"] == row["workload"] and point["vcpus"] == int(row["vcpus"])
        assert len(point["runs"]) == 1 and point["runs"][0]["status"] == "completed"
        engines = point["runs"][0].get("engines", {})
        for name in engines:  # a blocktime column for every engine the run reported
            assert row[f"blocktime-{name}-ms"] != ""
    out = capsys.readouterr()
    assert "faults/s" in out.out and "Traceback" not in out.err
    assert out.out.count("ok") >= 4


@pytest.mark.kernel
@requires_uffd
def test_repeat_and_wake_policies(tmp_path, clean_machine):
    code, rows, doc = sweep(tmp_path, ["--vcpus", "2", "--workload", "shared", "--ram", "4M",
                                       "--wake-policy", "waiters,all", "--repeat", "2", "--no-background"])
    assert code == 0
    assert [r["wake-policy"] for r in rows] == ["waiters", "all"]
    assert all(r["repeats"] == "2" for r in rows)
    assert [len(p["runs"]) for p in doc["points"]] == [2, 2]
    assert [p["runs"][0]["handler"]["wake-policy"] for p in doc["points"]] == ["waiters", "all"]


@pytest.mark.kernel
@requires_uffd
def test_hugetlb_without_huge_pages_is_a_failed_row(tmp_path, monkeypatch, capsys, clean_machine):
    # as if vm.nr_hugepages were 0, whatever other tests on this machine have reserved right now
    from harness import run as run_module

    monkeypatch.setattr(run_module, "free_huge_pages", lambda: 0)
    code, rows, doc = sweep(tmp_path, ["--vcpus", "1", "--workload", "sequential", "--ram", "8M",
                                       "--backing", "shmem,hugetlb"])
    assert code == 1
    assert [(r["backing"], r["status"]) for r in rows] == [("shmem", "completed"), ("hugetlb", "failed")]
    assert "huge pages" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[1]["faults-per-s"] == ""  # not measured, not zero
    assert doc["status"] == "failed" and doc["points"][1]["runs"][0]["status"] == "failed"
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "1 of 2 points failed" in out.err


@pytest.mark.kernel
@requires_uffd
def test_a_run_that_dies_names_the_cause(tmp_path, monkeypatch, capsys, clean_machine):
    """Past the run's huge page pre-check, the dying process's own stderr line ends up in the row."""
    from harness import run as run_module
    from postcopy_core.probe import free_huge_pages

    if free_huge_pages() >= (4 << 20) // (2 << 20):
        pytest.skip("huge pages are available here: the run would not fail")
    monkeypatch.setattr(run_module, "free_huge_pages", lambda: -1)
    code, rows, _ = sweep(tmp_path, ["--vcpus", "1", "--workload", "sequential", "--ram", "4M",
                                     "--backing", "hugetlb"])
    assert code == 1 and rows[0]["status"] == "failed"
    assert "ENOMEM" in rows[0]["error"] or "memory" in rows[0]["error"].lower()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.kernel
@requires_uffd
def test_hugetlb_point_with_reserved_pages(tmp_path, hugepages, clean_machine):
    hugepages(4)
    code, rows, _ = sweep(tmp_path, ["--vcpus", "1,2", "--workload", "sequential", "--ram", "8M",
                                     "--backing", "hugetlb", "--no-background"])
    assert code == 0, rows
    assert [r["status"] for r in rows] == ["completed", "completed"]


# ------------------------------------------------------------------ no kernel needed


@pytest.mark.parametrize("argv, words", [
    (["--vcpus", "1,x"], "--vcpus"),
    (["--vcpus", "1,,2"], "empty item"),
    (["--workload", "sequential,bogus"], "--workload"),
    (["--backing", "tmpfs"], "--backing"),
    (["--wake-policy", "some"], "--wake-policy"),
    (["--ram", "12q"], "--ram"),
    (["--ram", "8K", "--vcpus", "4", "--workload", "random"], "fewer than --vcpus 4"),
    (["--repeat", "0"], "--repeat"),
    (["--vcpus", "0"], "--vcpus 0"),
    (["--link", "fast"], "link"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    args = parse([*argv, "--csv", str(tmp_path / "x.csv")])
    assert args.func(args) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("postcopy-harness loadtest: ") and words in lines[0]
    assert "Traceback" not in out.err and out.out == ""
    assert not (tmp_path / "x.csv").exists() or (tmp_path / "x.csv").read_text() == ""


def test_unwritable_output_is_refused_up_front(tmp_path, capsys):
    args = parse(["--vcpus", "1", "--csv", str(tmp_path / "no" / "such" / "dir.csv")])
    assert args.func(args) == 2
    assert "--csv" in capsys.readouterr().err


def test_parse_list_keeps_order_and_drops_duplicates():
    assert loadtest.parse_list("64,1,8,1", "--vcpus", int) == [64, 1, 8]
    assert loadtest.parse_list(" shared , random", "--workload") == ["shared", "random"]


def test_row_is_medians_and_max_of_max():
    pt = loadtest.Point("shmem", "random", "waiters", 2)
    cfg = RunConfig(vcpus=2, ram=4 << 20)
    reports = [fake_report(2, f, p, m) for f, p, m in ((100.0, 5.0, 50.0), (300.0, 7.0, 90.0), (200.0, 6.0, 60.0))]
    row = loadtest.summarise(pt, cfg, reports)
    assert (row["faults-per-s"], row["p50-us"], row["p99-us"], row["max-us"]) == (200.0, 6.0, 12.0, 90.0)
    assert (row["blocktime-seed-ms"], row["blocktime-modern-ms"], row["blocktime-exact-ms"]) == (3, None, 5)
    assert row["status"] == "completed" and row["repeats"] == 3


def test_one_failed_repeat_fails_the_point():
    pt = loadtest.Point("shmem", "random", "waiters", 1)
    cfg = RunConfig(vcpus=1, ram=4 << 20)
    failed = build_report(cfg, None, "the fault handler (pid 7) was killed by SIGKILL")
    row = loadtest.summarise(pt, cfg, [fake_report(1, 10.0, 1.0, 2.0), failed])
    assert row["status"] == "failed" and "SIGKILL" in row["error"]
    assert row["faults-per-s"] == 10.0  # what the good run measured is kept


def test_ctrl_c_keeps_what_was_measured(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_once(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_report(cfg.vcpus, 1000.0, 10.0, 100.0), []

    monkeypatch.setattr(loadtest, "run_once", fake_run_once)
    csv_path, json_path = tmp_path / "p.csv", tmp_path / "p.json"
    args = parse(["--vcpus", "1,2,4", "--workload", "random", "--ram", "1M",
                  "--csv", str(csv_path), "--json", str(json_path)])
    assert args.func(args) == 130
    assert len(list(csv.DictReader(csv_path.open()))) == 1
    doc = json.loads(json_path.read_text())
    assert doc["status"] == "interrupted" and len(doc["points"]) == 1
    assert "interrupted after 1 of 3 points" in capsys.readouterr().err


can_build_reference = pytest.mark.skipif(compiler() is None, reason="needs a C compiler (cc, gcc or $CC)")


@pytest.mark.kernel
@requires_uffd
@can_build_reference
def test_reference_runs_beside_the_harness_where_it_can(tmp_path, capsys, clean_machine):
    """The reference's columns at the points it supports; at the others, why not; the plot draws them."""
    code, rows, doc = sweep(tmp_path, ["--vcpus", "1,2048", "--workload", "sequential", "--ram", "8M",
                                       "--no-background", "--reference", "--report", str(tmp_path / "rep")])
    assert code == 0
    one, many = rows
    assert float(one["ref-faults-per-s"]) > 0 and float(one["ref-p50-us"]) > 0 and one["ref-error"] == ""
    assert many["ref-faults-per-s"] == "" and "at most 1024 workers" in many["ref-error"]
    assert doc["sweep"]["reference"] is True
    assert doc["points"][0]["reference-runs"][0]["command"].startswith("uffd_ref -m mp -n 1 -s 8 ")
    assert (tmp_path / "rep" / "loadtest.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "ref f/s" in out and "ratio" in out
