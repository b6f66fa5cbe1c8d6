"""Jitter and loss in the in-process link model: parsing, the draws, and what a real run sees."""

from __future__ import annotations

import pytest

import postcopy_harness
from postcopy_core.link import RTO_MIN_NS, Link, parse_link
from tests.conftest import requires_uffd


def test_parse_jitter_loss_rto():
    link = parse_link("1gbit,1ms,jitter=200us,loss=0.5%")
    assert (link.latency_ns, link.jitter_ns, link.loss, link.rto_ns) == (10**6, 200_000, 0.005, 0)
    assert link.retransmit_ns == RTO_MIN_NS  # 4 x 1 ms is below the 10 ms floor
    assert parse_link("1gbit,5ms,loss=1%").retransmit_ns == 20_000_000  # two round trips
    assert parse_link("1gbit,5ms,loss=1%,rto=3ms").retransmit_ns == 3_000_000
    assert parse_link("1gbit,1ms,jitter=200").jitter_ns == 200_000  # a bare number is us, as in tc
    assert not parse_link("unlimited,0,loss=1%").unlimited
    assert parse_link("1gbit,1ms,jitter=200us,loss=0.5%").describe() == (
        "1 Gbit/s (125 MB/s), 1 ms one-way, jitter +-0.2 ms, loss 0.5% (resent after 10 ms)")


@pytest.mark.parametrize("text, match", [
    ("1gbit,1ms,jitter=2ms", "jitter 2 ms is larger than the latency"),
    ("1gbit,1ms,loss=5", "bad loss '5'"),
    ("1gbit,1ms,loss=100%", "bad loss"),
    ("1gbit,1ms,jitter=fast", "bad jitter 'fast'"),
    ("1gbit,1ms,delay=1ms", "unknown delay="),
    ("1gbit,1ms,loss=1%,loss=2%", "loss= given twice"),
    ("1gbit,1ms,3", "expected BANDWIDTH"),
])
def test_bad_jitter_or_loss_is_one_line(text, match):
    with pytest.raises(ValueError, match=match) as ei:
        parse_link(text)
    assert "\n" not in str(ei.value) and str(ei.value).startswith(f"--link {text!r}: ")


def test_delays_are_uniform_around_the_latency_and_in_order_per_channel():
    d = parse_link("1gbit,2ms,jitter=1ms").delays(seed=3)
    draws = [d.one_way_ns() for _ in range(20_000)]
    assert 1_000_000 <= min(draws) < 1_020_000 and 2_980_000 < max(draws) <= 3_000_000
    assert abs(sum(draws) / len(draws) - 2_000_000) < 20_000
    arrivals = [d.arrival_ns(i * 1000, "stream") for i in range(1000)]  # 1 us apart, +-1 ms jitter
    assert arrivals == sorted(arrivals)  # a stream never reorders: late ones hold back the rest
    lossy = Link(latency_ns=10**6, loss=0.1).delays(seed=1)
    draws = [lossy.one_way_ns() for _ in range(10_000)]
    assert set(draws) == {10**6, 10**6 + RTO_MIN_NS}
    assert 800 < lossy.lost < 1200
    assert Link(latency_ns=10**6).delays(1).one_way_ns() == 10**6


def _dist(rep: dict) -> list[int]:
    return rep["engines"]["truth"]["postcopy-latency-dist"]  # bucket N = [2^N, 2^(N+1)) us


@requires_uffd
@pytest.mark.kernel
def test_jitter_and_loss_change_what_the_vcpus_wait(clean_machine):
    """Demand paging over 3 ms each way: without jitter no fault can beat the 6 ms round trip
    (bucket 12 = 4.1..8.2 ms and up); with +-3 ms some do (~23 % below 4.1 ms).  Loss of 20 % with a
    60 ms resend puts about a third of the faults above 32 ms, where none are without it."""
    common = dict(vcpus=1, ram="512K", workload="random", background=False)
    plain = postcopy_harness.run(link="1gbit,3ms", **common)
    jitter = postcopy_harness.run(link="1gbit,3ms,jitter=3ms", **common)
    lossy = postcopy_harness.run(link="1gbit,3ms,loss=20%,rto=60ms", **common)
    n = plain["faults"]["total"]
    assert n >= 100
    assert sum(_dist(plain)[:12]) == 0, _dist(plain)
    assert sum(_dist(jitter)[:12]) >= 0.05 * n, _dist(jitter)
    slow_plain, slow_lossy = sum(_dist(plain)[15:]), sum(_dist(lossy)[15:])
    assert slow_lossy >= 0.15 * n and slow_lossy > slow_plain + 0.1 * n, (_dist(plain), _dist(lossy))
    for rep in (jitter, lossy):
        assert rep["verification"]["mismatches"] == 0


@requires_uffd
@pytest.mark.kernel
def test_latency_without_a_bandwidth_limit_runs(clean_machine):
    """``unlimited,LATENCY`` (and jitter alone) used to kill the source (no rate to size its messages by)."""
    rep = postcopy_harness.run(vcpus=1, ram="1M", link="unlimited,1ms,jitter=500us", background=False)
    assert rep["status"] == "completed" and rep["verification"]["mismatches"] == 0
    assert rep["latency-us"]["p50"] >= 1000  # two crossings of 0.5..1.5 ms each
