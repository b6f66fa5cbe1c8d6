"""The truth engine over hand-built stall intervals, against a brute-force oracle, and at scale."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy_core.blocktime import (
    ALL_ENGINE_NAMES,
    TRUTH,
    BlocktimeError,
    EventColumns,
    Fault,
    Placed,
    StallColumns,
    TraceMeta,
    make_engine,
    replay_columns,
    truth_result,
)

MS = 1_000_000
US = 1_000


def meta(n: int) -> TraceMeta:
    return TraceMeta(vcpus=n, page_size=4096, source="synthetic")


def truth(n: int, intervals: list[tuple[int, float, float]]) -> dict:
    """intervals: (vcpu, start ms, end ms)."""
    stalls = StallColumns.from_lists(
        [v for v, _, _ in intervals], [int(s * MS) for _, s, _ in intervals], [int(e * MS) for _, _, e in intervals]
    )
    return truth_result(meta(n), stalls)


def test_none_stalled():
    r = truth(3, [])
    assert r["postcopy-blocktime"] == 0 and r["blocktime-ns"] == 0
    assert r["postcopy-vcpu-blocktime"] == [0, 0, 0]
    assert r["postcopy-latency"] == 0 and r["postcopy-vcpu-latency"] == [0, 0, 0]
    assert r["postcopy-latency-dist"] == [0] * 24
    assert r["vcpu-faults"] == [0, 0, 0] and r["non-vcpu-faults"] == 0


def test_one_vcpu_all_its_stalls_are_the_total():
    r = truth(1, [(0, 0, 2), (0, 5, 5.5), (0, 10, 14)])
    assert r["vcpu-blocktime-ns"] == [int(6.5 * MS)]
    assert r["blocktime-ns"] == int(6.5 * MS)  # one vCPU: stalled at all == all stalled
    assert r["postcopy-blocktime"] == 6 and r["postcopy-vcpu-blocktime"] == [6]
    assert r["vcpu-faults"] == [3]
    assert r["postcopy-vcpu-latency"] == [int(6.5 * MS) // 3] == [r["postcopy-latency"]]
    # 2 ms -> 2^10 us bucket (1024..2047 us is bucket 10; 2000 us), 0.5 ms -> bucket 8, 4 ms -> 11
    dist = r["postcopy-latency-dist"]
    assert dist[10] == 1 and dist[8] == 1 and dist[11] == 1 and sum(dist) == 3


def test_overlapping_intervals_of_one_vcpu_count_once():
    # the same vCPU cannot really overlap itself, but the measure is of the union all the same
    r = truth(2, [(0, 0, 4), (0, 2, 6), (0, 6, 7), (1, 1, 3)])
    assert r["vcpu-blocktime-ns"] == [7 * MS, 2 * MS]
    assert r["blocktime-ns"] == 2 * MS  # vCPU 1's [1, 3) lies inside vCPU 0's stall
    assert r["postcopy-vcpu-latency"] == [7 * MS // 3, 2 * MS]
    assert r["postcopy-latency"] == 9 * MS // 4


def test_overlaps_between_vcpus_only_where_all_stalled():
    r = truth(3, [(0, 0, 10), (1, 2, 6), (1, 8, 12), (2, 4, 9)])
    assert r["vcpu-blocktime-ns"] == [10 * MS, 8 * MS, 5 * MS]
    # all three: [4, 6) and [8, 9)
    assert r["blocktime-ns"] == 3 * MS and r["postcopy-blocktime"] == 3
    assert r["blocktime-ns"] <= min(r["vcpu-blocktime-ns"])


def test_all_vcpus_stalled_at_once():
    r = truth(4, [(v, 1, 3) for v in range(4)])
    assert r["vcpu-blocktime-ns"] == [2 * MS] * 4
    assert r["blocktime-ns"] == 2 * MS


def test_a_vcpu_that_never_stalled_means_no_total():
    r = truth(3, [(0, 0, 10), (1, 0, 10)])
    assert r["vcpu-blocktime-ns"] == [10 * MS, 10 * MS, 0]
    assert r["blocktime-ns"] == 0


def test_touching_intervals_are_no_overlap():
    r = truth(2, [(0, 0, 5), (1, 5, 9)])
    assert r["blocktime-ns"] == 0


def test_histogram_clamps_like_modern():
    stalls = StallColumns.from_lists([0, 0, 0], [0, 0, 0], [500, 3 * US, 3600 * 10**9])
    dist = truth_result(meta(1), stalls)["postcopy-latency-dist"]
    assert dist[0] == 1 and dist[1] == 1 and dist[23] == 1


def test_bad_intervals_are_one_line_errors():
    with pytest.raises(BlocktimeError, match="vCPU 3 but the trace declares 2"):
        truth(2, [(3, 0, 1)])
    with pytest.raises(BlocktimeError, match="ends before it starts"):
        truth(2, [(1, 5, 1)])
    with pytest.raises(BlocktimeError, match="vCPUs only"):
        truth(2, [(-1, 0, 1)])
    with pytest.raises(BlocktimeError, match="stall intervals, not events"):
        make_engine(TRUTH, meta(1))


def test_replay_columns_gives_truth_only_with_intervals():
    events = [Fault(MS, 0x1000, 0), Placed(2 * MS, 0x1000)]
    cols = EventColumns.from_events(events)
    assert TRUTH not in replay_columns(meta(1), cols)
    cols.stalls = StallColumns.from_lists([0], [int(0.5 * MS)], [int(2.1 * MS)])
    res = replay_columns(meta(1), cols)
    assert set(res) == set(ALL_ENGINE_NAMES)
    assert res[TRUTH]["vcpu-blocktime-ns"] == [int(1.6 * MS)]
    assert res["exact"]["vcpu-blocktime-ns"] == [MS]  # the handler's view is shorter than the vCPU's
    assert replay_columns(meta(1), cols, [TRUTH]) == {TRUTH: res[TRUTH]}


@st.composite
def intervals(draw):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(0, 25))
    rows = []
    for _ in range(k):
        s = draw(st.integers(0, 60))
        rows.append((draw(st.integers(0, n - 1)), s, s + draw(st.integers(0, 20))))
    return n, rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(intervals())
def test_matches_a_brute_force_timeline(case):
    """Every ns tick (here: unit) checked one by one: per vCPU covered ticks, ticks all covered."""
    n, rows = case
    grid = np.zeros((n, 100), dtype=bool)
    for v, s, e in rows:
        grid[v, s:e] = True
    stalls = StallColumns.from_lists([v for v, _, _ in rows], [s for _, s, _ in rows], [e for _, _, e in rows])
    r = truth_result(meta(n), stalls)
    assert r["vcpu-blocktime-ns"] == grid.sum(axis=1).tolist()
    assert r["blocktime-ns"] == int(grid.all(axis=0).sum())
    assert r["blocktime-ns"] <= min(r["vcpu-blocktime-ns"])
    assert sum(r["postcopy-latency-dist"]) == len(rows) == sum(r["vcpu-faults"])


def test_a_million_intervals_in_well_under_a_second():
    rng = np.random.default_rng(5)
    n, k = 64, 1_000_000
    vcpu = rng.integers(0, n, k).astype(np.int32)
    start = np.sort(rng.integers(0, 10**10, k)).astype(np.int64)
    end = start + rng.integers(1_000, 2_000_000, k)
    stalls = StallColumns(vcpu=vcpu, start_ns=start, end_ns=end, addr=np.zeros(k, np.int64))
    t0 = time.perf_counter()
    r = truth_result(meta(n), stalls)
    elapsed = time.perf_counter() - t0
    assert sum(r["vcpu-faults"]) == k
    assert elapsed < 2.0, f"{elapsed:.2f} s for 1M intervals"  # ~0.3 s alone; slack for a loaded machine
