"""Hand-computed cases for the three engines (times in ms unless noted)."""

from __future__ import annotations

import pytest

from postcopy_core.blocktime import (
    BlocktimeError,
    EventColumns,
    Fault,
    Placed,
    TraceMeta,
    make_engine,
    replay,
    replay_columns,
)
from postcopy_core.blocktime.common import latency_bucket, latency_histogram

MS = 1_000_000
PAGE = 4096
A, B, C, D, E, X = (k * PAGE for k in range(1, 7))


def meta(n: int, start_ms: int = 0) -> TraceMeta:
    return TraceMeta(vcpus=n, page_size=PAGE, start_ns=start_ms * MS, source="synthetic")


def run(n: int, events: list, start_ms: int = 0) -> dict:
    m = meta(n, start_ms)
    slow = replay(m, events)
    fast = replay_columns(m, EventColumns.from_events(events))
    assert slow == fast  # the vectorised replay must agree with the live per-event engines
    return slow


def F(t_ms: float, addr: int, vcpu: int, ar: bool | None = None) -> Fault:
    return Fault(int(t_ms * MS), addr, vcpu, 0, ar)


def P(t_ms: float, addr: int) -> Placed:
    return Placed(int(t_ms * MS), addr)


def test_three_vcpu_picture_from_the_seed_comment():
    # S1, S2, E1, S3, S1, E2, E3, E1: only S1..E2 (50..60) has all three vCPUs blocked.
    events = [F(10, A, 0), F(20, B, 1), P(30, A), F(40, C, 2), F(50, D, 0), P(60, B), P(70, C), P(80, D)]
    r = run(3, events)
    for name in ("seed", "modern", "exact"):
        assert r[name]["postcopy-blocktime"] == 10, name
        assert r[name]["postcopy-vcpu-blocktime"] == [50, 40, 30], name
    assert r["modern"]["vcpu-faults"] == [2, 1, 1]
    assert r["modern"]["postcopy-latency"] == 30 * MS  # (20 + 30 + 40 + 30) / 4
    assert r["modern"]["postcopy-vcpu-latency"] == [25 * MS, 40 * MS, 30 * MS]
    assert r["exact"]["blocktime-ns"] == 10 * MS


def test_reentrant_fault_overwrites_the_first():
    # vCPU1 faults on B, then on C before B's placement is processed: the seed forgets B.
    events = [F(10, A, 0), F(20, B, 1), F(25, C, 1), P(30, B), P(40, A), P(45, C)]
    r = run(2, events)
    assert r["seed"]["postcopy-vcpu-blocktime"] == [30, 20]  # vCPU1 only 25..45
    assert r["seed"]["postcopy-blocktime"] == 15  # last_begin moved to 25
    assert r["exact"]["postcopy-vcpu-blocktime"] == [30, 25]  # 20..45
    assert r["exact"]["postcopy-blocktime"] == 20  # 20..40
    # 10.1 keeps both entries but charges vCPU1 only the wait of the entry that unblocks it (C: 20).
    assert r["modern"]["postcopy-vcpu-blocktime"] == [30, 20]
    assert r["modern"]["postcopy-blocktime"] == 20
    assert r["modern"]["vcpu-faults"] == [1, 2]


def test_seed_total_can_exceed_a_vcpus_own_blocktime():
    # vCPU0's fault on A is overwritten by E before A's end is seen: its 10..33 stall is lost, yet the
    # total keeps the all-down time 20..30 that needed vCPU0 blocked.
    events = [F(10, A, 0), F(20, B, 1), P(30, B), F(32, C, 1), F(33, E, 0), P(34, A), P(40, C), P(41, E)]
    r = run(2, events)
    assert r["seed"]["postcopy-vcpu-blocktime"] == [8, 18]
    assert r["seed"]["postcopy-blocktime"] == 17
    assert r["seed"]["postcopy-blocktime"] > min(r["seed"]["postcopy-vcpu-blocktime"])
    assert r["exact"]["postcopy-vcpu-blocktime"] == [31, 18]
    assert r["exact"]["postcopy-blocktime"] == 18


def test_already_received_undo_forgets_a_pending_fault():
    # X arrives, then vCPU0 (still blocked on A) reports a fault on X: the undo clears its slot and
    # drops smp_cpus_down, so A's stall is never counted.
    events = [F(10, A, 0), P(15, X), F(20, X, 0), P(30, A)]
    r = run(1, events)
    assert r["seed"]["postcopy-vcpu-blocktime"] == [0]
    assert r["seed"]["postcopy-blocktime"] == 0
    assert r["seed"]["vcpus-down-at-end"] == 0
    assert r["exact"]["postcopy-vcpu-blocktime"] == [20]
    assert r["exact"]["already-received-faults"] == 1
    assert r["modern"]["postcopy-vcpu-blocktime"] == [20]  # 10.1 ignores the late fault
    assert r["modern"]["vcpu-faults"] == [1]


def test_already_received_flag_overrides_the_engines_view():
    eng = make_engine("seed", meta(2))
    eng.fault(F(5, A, 1))
    eng.fault(F(10, B, 0, ar=True))  # nothing placed yet, but the handler saw it received
    assert eng.begin_time_logged(0) == 0
    assert eng.cpus_down == 1  # vCPU1 only
    r = run(1, [P(1, A), F(10, A, 0, ar=False), P(12, A)])
    assert r["seed"]["postcopy-vcpu-blocktime"] == [2]
    assert r["exact"]["postcopy-vcpu-blocktime"] == [2]


