"""The vectorised and the indexed seed engines give exactly what the scanning reference gives, flaws included:
overwrites, the already_received undo (and the count going low), offsets below 1 ms, the uint32 wrap
of the offset (a fault at offset 0 is never ended), exact-address matching at placements, non-vCPU
faults ignored, and bad vCPU numbers rejected the same way."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy_core.blocktime import BlocktimeError, EventColumns, Fault, Placed, TraceMeta
from postcopy_core.blocktime.seed import IndexedSeedEngine, SeedEngine, compute_columns, compute_columns_per_event
from postcopy_core.blocktime.synth import synthetic_run

PAGE = 4096
MS = 1_000_000
WRAP_NS = (1 << 32) * MS  # the offset that masks to 0
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def seed_trace(draw):
    n = draw(st.integers(1, 5))
    start = draw(st.sampled_from([0, 7 * MS + 300, 10**12]))
    # times: near the start (offsets < 1 ms), ordinary, or around the uint32 wrap
    base = start + draw(st.sampled_from([0, 0, 5 * MS, WRAP_NS - 3 * MS, WRAP_NS]))
    t = base
    events = []
    for _ in range(draw(st.integers(0, 60))):
        t += draw(st.sampled_from([0, 1, 400_000, MS, 3 * MS]))
        # a few pages, and addresses inside a page (the seed's end matches the exact address)
        addr = draw(st.integers(0, 3)) * PAGE + draw(st.sampled_from([0, 0, 0, 8]))
        if draw(st.integers(0, 2)):
            vcpu = draw(st.integers(-2, n - 1))
            ar = draw(st.sampled_from([None, None, False, True]))
            events.append(Fault(t, addr, vcpu, 0, ar))
        else:
            events.append(Placed(t, addr))
    return TraceMeta(vcpus=n, page_size=PAGE, start_ns=start), EventColumns.from_events(events)


@SETTINGS
@given(seed_trace())
def test_vectorised_seed_equals_the_per_event_engine(trace):
    meta, cols = trace
    assert compute_columns(meta, cols) == compute_columns_per_event(meta, cols)


@pytest.mark.parametrize("vcpus", [1, 3, 64])
def test_vectorised_seed_on_synthetic_runs(vcpus):
    meta, cols = synthetic_run(vcpus, 40, seed=vcpus, non_vcpu_faults=20)
    got = compute_columns(meta, cols)
    assert got == compute_columns_per_event(meta, cols)
    assert sum(got["postcopy-vcpu-blocktime"]) > 0  # the comparison is not between two empty results


def test_bad_vcpu_is_rejected_like_the_per_event_engine():
    meta = TraceMeta(vcpus=2, page_size=PAGE)
    cols = EventColumns.from_events([Fault(1, 0, 1), Fault(2, PAGE, 5), Fault(3, 0, 7)])
    for fn in (compute_columns, compute_columns_per_event):
        with pytest.raises(BlocktimeError, match="vCPU 5 "):
            fn(meta, cols)


def feed(engine, events, restore_at: int | None = None):
    """Feed events; with ``restore_at``, snapshot there, run on, undo and run on again (the importer's
    trial interleavings)."""
    affected = []
    for i, ev in enumerate(events):
        if i == restore_at:
            snap = engine.snapshot()
            for later in events[i:]:
                engine.fault(later) if type(later) is Fault else engine.placed(later)
            engine.restore(snap)
        affected.append(engine.fault(ev) if type(ev) is Fault else engine.placed(ev))
    return affected, engine.result()


@SETTINGS
@given(seed_trace(), st.integers(0, 60))
def test_indexed_seed_equals_the_scanning_engine(trace, cut):
    meta, cols = trace
    events = cols.to_events()
    cut = cut if cut < len(events) else None
    assert feed(IndexedSeedEngine(meta), events, cut) == feed(SeedEngine(meta), events, cut)
