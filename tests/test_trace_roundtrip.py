"""Property: whatever the live run writes, a replay of the file gives the live numbers exactly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from test_blocktime_properties import random_trace

from postcopy_core.blocktime import EventColumns, make_engine, replay, replay_columns
from postcopy_core.blocktime.synth import synthetic_run
from postcopy_core.blocktime.trace import TraceWriter, read_trace, read_trace_columns


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_trace(max_events=30))
def test_live_engines_equal_replay_of_their_trace(trace):
    meta, events = trace
    live = {name: make_engine(name, meta) for name in ("seed", "modern", "exact")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.trace.gz"
        with TraceWriter(path, meta) as w:  # what `run --trace` does alongside the engines
            for ev in events:
                for eng in live.values():
                    (eng.fault if hasattr(ev, "vcpu") else eng.placed)(ev)
                w.write(ev)
        live_results = {name: eng.result() for name, eng in live.items()}
        meta2, events2 = read_trace(path)
        assert events2 == events
        assert replay(meta2, events2) == live_results
        meta3, cols = read_trace_columns(path)
        assert replay_columns(meta3, cols) == live_results


def test_columnar_equals_per_event_on_a_larger_synthetic_run():
    meta, cols = synthetic_run(6, 400, seed=9, non_vcpu_faults=300, mean_wait_ns=1_500_000)
    events = cols.to_events()
    assert replay(meta, events) == replay_columns(meta, EventColumns.from_events(events))