def test_uint32_wrap_of_the_millisecond_offset():
    wrap = 2**32
    r = run(1, [F(wrap - 5, A, 0), P(wrap + 3, A)])
    assert r["seed"]["postcopy-vcpu-blocktime"] == [8]  # uint32 subtraction survives the wrap
    assert r["seed"]["postcopy-blocktime"] == 8
    # An offset of exactly 2**32 ms masks to 0, which means "no fault": the vCPU stays down forever.
    r = run(1, [F(wrap, A, 0), P(wrap + 10, A)])
    assert r["seed"]["postcopy-vcpu-blocktime"] == [0]
    assert r["seed"]["vcpus-down-at-end"] == 1
    assert r["exact"]["postcopy-vcpu-blocktime"] == [10]


def test_offsets_below_one_ms_become_one():
    r = run(1, [F(100.5, A, 0), P(105, A)], start_ms=100)
    assert r["seed"]["postcopy-vcpu-blocktime"] == [4]  # offset 0 -> 1, end at 5
    assert r["exact"]["vcpu-blocktime-ns"] == [int(4.5 * MS)]


def test_idle_vcpu_keeps_every_total_at_zero():
    events = [F(1, A, 0), P(11, A), F(20, B, 0), P(25, B)]
    r = run(2, events)
    for name in ("seed", "modern", "exact"):
        assert r[name]["postcopy-blocktime"] == 0, name
        assert r[name]["postcopy-vcpu-blocktime"] == [15, 0], name
    assert r["modern"]["postcopy-vcpu-latency"] == [int(7.5 * MS), 0]


def test_non_vcpu_faults_count_for_latency_only():
    events = [F(0, A, -1), F(1, B, 0), P(3, A), P(5, B)]
    r = run(1, events)
    assert r["seed"]["postcopy-vcpu-blocktime"] == [4]
    for name in ("modern", "exact"):
        assert r[name]["postcopy-non-vcpu-latency"] == 3 * MS, name
        assert r[name]["non-vcpu-faults"] == 1, name
        assert r[name]["postcopy-latency"] == (3 * MS + 4 * MS) // 2, name
        assert r[name]["postcopy-vcpu-blocktime"] == [4], name
        assert r[name]["postcopy-blocktime"] == 4, name
        assert sum(r[name]["postcopy-latency-dist"]) == 2, name


def test_same_vcpu_same_address_twice_in_modern():
    # Two entries (vCPU0, A): the older one unblocks it last and is the one charged.
    r = run(1, [F(10, A, 0), F(15, A, 0), P(20, A)])
    assert r["modern"]["postcopy-vcpu-blocktime"] == [10]
    assert r["modern"]["vcpu-faults"] == [2]
    assert r["modern"]["postcopy-vcpu-latency"] == [5 * MS]
    assert r["modern"]["postcopy-blocktime"] == 10
    assert r["modern"]["postcopy-latency-dist"][12] == 1  # 5 ms = 5000 us -> 2^12
    assert r["modern"]["postcopy-latency-dist"][13] == 1  # 10 ms -> 2^13
    assert r["seed"]["postcopy-vcpu-blocktime"] == [5]
    assert r["exact"]["postcopy-vcpu-blocktime"] == [10]


@pytest.mark.parametrize(
    ("ns", "bucket"),
    [
        (0, 0),
        (999, 0),
        (1_000, 0),
        (1_999, 0),
        (2_000, 1),
        (3_999, 1),
        (4_000, 2),
        (1_023_999, 9),
        (1_024_000, 10),
        ((2**23) * 1000 - 1, 22),
        ((2**23) * 1000, 23),
        ((2**24) * 1000, 23),
        ((2**40) * 1000, 23),
    ],
)
def test_histogram_bucket_edges(ns, bucket):
    assert latency_bucket(ns) == bucket
    import numpy as np

    hist = latency_histogram(np.array([ns], dtype=np.int64))
    assert hist[bucket] == 1 and sum(hist) == 1


def test_histogram_through_the_modern_engine():
    us = 1000
    events = []
    for i, wait_us in enumerate([0, 1, 2, 3, 4, 7, 8, 2**24, 2**25]):
        events += [Fault(i * 10**12, (i + 1) * PAGE, 0), Placed(i * 10**12 + wait_us * us, (i + 1) * PAGE)]
    dist = run(1, events)["modern"]["postcopy-latency-dist"]
    assert dist[:4] == [2, 2, 2, 1]
    assert dist[23] == 2
    assert len(dist) == 24


def test_bad_input_is_a_blocktime_error():
    with pytest.raises(BlocktimeError, match="vCPU 3"):
        replay(meta(2), [F(1, A, 3)])
    with pytest.raises(BlocktimeError, match="unknown engine"):
        make_engine("fancy", meta(1))
    with pytest.raises(BlocktimeError, match="vcpus"):
        make_engine("seed", TraceMeta(vcpus=0, page_size=PAGE))
    with pytest.raises(BlocktimeError, match="vCPU 3"):
        replay_columns(meta(2), EventColumns.from_events([F(1, A, 3)]), ["modern"])


def test_unresolved_fault_stays_blocked_until_the_last_event():
    r = run(2, [F(0, A, 0), F(2, B, 1), P(5, B), P(9, C)])
    assert r["exact"]["unresolved-faults"] == 1
    assert r["exact"]["postcopy-vcpu-blocktime"] == [9, 3]
    assert r["exact"]["postcopy-blocktime"] == 3
    assert r["seed"]["postcopy-vcpu-blocktime"] == [0, 3]
