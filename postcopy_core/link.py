"""A model of the migration link: bandwidth (serialisation delay), one-way latency, jitter and loss.

``--link 1gbit,2ms`` means every byte takes 8 ns on the wire and every message arrives 2 ms after
its last byte left.  The source applies the model to everything it sends: it serialises one
message at a time (urgent pages first), and holds each until its arrival time before writing it
to the socket.  A page request also crosses the link, so an urgent page costs two latencies plus
its serialisation.

``jitter=TIME`` and ``loss=PCT%`` (``--link 1gbit,1ms,jitter=200us,loss=0.5%``) follow netem's
meaning, so that ``--link-mode netns`` can hand the same spec to ``tc``: each crossing draws its
latency uniformly from ``LATENCY +- jitter`` (never below 0), and a crossing is lost with
probability ``loss``.  The page channels are TCP-like streams, so a lost message is not gone: it is
resent after a retransmission delay ``rto=TIME`` (default: two round trips, at least 10 ms, about
when Linux's tail-loss probe or fast retransmit would resend it) and arrives that much later.  A
stream delivers in order, so a late (jittered or lost) message holds back every later one on the
same channel (head-of-line blocking), as TCP does; the two channels are independent.
"""

from __future__ import annotations

import random
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
              "(bytes/s), kibit, mibps... (powers of 1024), a bare number is bit; latency one-way: s, ms, us, ns; "
              "optional jitter=TIME (uniform +- around the latency, as netem), loss=PCT%% (a lost message is "
              "resent after rto=TIME, default 2 round trips, at least 10 ms)")


RTO_MIN_NS = 10_000_000  # the least a modelled loss costs (see the top)


@dataclass(frozen=True)
class Link:
    """``bytes_per_s`` None = unlimited; ``latency_ns`` one way; ``jitter_ns`` +- around it;
    ``loss`` the probability (0..1) that a crossing is lost and resent ``rto_ns`` later (0 = default)."""

    bytes_per_s: float | None = None
    latency_ns: int = 0
    jitter_ns: int = 0
    loss: float = 0.0
    rto_ns: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bytes_per_s is None and self.latency_ns == 0 and not self.jitter_ns and not self.loss

    @property
    def retransmit_ns(self) -> int:
        """What a lost crossing costs: ``rto=`` if given, else two round trips, at least 10 ms."""
        return self.rto_ns or max(RTO_MIN_NS, 4 * self.latency_ns)

    @property
    def worst_latency_ns(self) -> int:
        """The longest one crossing can take (latency + jitter, + a retransmission if loss is on)."""
        return self.latency_ns + self.jitter_ns + (self.retransmit_ns if self.loss else 0)

    def delays(self, seed: int = 0) -> LinkDelays:
        """A per-run drawer of crossing times (seeded, so a run's draws repeat with its --seed)."""
        return LinkDelays(self, seed)

    def wire_ns(self, nbytes: int) -> int:
        """How long ``nbytes`` occupy the wire."""
        return 0 if self.bytes_per_s is None else int(nbytes * 1e9 / self.bytes_per_s)

    def describe(self) -> str:
        """The parsed link for people: ``100 Mbit/s (12.5 MB/s), 2 ms one-way``."""
        if self.unlimited:
            return "unlimited"
        bw = "unlimited bandwidth" if self.bytes_per_s is None else _rate_text(self.bytes_per_s)
        text = f"{bw}, {self.latency_ns / 1e6:g} ms one-way" if self.latency_ns else bw
        if self.jitter_ns:
            text += f", jitter +-{self.jitter_ns / 1e6:g} ms"
        if self.loss:
            text += f", loss {self.loss * 100:g}% (resent after {self.retransmit_ns / 1e6:g} ms)"
        return text


class LinkDelays:
    """Draws when each crossing of the modelled link arrives: latency, jitter, loss, in order per channel.

    ``arrival_ns(sent_ns, channel)`` is the arrival time of a message whose last byte left at
    ``sent_ns`` on ``channel`` (any hashable: the source uses "urgent", "stream" and "requests").
    """

    def __init__(self, link: Link, seed: int = 0) -> None:
        self.link = link
        self.rng = random.Random(seed ^ 0x6C696E6B)  # its own stream: the content keeps its seed
        self.last: dict = {}  # channel -> latest arrival so far (a stream delivers in order)
        self.lost = 0  # crossings the model lost (and resent)

    def one_way_ns(self) -> int:
        """One crossing's latency: uniform in latency +- jitter (netem's default), plus a resend if lost."""
        link = self.link
        ns = link.latency_ns
        if link.jitter_ns:
            ns = max(0, ns + round(self.rng.uniform(-link.jitter_ns, link.jitter_ns)))
        if link.loss and self.rng.random() < link.loss:
            self.lost += 1
            ns += link.retransmit_ns
        return ns

    def arrival_ns(self, sent_ns: int, channel) -> int:
        at = max(sent_ns + self.one_way_ns(), self.last.get(channel, 0))
        self.last[channel] = at
        return at


