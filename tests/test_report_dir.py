"""``--report DIR``: the folder's files exist and are valid (PNG, report JSON, Perfetto trace JSON),
for real runs, replays and load tests; the pieces the pictures are made of, on small known inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from harness.cli import main
from harness.timeline import PLACE_KINDS, Lanes, all_stalled_spans, build_timeline, placements
from postcopy_core.blocktime import EventColumns, TraceMeta
from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED
from postcopy_core.blocktime.synth import synthetic_run
from postcopy_core.blocktime.trace import TraceWriter
from tests.conftest import requires_uffd

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("timeline.png", "latency.png", "placements.png")


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG, f"{path} is not a PNG"
    assert 1000 < os.path.getsize(path) < 300_000


def check_trace(path: str, vcpus: int, stalled: list[int], recorded_by: str) -> dict:
    """The Chrome Trace Event structure, and a stall slice on the track of every vCPU that stalled."""
    with open(path) as f:
        doc = json.load(f)
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    for ev in events:
        assert ev["ph"] in ("M", "X", "i", "C") and isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], float | int) and ev["ts"] >= 0 and isinstance(ev["name"], str)
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
        if ev["ph"] == "C":
            assert all(isinstance(v, int | float) for v in ev["args"].values())
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert [names[(1, v + 1)] for v in range(vcpus)] == [f"vCPU {v}" for v in range(vcpus)]
    slices = [e for e in events if e["ph"] == "X" and e["pid"] == 1 and e["tid"] > 0]
    for v in stalled:
        mine = [e for e in slices if e["tid"] == v + 1]
        assert mine, f"no stall slice for vCPU {v}"
        assert all({"page", "wait-us", "counted-by"} <= set(e["args"]) for e in mine)
        assert all(recorded_by in e["args"]["counted-by"] for e in mine)
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"pages received", "vCPUs down"} <= counters
    return doc


# ------------------------------------------------------------------ the pieces


def test_all_stalled_spans_are_where_every_vcpu_is_inside_an_interval():
    lanes = Lanes(np.array([0, 0, 1, 2], np.int32), np.array([0, 50, 10, 5]), np.array([40, 90, 60, 80]),
                  np.zeros(4, np.int64))
    assert all_stalled_spans(3, lanes) == [(10, 40), (50, 60)]
    assert all_stalled_spans(4, lanes) == []  # vCPU 3 never stalled
    touching = Lanes(np.array([0, 1], np.int32), np.array([0, 10]), np.array([10, 20]), np.zeros(2, np.int64))
    assert all_stalled_spans(2, touching) == []


def test_placements_say_how_each_page_came():
    ps = 4096
    meta = TraceMeta(1, ps, {}, start_ns=0)
    # page 1 faulted then placed (requested); page 2 placed with nobody waiting (sent ahead); page 3 a
    # zero page sent ahead; page 4 placed, then faulted on (already received: still sent ahead)
    cols = EventColumns.from_lists(
        [KIND_FAULT, KIND_PLACED, KIND_PLACED, KIND_PLACED, KIND_PLACED, KIND_FAULT],
        [1, 2, 3, 4, 5, 6], [ps, ps + 8, 2 * ps, 3 * ps, 4 * ps, 4 * ps], [0] * 6, [0] * 6, [-1, 0, 0, 1, 0, -1])
    t, kind, addr, requested = placements(meta, cols)
    assert [PLACE_KINDS[k] for k in kind] == ["requested", "sent ahead", "sent ahead zero", "sent ahead"]
    assert requested.tolist() == [True, False, False, False]
    assert t.tolist() == [2, 3, 4, 5]


def test_timeline_lanes_of_the_reentrant_stream():
    from harness.demo import _reentrant_stream

    meta, cols = _reentrant_stream()
    tl = build_timeline(meta, cols)
    ms = 1_000_000

    def rows(lane: Lanes) -> list[tuple[int, int, int]]:
        return sorted(zip(lane.vcpu.tolist(), (lane.start // ms).tolist(), (lane.end // ms).tolist(), strict=True))

    assert rows(tl.lanes["seed"]) == [(0, 10, 40), (1, 25, 45)]  # the seed lost vCPU 1's wait from 20 on B
    assert rows(tl.lanes["exact"]) == [(0, 10, 40), (1, 20, 30), (1, 25, 45)]
    assert tl.all_stalled_by == "truth" and [(a // ms, b // ms) for a, b in tl.all_stalled] == [(20, 40)]


# ------------------------------------------------------------------ replay --report (no kernel needed)


def test_replay_report_of_a_synthetic_trace(tmp_path, capsys):
    meta, cols = synthetic_run(3, 40, seed=3)
    trace = tmp_path / "s.trace"
    with TraceWriter(str(trace), meta) as w:
        w.write_many(cols.to_events())
    out = tmp_path / "rep"
    assert main(["replay", str(trace), "--report", str(out)]) == 0
    for name in PLOTS:
        assert_png(str(out / name))
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["engines"]) == {"seed", "modern", "exact"}
    assert rep["argv"][:2] == ["postcopy-harness", "replay"]
    assert "postcopy-blocktime" in (out / "summary.txt").read_text()
    check_trace(str(out / "trace.json"), 3, [0, 1, 2], "exact")  # no stall intervals: exact's
    said = capsys.readouterr().out.splitlines()[-1]
    assert said == f"report written to {out}: report.json, summary.txt, {', '.join(PLOTS)}, trace.json"
    assert (out / "trace.json").stat().st_mode & 0o777 == 0o600  # page addresses: guest data


def test_overlapping_handler_side_waits_go_to_a_second_track(tmp_path):
    from harness.demo import _reentrant_stream
    from harness.perfetto import OVERFLOW, trace_events

    meta, cols = _reentrant_stream()
    cols.stalls = None  # the handler's view only: vCPU 1 waits on B (20..30) and on C (25..45) at once
    doc = trace_events(build_timeline(meta, cols), {}, "t")
    slices = sorted((e["tid"], e["ts"], e["ts"] + e["dur"]) for e in doc["traceEvents"]
                    if e["ph"] == "X" and e["tid"] > 0)
    assert slices == [(1, 10_000.0, 40_000.0), (2, 20_000.0, 30_000.0), (2 + OVERFLOW, 25_000.0, 45_000.0)]
    for tid in {t for t, _, _ in slices}:  # every track nests
        mine = sorted((a, b) for t, a, b in slices if t == tid)
        assert all(b1 <= a2 or b2 <= b1 for (_, b1), (a2, b2) in zip(mine, mine[1:], strict=False))


def test_report_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "--vcpus", "1", "--ram", "1M", "--report", str(f)]) == 2
    assert main(["replay", "nothing.trace", "--report", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("is not a folder" in line for line in err)


# ------------------------------------------------------------------ real runs


@pytest.mark.kernel
@requires_uffd
def test_run_report_folder(tmp_path, clean_machine, capsys):
    out, js = tmp_path / "r", tmp_path / "r.json"
    argv = ["run", "--vcpus", "3", "--ram", "1M", "--workload", "random", "--link", "200mbit,1ms",
            "--no-background", "--report", str(out), "--json", str(js), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"report written to {out}: report.json, ")
    rep = json.loads((out / "report.json").read_text())
    assert rep == json.loads(js.read_text())  # the same report as --json
    for name in PLOTS:
        assert_png(str(out / name))
    summary = (out / "summary.txt").read_text()
    assert "blocktime [truth]" in summary and "\x1b[" not in summary
    stalled = [v for v, n in enumerate(rep["engines"]["truth"]["vcpu-faults"]) if n]
    assert stalled == [0, 1, 2]  # demand paging: every vCPU stalled
    doc = check_trace(str(out / "trace.json"), 3, stalled, "truth")
    received = [e["args"]["pages"] for e in doc["traceEvents"] if e["name"] == "pages received"]
    assert received[-1] == rep["pages"]["placed"]
    _load_in_trace_processor(str(out / "trace.json"))


def _load_in_trace_processor(path: str) -> None:
    """Load the trace with Perfetto's trace processor when one is installed and works offline."""
    try:
        from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig
    except ImportError:
        return
    try:
        tp = TraceProcessor(trace=path, config=TraceProcessorConfig(load_timeout=10))
    except Exception as e:  # no binary offline: nothing to check against
        pytest.skip(f"Perfetto trace processor unavailable offline: {e}")
    try:
        n = next(iter(tp.query("select count(*) as n from slice"))).n
        assert n > 0
    finally:
        tp.close()


@pytest.mark.kernel
@requires_uffd
def test_events_are_kept_only_with_report(tmp_path, clean_machine):
    from harness.config import RunConfig
    from harness.run import execute

    raw = execute(RunConfig(vcpus=1, ram=1 << 20, background=False).validate())
    assert raw["material"] is None
    raw = execute(RunConfig(vcpus=1, ram=1 << 20, background=False, report=str(tmp_path)).validate())
    meta, cols = raw["material"]
    assert len(cols) == raw["events"] and cols.stalls is not None and len(cols.stalls) > 0


@pytest.mark.kernel
@requires_uffd
def test_loadtest_report_folder(tmp_path, clean_machine, capsys):
    out = tmp_path / "lt"
    assert main(["loadtest", "--vcpus", "1,2", "--workload", "random", "--ram", "1M", "--report", str(out)]) == 0
    assert_png(str(out / "loadtest.png"))
    assert f"report written to {out}: report.json, summary.txt, loadtest.png" in capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert [p["vcpus"] for p in doc["points"]] == [1, 2]
    assert "faults/s" in (out / "summary.txt").read_text()
