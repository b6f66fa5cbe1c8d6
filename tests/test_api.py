"""The Python API (postcopy_harness): traces, replay, engines, assert_blocktime, and live runs."""

from __future__ import annotations

import pytest

import postcopy_harness as ph
from postcopy_core.blocktime import replay_columns
from postcopy_core.blocktime.synth import synthetic_run
from tests.conftest import requires_uffd


@pytest.fixture
def synthetic():
    return synthetic_run(3, 30, seed=7, non_vcpu_faults=10)


def test_engine_names_follow_the_engines_package():
    from postcopy_core import blocktime

    assert ph.engine_names() == tuple(blocktime.ALL_ENGINE_NAMES)
    assert {"seed", "modern", "exact", "truth"} <= set(ph.engine_names())


def test_write_read_replay_roundtrip(tmp_path, synthetic):
    meta, cols = synthetic
    for name in ("t.trace", "t.trace.gz"):
        path = tmp_path / name
        assert ph.write_trace(path, meta, cols) == len(cols)
        meta2, cols2 = ph.read_trace(path)
        assert meta2.vcpus == 3 and len(cols2) == len(cols)
        direct = replay_columns(meta, cols, ph.engine_names())
        assert ph.replay(path) == direct  # every engine by default
        assert ph.replay(path, engines=["seed"]) == {"seed": direct["seed"]}
        assert ph.replay(path, engines="modern") == {"modern": direct["modern"]}
        assert ph.replay_events(meta, cols.to_events()) == direct  # event objects: same numbers
    assert sum(direct["exact"]["postcopy-vcpu-blocktime"]) > 0


def test_replay_bad_input_is_a_blocktime_error(tmp_path, synthetic):
    with pytest.raises(ph.BlocktimeError, match="cannot open"):
        ph.replay(tmp_path / "missing.trace")
    path = tmp_path / "t.trace"
    ph.write_trace(path, *synthetic)
    with pytest.raises(ph.BlocktimeError, match="unknown engine 'nope'"):
        ph.replay(path, engines=["nope"])
    with pytest.raises(ph.BlocktimeError, match="unknown format"):
        ph.replay(path, format="csv")


def test_assert_blocktime_passes_within_tolerance(synthetic):
    engines = replay_columns(*synthetic, ph.engine_names())
    exact = engines["exact"]
    report = {"engines": engines}
    ph.assert_blocktime(report, "exact", exact["postcopy-vcpu-blocktime"], tolerance_ms=0)
    ph.assert_blocktime(engines, "exact", exact, tolerance_ms=0)  # an engines dict works too
    ph.assert_blocktime(report, "exact", "exact", tolerance_ms=0)
    shifted = [x + 1 for x in exact["postcopy-vcpu-blocktime"]]
    ph.assert_blocktime(report, "exact", shifted, tolerance_ms=1)


def test_assert_blocktime_failure_prints_a_per_vcpu_table():
    engines = {"seed": {"postcopy-blocktime": 5, "postcopy-vcpu-blocktime": [10, 20, 30]}}
    with pytest.raises(AssertionError) as exc:
        ph.assert_blocktime(engines, "seed", {"postcopy-vcpu-blocktime": [10, 25, 29.5], "postcopy-blocktime": 9},
                            tolerance_ms=1)
    lines = str(exc.value).splitlines()
    assert lines[0] == "blocktime of engine seed vs expected: 1 of 3 vCPUs and the total off by more than 1 ms"
    assert lines[1].split() == ["vCPU", "expected", "ms", "got", "ms", "difference"]
    assert lines[2].split() == ["0", "10", "10", "+0"]
    assert lines[3].split() == ["1", "25", "20", "-5", "!"]
    assert lines[4].split() == ["2", "29.5", "30", "+0.5"]
    assert lines[5].split() == ["total", "9", "5", "-4", "!"]


def test_assert_blocktime_wrong_shapes():
    engines = {"seed": {"postcopy-blocktime": 0, "postcopy-vcpu-blocktime": [1, 2]}}
    with pytest.raises(AssertionError, match="2 vCPUs in the report, 3 expected"):
        ph.assert_blocktime(engines, "seed", [1, 2, 3], 1)
    with pytest.raises(AssertionError, match="no engine 'truthy'"):
        ph.assert_blocktime(engines, "truthy", [1, 2], 1)
    with pytest.raises(KeyError, match="no engine 'exact'"):
        ph.assert_blocktime(engines, "seed", "exact", 1)


def test_run_options_are_the_run_flags():
    from harness.cli import build_parser

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run_parser._actions} - {"help", "version", "quiet", "live"}  # display-only flags
    assert set(ph.run_options()) == dests


@pytest.mark.parametrize("options, message", [
    ({"vcpus": 0}, "--vcpus 0: must be 1..4096"),
    ({"ram": "12Q"}, "bad size '12Q'"),
    ({"vcpu": 2}, "unknown run option 'vcpu'"),
    ({"vcpus": "3"}, "bad run option value"),
])
def test_run_bad_options_are_config_errors(options, message):
    with pytest.raises(ph.ConfigError, match=message):
        ph.run(**options)


@pytest.mark.kernel
@requires_uffd
def test_run_returns_the_report_and_replays_to_it(tmp_path, clean_machine):
    trace = tmp_path / "run.trace"
    rep = ph.run(vcpus=2, ram="4M", workload="shared", background=False, trace=trace, json=tmp_path / "r.json")
    assert rep["status"] == "completed" and rep["vcpus"] == 2
    assert rep["faults"]["vcpu"] > 0
    assert ph.replay(trace) == rep["engines"]  # a live run's trace replays to its own numbers
    assert (tmp_path / "r.json").stat().st_size > 0


@pytest.mark.kernel
@requires_uffd
def test_failed_run_raises_with_its_report(clean_machine):
    with pytest.raises(ph.RunError, match="did not finish within --timeout") as exc:
        ph.run(vcpus=2, ram="64M", workload="sequential", link="10mbit", background=False, timeout=0.5)
    assert exc.value.report["status"] == "failed"
    rep = ph.run(vcpus=2, ram="64M", workload="sequential", link="10mbit", background=False, timeout=0.5,
                 check=False)
    assert rep["status"] == "failed" and "--timeout" in rep["error"]