def _rate_text(bytes_per_s: float) -> str:
    def scaled(value: float, unit: str) -> str:
        for prefix in ("", "k", "M", "G"):
            if value < 1000:
                return f"{value:g} {prefix}{unit}"
            value /= 1000
        return f"{value:g} T{unit}"

    return f"{scaled(bytes_per_s * 8, 'bit/s')} ({scaled(bytes_per_s, 'B/s')})"


LINK_SYNTAX = "BANDWIDTH[,LATENCY][,jitter=TIME][,loss=PCT%][,rto=TIME]"


def parse_link(text: str | None) -> Link:
    """Parse ``BANDWIDTH[,LATENCY][,jitter=TIME][,loss=PCT%][,rto=TIME]`` (e.g. ``1gbit,2ms``,
    ``unlimited,5ms``, ``1gbit,1ms,jitter=200us,loss=0.5%``)."""
    if text is None or text.strip().lower() in ("", "unlimited", "none"):
        return Link()
    parts = [p.strip().lower() for p in text.split(",")]
    extra = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key.strip() in extra:
            raise ValueError(f"--link {text!r}: {key.strip()}= given twice")
        extra[key.strip()] = value.strip()
    if len(parts) > 2 or any("=" in p for p in parts):
        raise ValueError(f"--link {text!r}: expected {LINK_SYNTAX}, e.g. 1gbit,2ms or 1gbit,1ms,jitter=200us,loss=0.5%")
    bw = _parse_bandwidth(text, parts[0])
    lat = 0
    if len(parts) == 2:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", parts[1])
        if not m or m.group(2) not in _TIME and m.group(2) != "":
            raise ValueError(f"--link {text!r}: bad latency {parts[1]!r} (one-way, in s, ms, us or ns; "
                             "a bare number is us)")
        lat = _exact_ns(m.group(1), _TIME[m.group(2) or "us"])
    jitter, loss, rto = _parse_extras(text, extra)
    if jitter > lat:
        raise ValueError(f"--link {text!r}: jitter {jitter / 1e6:g} ms is larger than the latency "
                         f"{lat / 1e6:g} ms (netem's jitter goes both ways around the latency)")
    return Link(bw, lat, jitter, loss, rto)


def _parse_bandwidth(text: str, word: str) -> float | None:
    """The bandwidth part of --link in bytes/s (None: unlimited)."""
    if word in ("unlimited", "inf"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", word)
    if not m or m.group(2) not in _RATE and m.group(2) != "":
        raise ValueError(f"--link {text!r}: bad bandwidth {word!r} ({RATE_UNITS})")
    bw = float(m.group(1)) * _RATE[m.group(2) or "bit"]
    if bw <= 0:
        raise ValueError(f"--link {text!r}: bandwidth must be positive")
    return bw


def _parse_extras(text: str, extra: dict[str, str]) -> tuple[int, float, int]:
    """--link's key=value parts: (jitter ns, loss fraction, rto ns)."""
    jitter = rto = 0
    loss = 0.0
    for key, value in extra.items():
        if key in ("jitter", "rto"):
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", value)
            if not m or m.group(2) not in _TIME and m.group(2) != "":
                raise ValueError(f"--link {text!r}: bad {key} {value!r} (in s, ms, us or ns; a bare number is us)")
            ns = _exact_ns(m.group(1), _TIME[m.group(2) or "us"])
            jitter, rto = (ns, rto) if key == "jitter" else (jitter, ns)
        elif key == "loss":
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", value)
            if not m or not 0 <= float(m.group(1)) < 100:
                raise ValueError(f"--link {text!r}: bad loss {value!r} (a percentage below 100, e.g. 0.5%)")
            loss = float(m.group(1)) / 100
        else:
            raise ValueError(f"--link {text!r}: unknown {key}= (choose jitter=, loss=, rto=)")
    return jitter, loss, rto


def _exact_ns(number: str, unit_ns: int) -> int:
    """``"1.005"`` x 10^6 -> 1005000 exactly (a float product would give 1004999)."""
    from fractions import Fraction

    return round(Fraction(number) * unit_ns)
