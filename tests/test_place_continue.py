"""``run --place continue`` on the real kernel: pages written into the page cache through the
handler's own (unregistered) mapping, vCPUs registered MISSING and MINOR, answered with
UFFDIO_CONTINUE.  Small sizes; shmem and hugetlbfs; every page verified by the workers and at the end.
"""

from __future__ import annotations

import pytest

from harness.config import ConfigError, RunConfig
from postcopy_core import kernel
from tests.conftest import requires_uffd
from tests.test_run import check_truth, run


def _minor_usable() -> bool:
    try:
        kernel.Uffd.open(kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM | kernel.FEATURE_MINOR_SHMEM).close()
        return True
    except Exception:
        return False


requires_minor = pytest.mark.skipif(not _minor_usable(), reason="userfaultfd without MINOR_SHMEM")
pytestmark = [pytest.mark.kernel, requires_uffd, requires_minor]


def test_bad_place_is_one_line():
    with pytest.raises(ConfigError, match=r"--place 'move': choose from copy, continue"):
        RunConfig(place="move").validate()


@pytest.mark.parametrize("vcpus", [1, 4])
def test_demand_paging_with_continue(vcpus, clean_machine):
    rep = run(vcpus=vcpus, ram=8 << 20, workload="sequential", background=False, place="continue")
    npages = rep["pages"]["total"]
    assert rep["faults"]["total"] == npages and rep["pages"]["requested"] == npages
    assert rep["latency-us"]["count"] == npages  # every first touch stalled, and the workers saw it
    assert rep["handler"]["copy-eexist"] == 0


def test_streamed_pages_trap_until_continued(clean_machine):
    """With the stream, a page placed before any vCPU asked is in the page cache but mapped in no
    vCPU: its first touch is a MINOR fault that the handler answers at once (already received).
    Under --place copy such a touch takes no uffd event at all."""
    rep = run(vcpus=2, ram=16 << 20, workload="random", place="continue")
    assert rep["pages"]["background"] > 0
    assert rep["faults"]["already-received"] > 0
    assert rep["latency-us"]["count"] == rep["pages"]["total"]  # random over own slices: each page once
    check_truth(rep)


def test_collisions_writes_and_zero_pages(clean_machine):
    """Every vCPU on the same pages (waiter lists, the access board), stores, zero pages."""
    rep = run(vcpus=4, ram=2 << 20, workload="shared", background=False, place="continue", write_ratio=0.3,
              zero_share=0.3)
    assert rep["pages"]["zero"] > 0
    assert rep["faults"]["total"] >= rep["pages"]["total"]


def test_wake_all_policy_with_continue(clean_machine):
    run(vcpus=3, ram=4 << 20, workload="hotset", wake_policy="all", place="continue")


@pytest.mark.parametrize("background", [False, True])
def test_hugetlbfs_with_continue(background, hugepages, clean_machine):
    hugepages(12)
    rep = run(vcpus=2, ram=16 << 20, backing="hugetlb", workload="random", background=background,
              zero_share=0.25, place="continue")
    assert rep["page-size"] == 2 << 20
    assert rep["latency-us"]["count"] == 8
    if not background:
        assert rep["pages"]["requested"] == 8 and rep["faults"]["total"] == 8
