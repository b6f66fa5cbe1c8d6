"""The link model: ``--link BANDWIDTH[,LATENCY]`` parsing and wire time."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy_core.link import Link, parse_link

# tc(8)'s units, written out independently of the parser's tables
RATES = {
    "bit": Fraction(1, 8), "kbit": Fraction(1000, 8), "mbit": Fraction(10**6, 8), "gbit": Fraction(10**9, 8),
    "tbit": Fraction(10**12, 8), "kibit": Fraction(1024, 8), "mibit": Fraction(1024**2, 8),
    "gibit": Fraction(1024**3, 8), "tibit": Fraction(1024**4, 8),
    "bps": 1, "kbps": 1000, "mbps": 10**6, "gbps": 10**9, "tbps": 10**12,
    "kibps": 1024, "mibps": 1024**2, "gibps": 1024**3, "tibps": 1024**4,
}
TIMES = {"ns": 1, "us": 1000, "usec": 1000, "ms": 10**6, "msecs": 10**6, "s": 10**9, "sec": 10**9}


@pytest.mark.parametrize(
    "text, bytes_per_s, latency_ns",
    [
        ("1gbit,2ms", 125_000_000, 2_000_000),
        ("1Gbit, 2ms", 125_000_000, 2_000_000),
        ("100mbit,500us", 12_500_000, 500_000),
        ("500MBps", 500_000_000, 0),
        ("100mbps", 100_000_000, 0),  # tc: bps = bytes per second
        ("2GiBps", 2 * 1024**3, 0),
        ("1gibit", 1024**3 // 8, 0),
        ("1tbit", 125_000_000_000, 0),
        ("8000", 1000, 0),  # a bare number is bits per second, as in tc
        ("1gbit,1s", 125_000_000, 10**9),
        ("1gbit,250", 125_000_000, 250_000),  # a bare latency is microseconds, as in tc
        ("1.5gbit,0.25ms", 187_500_000, 250_000),
        ("10 kbit,7ns", 1250, 7),
        ("unlimited,5ms", None, 5_000_000),
        ("inf,1us", None, 1000),
        ("UNLIMITED", None, 0),
        ("none", None, 0),
        ("", None, 0),
        ("  ", None, 0),
        (None, None, 0),
    ],
)
def test_parse_link(text, bytes_per_s, latency_ns):
    link = parse_link(text)
    assert link.bytes_per_s == bytes_per_s
    assert link.latency_ns == latency_ns
    assert isinstance(link.latency_ns, int)


def test_unlimited():
    assert parse_link(None) == Link() and parse_link(None).unlimited
    assert not parse_link("unlimited,1ms").unlimited
    assert not parse_link("1gbit").unlimited


@pytest.mark.parametrize(
    "text, match",
    [
        ("fast", "bad bandwidth 'fast'"),
        ("1gbit,2ms,3", "expected BANDWIDTH\\[,LATENCY\\]"),
        ("1gbit,", "bad latency ''"),
        (",2ms", "bad bandwidth ''"),
        ("1gbit,fast", "bad latency 'fast'"),
        ("1gbit,2min", "bad latency '2min'"),
        ("1gbit,-2ms", "bad latency '-2ms'"),
        ("1gbit,2ms5", "bad latency"),
        ("100Mb", "bad bandwidth '100mb' \\(tc units: bit, kbit, mbit, gbit, tbit = bits/s; bps, kbps"),
        ("500MB", "bad bandwidth '500mb'"),
        ("1gbit/s", "bad bandwidth '1gbit/s'"),
        ("2GiB", "bad bandwidth '2gib'"),
        ("1b", "bad bandwidth '1b'"),
        ("gbit", "bad bandwidth 'gbit'"),
        ("-1gbit", "bad bandwidth"),
        ("1e9bit", "bad bandwidth"),
        ("0gbit", "bandwidth must be positive"),
        ("0.0mbps,1ms", "bandwidth must be positive"),
    ],
)
def test_bad_link_is_one_line_value_error(text, match):
    with pytest.raises(ValueError, match=match) as ei:
        parse_link(text)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"--link {text!r}: ")


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 10**6), st.sampled_from(sorted(RATES)), st.integers(0, 10**6), st.sampled_from(sorted(TIMES)),
       st.booleans())
def test_integer_values_parse_exactly(bw, unit, lat, tunit, upper):
    text = f"{bw}{unit},{lat}{tunit}"
    link = parse_link(text.upper() if upper else text)
    assert link.bytes_per_s == pytest.approx(float(bw * RATES[unit]), rel=1e-12)
    assert link.latency_ns == lat * TIMES[tunit]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**5), st.integers(0, 999), st.sampled_from(["us", "ms", "s"]))
def test_decimal_latency_is_not_truncated(whole, frac, tunit):
    # "1.005ms" is 1005000 ns, not 1004999 (float 1.005 * 1e6 = 1004999.9999999999)
    link = parse_link(f"1gbit,{whole}.{frac:03d}{tunit}")
    assert link.latency_ns == (whole * 1000 + frac) * TIMES[tunit] // 1000


def test_decimal_latency_example():
    assert parse_link("1gbit,1.005ms").latency_ns == 1_005_000


@pytest.mark.parametrize(
    "text, nbytes, ns",
    [
        ("1gbit", 1, 8),
        ("1gbit", 4096, 32_768),
        ("1gbit,2ms", 2 << 20, 16_777_216),  # latency is not wire time
        ("100mbit", 4096, 327_680),
        ("1GBps", 4096, 4096),
        ("1GiBps", 1024**3, 10**9),
        ("8bit", 3, 3 * 10**9),
        ("unlimited,5ms", 10**12, 0),
        ("1gbit", 0, 0),
    ],
)
def test_wire_ns(text, nbytes, ns):
    assert parse_link(text).wire_ns(nbytes) == ns


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10**4), st.integers(0, 1 << 30), st.integers(0, 1 << 30))
def test_wire_ns_is_monotonic_and_additive_up_to_rounding(mbit, a, b):
    link = Link(bytes_per_s=mbit * 1e6 / 8)
    wa, wb, wab = link.wire_ns(a), link.wire_ns(b), link.wire_ns(a + b)
    assert isinstance(wab, int)
    assert max(wa, wb) <= wab <= wa + wb + 1
    assert abs(wab - (a + b) * 8000 / mbit) <= 1 + 1e-9 * wab


def test_describe():
    assert parse_link("1gbit,2ms").describe() == "1 Gbit/s (125 MB/s), 2 ms one-way"
    assert parse_link("unlimited,5ms").describe() == "unlimited bandwidth, 5 ms one-way"
    assert parse_link("100mbit").describe() == "100 Mbit/s (12.5 MB/s)"
    assert parse_link("100mbps,500us").describe() == "800 Mbit/s (100 MB/s), 0.5 ms one-way"
    assert parse_link(None).describe() == "unlimited"
