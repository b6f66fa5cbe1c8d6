"""Access patterns: which pages a vCPU touches, in what order, and which touches are stores.

Each generator is deterministic in (seed, vcpu), so a run can be repeated exactly.
  sequential  each vCPU walks its own contiguous slice in order
  random      its own slice, in a random order
  stride      its own slice in columns of STRIDE pages (0, 16, 32, ..., 1, 17, ...)
  hotset      zipf-like draws over all of RAM (hot pages scattered by a seeded permutation)
  shared      every vCPU walks all pages in the same order: collisions on purpose

The generators are C (csrc/workloads.c) so that a vCPU worker builds its order right after fork
without importing numpy (1024 workers must start in seconds and stay small); the numpy-returning
functions here are for the orchestrator, tools and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postcopy_core._uffd import ffi, lib

if TYPE_CHECKING:
    import numpy as np


def _enum_names(ctype: str, prefix: str) -> tuple[str, ...]:
    """A C enum's names in value order, lower-cased without ``prefix``; its values must be 0..n-1."""
    elements = ffi.typeof(ctype).elements
    if sorted(elements) != list(range(len(elements))):
        raise TypeError(f"{ctype}: values are not 0..{len(elements) - 1}")
    return tuple(elements[v].removeprefix(prefix).lower() for v in range(len(elements)))


WORKLOADS = _enum_names("enum pch_workload", "PCH_WL_")  # index = C kind (csrc/pch.h; values from there)
STRIDE = 16
HOTSET_ACCESSES = 2  # hotset: draws per vCPU, as a multiple of its share of pages
HOTSET_SKEW = 1.1
COUNTER_WORKLOADS = ("hotset", "shared")  # pages that several vCPUs write: stores are increments


def write_mode(workload: str, write_ratio: float) -> int:
    """How a run's stores are made (vcpu_workers/stores.py): PCH_WRITES_NONE, _OWN or _COUNT."""
    if write_ratio <= 0:
        return lib.PCH_WRITES_NONE
    return lib.PCH_WRITES_COUNT if workload in COUNTER_WORKLOADS else lib.PCH_WRITES_OWN


def _kind(workload: str) -> int:
    try:
        return WORKLOADS.index(workload)
    except ValueError:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}") from None


def own_slice(vcpu: int, nvcpus: int, npages: int) -> tuple[int, int]:
    """[first, end) of the pages that belong to ``vcpu`` when RAM is cut into equal slices."""
    return vcpu * npages // nvcpus, (vcpu + 1) * npages // nvcpus


def accesses_per_vcpu(workload: str, nvcpus: int, npages: int) -> int:
    """An upper bound on the accesses one vCPU makes (sizes the shared results area)."""
    share = -(-npages // nvcpus)
    if workload == "shared":
        return npages
    if workload == "hotset":
        return HOTSET_ACCESSES * share
    return share


def order_buffer(workload: str, vcpu: int, nvcpus: int, npages: int, seed: int):
    """The page index of every access of ``vcpu`` as a cffi ``uint32_t[]`` (no numpy)."""
    kind = _kind(workload)
    n = lib.pch_order_length(kind, vcpu, nvcpus, npages)
    buf = ffi.new("uint32_t[]", max(n, 1))
    got = lib.pch_make_order(kind, vcpu, nvcpus, npages, seed & (2**64 - 1), buf)
    if got < 0:
        raise MemoryError("no memory for the hotset permutation")
    return buf, got


def writes_buffer(count: int, write_ratio: float, vcpu: int, seed: int):
    """Per access 1 = store as a cffi ``uint8_t[]``, or None when all accesses are loads."""
    if write_ratio <= 0:
        return None
    buf = ffi.new("uint8_t[]", max(count, 1))
    lib.pch_make_writes(buf, count, write_ratio, seed & (2**64 - 1), vcpu)
    return buf


def make_order(workload: str, vcpu: int, nvcpus: int, npages: int, seed: int) -> np.ndarray:
    """The page index of every access of ``vcpu``, as a numpy uint32 array."""
    import numpy as np

    buf, n = order_buffer(workload, vcpu, nvcpus, npages, seed)
    return np.frombuffer(ffi.buffer(buf), dtype=np.uint32, count=n).copy()


def make_writes(count: int, write_ratio: float, vcpu: int, seed: int) -> np.ndarray | None:
    """Per access 1 = store, 0 = load, as a numpy uint8 array; None when all are loads."""
    import numpy as np

    buf = writes_buffer(count, write_ratio, vcpu, seed)
    if buf is None:
        return None
    return np.frombuffer(ffi.buffer(buf), dtype=np.uint8, count=count).copy()
