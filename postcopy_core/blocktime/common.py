"""Small helpers the engines share: units, the latency histogram, the engine interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .events import BlocktimeError, Fault, Placed, TraceMeta

NS_PER_MS = 1_000_000
NS_PER_US = 1_000
U32 = 0xFFFFFFFF
# QEMU 10.1 keeps 24 latency buckets; bucket N counts latencies in [2**N us, 2**(N+1) us).
LATENCY_BUCKETS = 24


class Engine(Protocol):
    """What every engine offers: feed events in stream order, then ask for the query-migrate fields."""

    name: str

    def fault(self, ev: Fault) -> None: ...

    def placed(self, ev: Placed) -> None: ...

    def result(self) -> dict: ...


def latency_bucket(ns: int) -> int:
    """Histogram bucket for one latency: floor(log2(us)), with 0 us in bucket 0, clamped to 0..23."""
    us = ns // NS_PER_US
    if us <= 0:
        return 0
    return min(us.bit_length() - 1, LATENCY_BUCKETS - 1)


def latency_histogram(ns: np.ndarray) -> list[int]:
    """Vectorised ``latency_bucket`` over many latencies, returned as 24 counts."""
    if ns.size == 0:
        return [0] * LATENCY_BUCKETS
    us = ns // NS_PER_US
    # frexp gives the exponent exactly for integers below 2**53 (~285 years of microseconds).
    exp = np.frexp(us.astype(np.float64))[1].astype(np.int64) - 1
    idx = np.clip(np.where(us > 0, exp, 0), 0, LATENCY_BUCKETS - 1)
    return np.bincount(idx, minlength=LATENCY_BUCKETS).tolist()


def ms_u32(ns: int) -> int:
    """ns -> ms, truncated to uint32 like QEMU's query-migrate fields."""
    return (ns // NS_PER_MS) & U32


def check_vcpu(meta: TraceMeta, vcpu: int) -> None:
    """A fault from a vCPU the run does not declare is bad input, not something to guess about."""
    if vcpu >= meta.vcpus or vcpu < -1:
        raise BlocktimeError(
            f"fault from vCPU {vcpu} but the trace declares {meta.vcpus} vCPUs (pass --vcpus N)"
        )
