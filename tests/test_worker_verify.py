"""The vCPU touch loop catches wrong content: a page filled with the wrong bytes is reported."""

from __future__ import annotations

import os
import signal
import time

import pytest

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image
from vcpu_workers.workloads import order_buffer

PS = kernel.PAGE_SIZE


def touch(ram: kernel.Mapping, spec: ContentSpec):
    order, n = order_buffer("random", 0, 1, spec.npages, seed=3)
    lat = ffi.new("uint32_t[]", n)
    pages = ffi.new("uint32_t[]", n)
    verified = ffi.new("uint8_t[]", spec.npages)
    t = ffi.new("struct pch_touch *")
    t.base, t.page_size, t.npages, t.order, t.count = ram.addr, PS, spec.npages, order, n
    t.seed, t.zero_permille, t.ref, t.verified = spec.seed, spec.zero_permille, ffi.NULL, verified
    t.lat_ns, t.lat_page = lat, pages
    assert lib.pch_touch_run(t) == 0
    return t


@pytest.fixture
def ram():
    spec = ContentSpec(PS, 16, seed=11, zero_permille=0)
    fd = kernel.memfd_create("pch-test-verify")
    os.ftruncate(fd, spec.size)
    m = kernel.mmap_fd(fd, spec.size)
    img = Image(spec)
    m.buffer()[:] = img.mapping.buffer()  # every page right...
    img.close()
    yield spec, m
    m.close()
    os.close(fd)


def test_right_content_passes(ram):
    spec, m = ram
    t = touch(m, spec)
    assert t.mismatches == 0 and t.first_bad_page == -1
    assert t.pages_checked == spec.npages
    assert t.words_checked == spec.npages * (1 + PS // 8)


def test_a_zero_filled_page_is_caught(ram):
    """What a lost handler would cause: the kernel fills a zero page."""
    spec, m = ram
    m.buffer(5 * PS, PS)[:] = bytes(PS)
    t = touch(m, spec)
    assert t.first_bad_page == 5
    assert t.mismatches >= PS // 8  # every word of the page (plus the touched word itself)


def test_one_flipped_byte_is_caught(ram):
    spec, m = ram
    b = m.buffer(9 * PS + 1234, 1)
    b[:] = bytes([b[:][0] ^ 0xFF])
    t = touch(m, spec)
    assert t.first_bad_page == 9 and t.mismatches == 1


def test_finish_line_holds_the_check_until_every_vcpu_is_past(tmp_path):
    """A vCPU's after-loop check waits (futex, across processes) until every vCPU crossed the line;
    the orchestrator's crossing for a lost vCPU counts the same."""
    from postcopy_core.board import AccessBoard

    board = AccessBoard(3)
    lib.pch_finish_line_cross(board.finish_line, 3)  # vCPU 0 is past its loop
    pid = os.fork()
    if pid == 0:  # vCPU 1: crosses, then waits for the last one
        lib.pch_finish_line_cross(board.finish_line, 3)
        lib.pch_finish_line_wait(board.finish_line, 3)
        os._exit(0)
    try:
        time.sleep(0.3)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still waiting: vCPU 2 has not crossed
        assert board.finish_line[0] == 2
        t0 = time.monotonic()
        board.count_lost()  # vCPU 2 died in its loop: crossed on its behalf
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert time.monotonic() - t0 < 0.5  # woken, not left to its one-second timeout
        pid = 0
    finally:
        if pid:  # a failed assertion: the child would wait forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        board.close()
