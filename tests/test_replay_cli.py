"""The ``replay`` subcommand: table, JSON with the ``engines`` object, exit code 2 for bad input."""

from __future__ import annotations

import argparse
import json

from harness import replay as replay_cmd
from postcopy_core.blocktime import Fault, Placed, StallColumns, TraceMeta, replay
from postcopy_core.blocktime.trace import TraceWriter

MS = 1_000_000
EVENTS = [
    Fault(10 * MS, 0x1000, 0),
    Fault(20 * MS, 0x2000, 1),
    Placed(30 * MS, 0x1000),
    Placed(45 * MS, 0x2000),
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def make_trace(path) -> TraceMeta:
    meta = TraceMeta(vcpus=2, page_size=4096)
    with TraceWriter(path, meta) as w:
        w.write_many(EVENTS)
    return meta


def test_json_has_the_engines_object(tmp_path, capsys):
    trace = tmp_path / "run.trace.gz"
    meta = make_trace(trace)
    out = tmp_path / "out.json"
    args = parse(["replay", str(trace), "--json", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"seed", "modern", "exact"}
    assert report["engines"] == json.loads(json.dumps(replay(meta, EVENTS)))
    assert report["engines"]["seed"]["postcopy-blocktime"] == 10
    assert report["engines"]["exact"]["postcopy-vcpu-blocktime"] == [20, 25]
    table = capsys.readouterr().out
    assert "postcopy-blocktime" in table and "exact" in table


def test_single_engine_and_vcpus(tmp_path, capsys):
    trace = tmp_path / "run.trace"
    make_trace(trace)
    args = parse(["replay", str(trace), "--engine", "modern", "--vcpus", "3", "--json", "-"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["engines"]) == ["modern"]
    assert report["engines"]["modern"]["postcopy-vcpu-blocktime"] == [20, 25, 0]
    assert report["engines"]["modern"]["postcopy-blocktime"] == 0


def test_compare_with_query_migrate(tmp_path, capsys):
    trace = tmp_path / "run.trace"
    make_trace(trace)
    qm = tmp_path / "qm.json"
    qm.write_text(json.dumps({"postcopy-blocktime": 9, "postcopy-vcpu-blocktime": [20, 25]}))
    args = parse(["replay", str(trace), "--engine", "seed", "--compare", str(qm)])
    assert args.func(args) == 0
    assert "seed - query-migrate: blocktime +1 ms, per vCPU [0, 0] ms" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.trace"
    bad.write_text("#postcopy-harness-trace v1\nM {}\n")
    args = parse(["replay", str(bad)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err and "Traceback" not in err
    args = parse(["replay", str(tmp_path / "missing")])
    assert args.func(args) == 2


def test_truth_column_when_the_trace_has_stall_intervals(tmp_path, capsys):
    trace = tmp_path / "run.trace"
    meta = TraceMeta(vcpus=2, page_size=4096)
    with TraceWriter(trace, meta) as w:
        w.write_many(EVENTS)
        w.write_stalls(StallColumns.from_lists([0, 1], [9 * MS, 19 * MS], [31 * MS, 46 * MS]))
    out_json = tmp_path / "out.json"
    args = parse(["replay", str(trace), "--json", str(out_json)])
    assert args.func(args) == 0
    report = json.loads(out_json.read_text())
    assert list(report["engines"]) == ["seed", "modern", "exact", "truth"]
    assert report["stall-intervals"] == 2
    assert report["engines"]["truth"]["postcopy-vcpu-blocktime"] == [22, 27]
    assert report["engines"]["truth"]["postcopy-blocktime"] == 12  # [19, 31) ms both stalled
    assert "truth" in capsys.readouterr().out  # ...and a truth column in the table


def test_truth_asked_of_a_trace_without_intervals_exits_2(tmp_path, capsys):
    trace = tmp_path / "run.trace"
    make_trace(trace)
    args = parse(["replay", str(trace), "--engine", "truth"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no stall intervals" in err
