"""Access patterns: which pages a vCPU touches, in what order, and which touches are stores.

Each generator is deterministic in (seed, vcpu), so a run can be repeated exactly.
  sequential  each vCPU walks its own contiguous slice in order
  random      its own slice, in a random order
  stride      its own slice in columns of STRIDE pages (0, 16, 32, ..., 1, 17, ...)
  hotset      zipf-like draws over all of RAM (hot pages scattered by a seeded permutation)
  shared      every vCPU walks all pages in the same order: collisions on purpose
"""

from __future__ import annotations

import numpy as np

WORKLOADS = ("sequential", "random", "stride", "hotset", "shared")
STRIDE = 16
HOTSET_ACCESSES = 2  # hotset: draws per vCPU, as a multiple of its share of pages
HOTSET_SKEW = 1.1


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


def make_order(workload: str, vcpu: int, nvcpus: int, npages: int, seed: int) -> np.ndarray:
    """The page index of every access of ``vcpu``, as uint32."""
    rng = np.random.default_rng([seed, vcpu])
    first, end = own_slice(vcpu, nvcpus, npages)
    if workload == "sequential":
        order = np.arange(first, end)
    elif workload == "random":
        order = rng.permutation(np.arange(first, end))
    elif workload == "stride":
        n = end - first
        cols = -(-n // STRIDE)
        idx = np.arange(cols * STRIDE).reshape(cols, STRIDE).T.ravel()
        order = first + idx[idx < n]
    elif workload == "hotset":
        ranks = np.arange(1, npages + 1, dtype=np.float64)
        weights = ranks**-HOTSET_SKEW
        weights /= weights.sum()
        hot = np.random.default_rng([seed, 0xC0FFEE]).permutation(npages)  # same hot pages for all vCPUs
        order = hot[rng.choice(npages, size=HOTSET_ACCESSES * (end - first), p=weights)]
    elif workload == "shared":
        order = np.random.default_rng([seed, 0x5EED]).permutation(npages)
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    return np.ascontiguousarray(order, dtype=np.uint32)


def make_writes(count: int, write_ratio: float, vcpu: int, seed: int) -> np.ndarray | None:
    """Per access 1 = store, 0 = load; None when all are loads."""
    if write_ratio <= 0:
        return None
    rng = np.random.default_rng([seed, vcpu, 0x77])
    return (rng.random(count) < write_ratio).astype(np.uint8)
