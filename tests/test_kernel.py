"""The kernel interface on the real kernel: userfaultfd, memfd, eventfd, errors that name the ioctl."""

from __future__ import annotations

import os
import threading
import time

import pytest

from postcopy_core import kernel
from postcopy_core.content import ContentSpec, Image, check_page
from tests.conftest import requires_uffd

pytestmark = [pytest.mark.kernel, requires_uffd]
PS = kernel.PAGE_SIZE
FEATS = kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM


@pytest.fixture
def uffd():
    u = kernel.Uffd.open(FEATS)
    yield u
    u.close()


@pytest.fixture
def ram():
    """A 4-page shmem memfd, mapped: ``(mapping)``; unmapped and closed after the test."""
    fd = kernel.memfd_create("pch-test")
    os.ftruncate(fd, 4 * PS)
    m = kernel.mmap_fd(fd, 4 * PS)
    yield m
    m.close()
    os.close(fd)


def test_features_negotiated(uffd):
    assert uffd.features & kernel.FEATURE_THREAD_ID
    assert uffd.features & kernel.FEATURE_MISSING_SHMEM


def test_register_reports_copy_zeropage_wake(uffd, ram):
    ioctls = uffd.register(ram.addr, ram.length)
    assert ioctls & kernel.IOCTL_COPY and ioctls & kernel.IOCTL_ZEROPAGE and ioctls & kernel.IOCTL_WAKE


def test_errors_name_the_ioctl_and_errno(uffd):
    with pytest.raises(kernel.KernelError) as ei:
        uffd.register(12345, PS)  # unaligned
    assert "UFFDIO_REGISTER" in str(ei.value) and "EINVAL" in str(ei.value)
    assert ei.value.errno == 22


def test_copy_twice_is_eexist(uffd, ram):
    src = kernel.mmap_anon(PS)
    try:
        uffd.register(ram.addr, ram.length)
        uffd.copy(ram.addr, src.addr, PS)
        with pytest.raises(kernel.KernelError) as ei:
            uffd.copy(ram.addr, src.addr, PS)
        assert ei.value.errno == 17 and "UFFDIO_COPY" in str(ei.value)
    finally:
        src.close()


def test_fault_is_read_with_thread_id_and_resolved_by_copy(uffd, ram):
    """A thread touches a missing page: the uffd reports it with the thread's tid; COPY wakes it."""
    uffd.register(ram.addr, ram.length)
    spec = ContentSpec(PS, 4, seed=7, zero_permille=0)
    img = Image(spec)
    seen = {}

    def toucher():
        seen["tid"] = threading.get_native_id()
        # the first read happens inside C (cffi drops the GIL), so the main thread can resolve it
        seen["bad_words"] = check_page(ram.addr + PS, spec, 1)

    t = threading.Thread(target=toucher)
    t.start()
    faults = []
    deadline = time.monotonic() + 5
    while not faults and time.monotonic() < deadline:
        faults = uffd.read()
        time.sleep(0.001)
    try:
        assert len(faults) == 1
        assert faults[0].addr == ram.addr + PS
        assert faults[0].ptid == seen["tid"]
        assert not faults[0].write
        uffd.copy(ram.addr + PS, img.pointer(1), PS)
        t.join(5)
        assert not t.is_alive()
        assert seen["bad_words"] == 0
    finally:
        if t.is_alive():  # never leave the thread blocked in a fault
            uffd.zeropage(ram.addr + PS, PS)
            t.join(5)
        img.close()


def test_zeropage_fills_zeros_and_check_page_sees_it(uffd, ram):
    uffd.register(ram.addr, ram.length)
    uffd.zeropage(ram.addr, PS)
    assert bytes(ram.buffer(0, PS)) == bytes(PS)
    # a generated non-zero page read as zeros is a mismatch in every word
    spec = ContentSpec(PS, 1, seed=3, zero_permille=0)
    assert check_page(ram.addr, spec, 0) == PS // 8


def test_wake_on_unregistered_range_names_wake(uffd):
    with pytest.raises(kernel.KernelError) as ei:
        uffd.wake(4096 * 3 + 1, PS)
    assert "UFFDIO_WAKE" in str(ei.value)


def test_unregister_ends_missing_faults_for_the_range(uffd, ram):
    """After UNREGISTER the range faults normally (zero-filled by shmem), so COPY has nothing to do."""
    uffd.register(ram.addr, ram.length)
    uffd.unregister(ram.addr, ram.length)
    assert bytes(ram.buffer(0, 8)) == bytes(8)  # would block forever if still registered
    with pytest.raises(kernel.KernelError) as ei:
        uffd.copy(ram.addr, ram.addr + PS, PS)  # not registered any more
    assert "UFFDIO_COPY" in str(ei.value)
    assert uffd.read() == []


def test_eventfd_and_hugetlb_memfd():
    efd = kernel.eventfd(0)
    os.eventfd_write(efd, 3)
    assert os.eventfd_read(efd) == 3
    os.close(efd)
    # creating a hugetlbfs memfd needs no reserved pages; mapping it does
    hfd = kernel.memfd_create("pch-test-huge", hugetlb=True)
    os.close(hfd)
