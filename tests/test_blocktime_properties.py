"""Property tests over random traces: invariants of the exact engine, agreement of the fast and
per-event paths, and seed == exact wherever the seed's assumptions hold."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy_core.blocktime import (
    ENGINE_NAMES,
    EventColumns,
    Fault,
    Placed,
    TraceMeta,
    replay,
    replay_columns,
)

PAGE = 4096
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def random_trace(draw, max_vcpus: int = 4, max_events: int = 40):
    """Any mix of faults (vCPU, non-vCPU, with or without an already_received flag) and placements,
    with non-decreasing times; pages drawn from a small set so that collisions happen."""
    n = draw(st.integers(1, max_vcpus))
    count = draw(st.integers(0, max_events))
    t = draw(st.integers(0, 5_000_000))
    events = []
    for _ in range(count):
        t += draw(st.integers(0, 3_000_000))
        page = draw(st.integers(0, 5)) * PAGE
        if draw(st.booleans()):
            vcpu = draw(st.integers(-1, n - 1))
            ar = draw(st.sampled_from([None, None, None, False, True]))
            events.append(Fault(t, page, vcpu, 100 + vcpu, ar))
        else:
            events.append(Placed(t, page, draw(st.booleans())))
    return TraceMeta(vcpus=n, page_size=PAGE, source="synthetic"), events


@SETTINGS
@given(random_trace())
def test_columnar_equals_per_event(trace):
    meta, events = trace
    slow = replay(meta, events)
    fast = replay_columns(meta, EventColumns.from_events(events))
    for name in ENGINE_NAMES:
        assert fast[name] == slow[name], name


@SETTINGS
@given(random_trace())
def test_exact_invariants(trace):
    meta, events = trace
    r = replay(meta, events, ["exact"])["exact"]
    per = r["vcpu-blocktime-ns"]
    assert r["blocktime-ns"] <= min(per)
    assert all(0 <= x <= r["elapsed-ns"] for x in per)
    faults = sum(r["vcpu-faults"]) + r["non-vcpu-faults"]
    assert sum(r["postcopy-latency-dist"]) == faults - r["unresolved-faults"]


@st.composite
def well_behaved_trace(draw):
    """Traces where the seed's assumptions hold: whole milliseconds, each vCPU waits on at most one
    page at a time, no already-received faults, every fault resolved, no address shared between
    vCPUs' concurrent faults being resolved out of order (a page resolves all its waiters at once,
    which the seed handles too)."""
    n = draw(st.integers(1, 4))
    t = 1
    waiting: dict[int, int] = {}
    events = []
    next_page = 0
    for _ in range(draw(st.integers(0, 30))):
        t += draw(st.integers(0, 5))
        idle = [v for v in range(n) if v not in waiting]
        if idle and (not waiting or draw(st.booleans())):
            v = draw(st.sampled_from(idle))
            if waiting and draw(st.booleans()):
                page = draw(st.sampled_from(sorted(set(waiting.values()))))
            else:
                page = next_page
                next_page += 1
            waiting[v] = page
            events.append(Fault(t * 1_000_000, page * PAGE, v))
        elif waiting:
            page = draw(st.sampled_from(sorted(set(waiting.values()))))
            for v in [v for v, p in waiting.items() if p == page]:
                del waiting[v]
            events.append(Placed(t * 1_000_000, page * PAGE))
    for page in sorted(set(waiting.values())):
        t += 1
        events.append(Placed(t * 1_000_000, page * PAGE))
    return TraceMeta(vcpus=n, page_size=PAGE, source="synthetic"), events


@SETTINGS
@given(well_behaved_trace())
def test_seed_equals_exact_where_assumptions_hold(trace):
    meta, events = trace
    r = replay(meta, events)
    for key in ("postcopy-blocktime", "postcopy-vcpu-blocktime"):
        assert r["seed"][key] == r["exact"][key], key
        assert r["modern"][key] == r["exact"][key], key
