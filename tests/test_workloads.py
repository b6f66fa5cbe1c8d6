"""Access patterns: slices partition RAM, orders are permutations, hotset is skewed, all deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpu_workers.workloads import (
    HOTSET_ACCESSES,
    STRIDE,
    WORKLOADS,
    accesses_per_vcpu,
    make_order,
    make_writes,
    own_slice,
)

SLICED = ("sequential", "random", "stride")
PROPS = settings(max_examples=40, deadline=None)


def test_workload_names():
    assert set(WORKLOADS) == {"sequential", "random", "stride", "hotset", "shared"}


@PROPS
@given(st.integers(1, 64), st.integers(1, 3000))
def test_own_slices_partition_all_pages(nvcpus, npages):
    slices = [own_slice(v, nvcpus, npages) for v in range(nvcpus)]
    assert slices[0][0] == 0 and slices[-1][1] == npages
    for (_, end), (first, _) in zip(slices, slices[1:], strict=False):
        assert end == first
    sizes = [end - first for first, end in slices]
    assert max(sizes) - min(sizes) <= 1


@PROPS
@given(st.sampled_from(SLICED), st.integers(1, 32), st.integers(1, 2000), st.integers(0, 2**63 - 1))
def test_sliced_orders_are_permutations_of_own_slice_and_cover_ram(workload, nvcpus, npages, seed):
    seen = []
    for v in range(nvcpus):
        order = make_order(workload, v, nvcpus, npages, seed)
        assert order.dtype == np.uint32 and order.flags.c_contiguous
        first, end = own_slice(v, nvcpus, npages)
        assert sorted(order.tolist()) == list(range(first, end))
        seen += order.tolist()
    assert sorted(seen) == list(range(npages))  # every page exactly once over all vCPUs


def test_sequential_walks_in_order():
    assert make_order("sequential", 1, 3, 30, seed=5).tolist() == list(range(10, 20))


def test_stride_walks_columns_of_stride_pages():
    order = make_order("stride", 1, 2, 2 * 40, seed=0).tolist()  # slice [40, 80)
    assert STRIDE == 16
    assert order[:6] == [40, 56, 72, 41, 57, 73]
    assert order == [40 + c + r * 16 for c in range(16) for r in range(3) if c + r * 16 < 40]


def test_random_is_not_sequential():
    order = make_order("random", 0, 1, 1000, seed=1)
    assert order.tolist() != list(range(1000))
    # a shuffle: few neighbours stay neighbours
    assert np.count_nonzero(np.diff(order.astype(np.int64)) == 1) < 20


@PROPS
@given(st.integers(1, 16), st.integers(1, 2000), st.integers(0, 2**32))
def test_shared_is_one_permutation_of_all_pages_for_every_vcpu(nvcpus, npages, seed):
    first = make_order("shared", 0, nvcpus, npages, seed)
    assert sorted(first.tolist()) == list(range(npages))
    for v in range(1, nvcpus):
        assert np.array_equal(make_order("shared", v, nvcpus, npages, seed), first)


@PROPS
@given(st.integers(1, 16), st.integers(1, 2000), st.integers(0, 2**32))
def test_hotset_stays_in_range(nvcpus, npages, seed):
    for v in range(nvcpus):
        order = make_order("hotset", v, nvcpus, npages, seed)
        first, end = own_slice(v, nvcpus, npages)
        assert len(order) == HOTSET_ACCESSES * (end - first)
        assert order.dtype == np.uint32
        if len(order):
            assert int(order.max()) < npages


def test_hotset_is_skewed_and_shares_hot_pages_across_vcpus():
    npages, nvcpus = 10_000, 4
    orders = [make_order("hotset", v, nvcpus, npages, seed=3) for v in range(nvcpus)]
    counts = np.bincount(np.concatenate(orders), minlength=npages)
    top = np.sort(counts)[::-1]
    top1 = top[: npages // 100].sum() / counts.sum()
    assert top1 > 0.4, top1  # uniform access would give 0.01
    # the hottest pages are the same for every vCPU, and they are scattered over RAM (not pages 0..k)
    hot = [set(np.argsort(np.bincount(o, minlength=npages))[-5:].tolist()) for o in orders]
    assert len(hot[0] & hot[1]) >= 3 and len(hot[2] & hot[3]) >= 3
    hottest = np.argsort(counts)[-20:]
    assert hottest.max() > npages // 10


def test_hotset_depends_on_seed():
    a = make_order("hotset", 0, 2, 1000, seed=1)
    b = make_order("hotset", 0, 2, 1000, seed=2)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_deterministic_in_seed_and_vcpu(workload):
    for v in range(3):
        a = make_order(workload, v, 3, 999, seed=42)
        b = make_order(workload, v, 3, 999, seed=42)
        assert np.array_equal(a, b)
    if workload != "sequential" and workload != "stride":
        assert not np.array_equal(make_order(workload, 0, 3, 999, seed=42), make_order(workload, 0, 3, 999, seed=43))


def test_random_differs_between_vcpus_with_equal_slices_only_by_content():
    # equal-size slices of different vCPUs are shuffled independently (not the same shuffle shifted)
    a = make_order("random", 0, 2, 1000, seed=9).astype(np.int64)
    b = make_order("random", 1, 2, 1000, seed=9).astype(np.int64) - 500
    assert not np.array_equal(a, b)


@PROPS
@given(st.sampled_from(WORKLOADS), st.integers(1, 64), st.integers(1, 3000), st.integers(0, 2**32))
def test_accesses_per_vcpu_is_an_upper_bound(workload, nvcpus, npages, seed):
    bound = accesses_per_vcpu(workload, nvcpus, npages)
    lengths = [len(make_order(workload, v, nvcpus, npages, seed)) for v in range(nvcpus)]
    assert max(lengths) <= bound
    if workload == "shared":
        assert bound == npages
    # a bound, not a wild overestimate: it is the largest order (up to the rounding of slices)
    assert bound <= max(lengths) + HOTSET_ACCESSES


def test_unknown_workload():
    with pytest.raises(ValueError, match="unknown workload 'nope'; choose from sequential, random"):
        make_order("nope", 0, 1, 10, 1)


@pytest.mark.parametrize("ratio", [0.0, -0.5])
def test_make_writes_none_when_no_stores(ratio):
    assert make_writes(100, ratio, 0, 1) is None


def test_make_writes_all_stores():
    w = make_writes(1000, 1.0, 2, 1)
    assert w.dtype == np.uint8 and len(w) == 1000 and w.all()


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.9])
def test_make_writes_ratio(ratio):
    w = make_writes(200_000, ratio, 1, 7)
    assert w.dtype == np.uint8 and len(w) == 200_000
    assert set(np.unique(w).tolist()) <= {0, 1}
    assert abs(w.mean() - ratio) < 0.01


def test_make_writes_deterministic_per_seed_and_vcpu():
    a = make_writes(5000, 0.5, 3, 11)
    assert np.array_equal(a, make_writes(5000, 0.5, 3, 11))
    assert not np.array_equal(a, make_writes(5000, 0.5, 4, 11))
    assert not np.array_equal(a, make_writes(5000, 0.5, 3, 12))
    assert len(make_writes(0, 0.5, 0, 0)) == 0
