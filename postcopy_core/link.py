"""A model of the migration link: bandwidth (serialisation delay) and one-way latency.

``--link 1gbit,2ms`` means every byte takes 8 ns on the wire and every message arrives 2 ms after
its last byte left.  The source applies the model to everything it sends: it serialises one
message at a time (urgent pages first), and holds each until its arrival time before writing it
to the socket.  A page request also crosses the link, so an urgent page costs two latencies plus
its serialisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# tc(8)'s rate units, matched without regard to case as tc does: *bit = bits/s, *bps = bytes/s,
# SI prefixes are powers of 1000 and IEC ones (ki, mi, gi, ti) powers of 1024; a bare number is bits/s.
_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
           "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_RATE = {**{f"{p}bit": m / 8 for p, m in _PREFIX.items()}, **{f"{p}bps": m for p, m in _PREFIX.items()}}
# tc's time units (netem's delay); a bare number is microseconds
_TIME = {"ns": 1, "nsec": 1, "nsecs": 1, "us": 10**3, "usec": 10**3, "usecs": 10**3,
         "ms": 10**6, "msec": 10**6, "msecs": 10**6, "s": 10**9, "sec": 10**9, "secs": 10**9}
RATE_UNITS = ("tc units: bit, kbit, mbit, gbit, tbit = bits/s; bps, kbps, mbps, gbps, tbps = bytes/s; "
              "kibit, mibit, gibit, tibit, kibps, mibps, gibps, tibps = powers of 1024; a bare number = bit")
LINK_UNITS = ("bandwidth in tc's units: bit, kbit, mbit, gbit, tbit (bits/s), bps, kbps, mbps, gbps, tbps "
              "(bytes/s), kibit, mibps... (powers of 1024), a bare number is bit; latency one-way: s, ms, us, ns")


@dataclass(frozen=True)
class Link:
    """``bytes_per_s`` None = unlimited; ``latency_ns`` one way."""

    bytes_per_s: float | None = None
    latency_ns: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bytes_per_s is None and self.latency_ns == 0

    def wire_ns(self, nbytes: int) -> int:
        """How long ``nbytes`` occupy the wire."""
        return 0 if self.bytes_per_s is None else int(nbytes * 1e9 / self.bytes_per_s)

    def describe(self) -> str:
        """The parsed link for people: ``100 Mbit/s (12.5 MB/s), 2 ms one-way``."""
        if self.unlimited:
            return "unlimited"
        bw = "unlimited bandwidth" if self.bytes_per_s is None else _rate_text(self.bytes_per_s)
        return f"{bw}, {self.latency_ns / 1e6:g} ms one-way" if self.latency_ns else bw


def _rate_text(bytes_per_s: float) -> str:
    def scaled(value: float, unit: str) -> str:
        for prefix in ("", "k", "M", "G"):
            if value < 1000:
                return f"{value:g} {prefix}{unit}"
            value /= 1000
        return f"{value:g} T{unit}"

    return f"{scaled(bytes_per_s * 8, 'bit/s')} ({scaled(bytes_per_s, 'B/s')})"


def parse_link(text: str | None) -> Link:
    """Parse ``BANDWIDTH[,LATENCY]`` (e.g. ``1gbit,2ms``, ``500MB``, ``unlimited,5ms``)."""
    if text is None or text.strip().lower() in ("", "unlimited", "none"):
        return Link()
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) > 2:
        raise ValueError(f"--link {text!r}: expected BANDWIDTH[,LATENCY], e.g. 1gbit,2ms")
    bw: float | None = None
    if parts[0] not in ("unlimited", "inf"):
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", parts[0])
        if not m or m.group(2) not in _RATE and m.group(2) != "":
            raise ValueError(f"--link {text!r}: bad bandwidth {parts[0]!r} ({RATE_UNITS})")
        bw = float(m.group(1)) * _RATE[m.group(2) or "bit"]
        if bw <= 0:
            raise ValueError(f"--link {text!r}: bandwidth must be positive")
    lat = 0
    if len(parts) == 2:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", parts[1])
        if not m or m.group(2) not in _TIME and m.group(2) != "":
            raise ValueError(f"--link {text!r}: bad latency {parts[1]!r} (one-way, in s, ms, us or ns; "
                             "a bare number is us)")
        lat = _exact_ns(m.group(1), _TIME[m.group(2) or "us"])
    return Link(bw, lat)


def _exact_ns(number: str, unit_ns: int) -> int:
    """``"1.005"`` x 10^6 -> 1005000 exactly (a float product would give 1004999)."""
    from fractions import Fraction

    return round(Fraction(number) * unit_ns)
