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


def shmem(npages: int):
    fd = kernel.memfd_create("pch-test")
    os.ftruncate(fd, npages * PS)
    return fd, kernel.mmap_fd(fd, npages * PS)


def test_features_negotiated():
    u = kernel.Uffd.open(FEATS)
    try:
        assert u.features & kernel.FEATURE_THREAD_ID
        assert u.features & kernel.FEATURE_MISSING_SHMEM
    finally:
        u.close()


def test_register_reports_copy_zeropage_wake():
    fd, m = shmem(4)
    u = kernel.Uffd.open(FEATS)
    try:
        ioctls = u.register(m.addr, m.length)
        assert ioctls & kernel.IOCTL_COPY and ioctls & kernel.IOCTL_ZEROPAGE and ioctls & kernel.IOCTL_WAKE
    finally:
        u.close()
        m.close()
        os.close(fd)


def test_errors_name_the_ioctl_and_errno():
    u = kernel.Uffd.open(FEATS)
    try:
        with pytest.raises(kernel.KernelError) as ei:
            u.register(12345, PS)  # unaligned
        assert "UFFDIO_REGISTER" in str(ei.value) and "EINVAL" in str(ei.value)
        assert ei.value.errno == 22
    finally:
        u.close()


def test_copy_twice_is_eexist():
    fd, m = shmem(2)
    u = kernel.Uffd.open(FEATS)
    src = kernel.mmap_anon(PS)
    try:
        u.register(m.addr, m.length)
        u.copy(m.addr, src.addr, PS)
        with pytest.raises(kernel.KernelError) as ei:
            u.copy(m.addr, src.addr, PS)
        assert ei.value.errno == 17 and "UFFDIO_COPY" in str(ei.value)
    finally:
        u.close()
        src.close()
        m.close()
        os.close(fd)


def test_fault_is_read_with_thread_id_and_resolved_by_copy():
    """A thread touches a missing page: the uffd reports it with the thread's tid; COPY wakes it."""
    fd, m = shmem(2)
    u = kernel.Uffd.open(FEATS)
    u.register(m.addr, m.length)
    spec = ContentSpec(PS, 2, seed=7, zero_permille=0)
    img = Image(spec)
    seen = {}

    def toucher():
        seen["tid"] = threading.get_native_id()
        # the first read happens inside C (cffi drops the GIL), so the main thread can resolve it
        seen["bad_words"] = check_page(m.addr + PS, spec, 1)

    t = threading.Thread(target=toucher)
    t.start()
    faults = []
    deadline = time.monotonic() + 5
    while not faults and time.monotonic() < deadline:
        faults = u.read()
        time.sleep(0.001)
    try:
        assert len(faults) == 1
        assert faults[0].addr == m.addr + PS
        assert faults[0].ptid == seen["tid"]
        u.copy(m.addr + PS, img.pointer(1), PS)
        t.join(5)
        assert not t.is_alive()
        assert seen["bad_words"] == 0
    finally:
        u.close()
        img.close()
        m.close()
        os.close(fd)


def test_zeropage_fills_zeros_and_check_page_sees_it():
    fd, m = shmem(1)
    u = kernel.Uffd.open(FEATS)
    try:
        u.register(m.addr, m.length)
        u.zeropage(m.addr, PS)
        assert bytes(m.buffer()) == bytes(PS)
        # a generated non-zero page read as zeros is a mismatch in every word
        spec = ContentSpec(PS, 1, seed=3, zero_permille=0)
        assert check_page(m.addr, spec, 0) == PS // 8
    finally:
        u.close()
        m.close()
        os.close(fd)


def test_wake_on_unregistered_range_names_wake():
    u = kernel.Uffd.open(FEATS)
    try:
        with pytest.raises(kernel.KernelError) as ei:
            u.wake(4096 * 3 + 1, PS)
        assert "UFFDIO_WAKE" in str(ei.value)
    finally:
        u.close()


def test_eventfd_and_hugetlb_memfd():
    efd = kernel.eventfd(0)
    os.eventfd_write(efd, 3)
    assert os.eventfd_read(efd) == 3
    os.close(efd)
    # creating a hugetlbfs memfd needs no reserved pages; mapping it does
    hfd = kernel.memfd_create("pch-test-huge", hugetlb=True)
    os.close(hfd)


def test_unregister_ends_missing_faults_for_the_range():
    """After UNREGISTER the range faults normally (zero-filled by shmem), so COPY has nothing to do."""
    fd, m = shmem(2)
    u = kernel.Uffd.open(FEATS)
    try:
        u.register(m.addr, m.length)
        u.unregister(m.addr, m.length)
        assert bytes(m.buffer(0, 8)) == bytes(8)  # would block forever if still registered
        with pytest.raises(kernel.KernelError) as ei:
            u.copy(m.addr, m.addr + PS, PS)  # not registered any more
        assert "UFFDIO_COPY" in str(ei.value)
        assert u.read() == []
    finally:
        u.close()
        m.close()
        os.close(fd)
