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

_RATE = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_TIME = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}


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
        if self.unlimited:
            return "unlimited"
        bw = "unlimited" if self.bytes_per_s is None else f"{self.bytes_per_s * 8 / 1e9:g} Gbit/s"
        return f"{bw}, {self.latency_ns / 1e6:g} ms"


def parse_link(text: str | None) -> Link:
    """Parse ``BANDWIDTH[,LATENCY]`` (e.g. ``1gbit,2ms``, ``500MB``, ``unlimited,5ms``)."""
    if text is None or text.strip().lower() in ("", "unlimited", "none"):
        return Link()
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) > 2:
        raise ValueError(f"--link {text!r}: expected BANDWIDTH[,LATENCY], e.g. 1gbit,2ms")
    bw: float | None = None
    if parts[0] not in ("unlimited", "inf"):
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]+)(?:/s|ps)?", parts[0])
        if not m or m.group(2) not in _RATE:
            raise ValueError(f"--link {text!r}: bad bandwidth {parts[0]!r} (use e.g. 1gbit, 100mbit, 500MB)")
        bw = float(m.group(1)) * _RATE[m.group(2)]
        if bw <= 0:
            raise ValueError(f"--link {text!r}: bandwidth must be positive")
    lat = 0
    if len(parts) == 2:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ns|us|ms|s)", parts[1])
        if not m:
            raise ValueError(f"--link {text!r}: bad latency {parts[1]!r} (use e.g. 2ms, 500us)")
        lat = round(float(m.group(1)) * _TIME[m.group(2)])
    return Link(bw, lat)
