"""run --precopy: dirtying by generation, discard batching, the destination's DISCARD, end-to-end runs.

The end-to-end runs are real (kernel uffds, memfds, processes): pages dirtied during precopy after
they were sent are discarded at the switchover and must fault again; a discard the source "forgets"
must be caught by verification (the workers and the handler check every page's final generation).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness.config import ConfigError, RunConfig
from harness.report import build_report
from harness.run import execute
from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image, check_page
from postcopy_core.precopy import GenerationMap, stale_ranges
from postcopy_core.protocol import (
    DISCARD_MAX_RANGES,
    DISCARD_RANGE,
    HDR,
    MSG_DISCARD,
    MSG_POSTCOPY_START,
    Geometry,
    ProtocolError,
    encode_discards,
    encode_hello,
    encode_postcopy_start,
)
from tests.conftest import requires_uffd
from tests.frame_reader import FrameReader
from tests.test_dest_c import GEO, HELLO, IMG, NPAGES, PS, SPEC, CDest, pages_frame

# ---------------------------------------------------------------- content by generation


def test_a_rewritten_page_differs_from_every_other_generation():
    spec = ContentSpec(PS, 8, seed=5, zero_permille=500)
    buf = kernel.mmap_anon(PS)
    try:
        for page in range(8):
            lib.pch_fill_page_gen(buf.pointer(), spec.seed, page, 0, PS, spec.zero_permille)
            assert check_page(buf.addr, spec, page) == 0  # generation 0 is today's content
            for gen in (1, 2, 7):
                lib.pch_fill_page_gen(buf.pointer(), spec.seed, page, gen, PS, spec.zero_permille)
                assert check_page(buf.addr, spec, page, gen=gen) == 0
                assert bytes(buf.buffer()) != bytes(PS)  # a rewritten page is never all zeros
                # an older copy (or the original) is caught, word by word
                assert check_page(buf.addr, spec, page, gen=gen - 1) > PS // 8 // 2
                assert check_page(buf.addr, spec, page, gen=gen + 1) > PS // 8 // 2
    finally:
        buf.close()


# ---------------------------------------------------------------- discard ranges and batching


def test_stale_ranges_are_the_runs_of_dirtied_pages():
    stale = np.zeros(20, np.uint8)
    stale[[0, 1, 2, 5, 9, 10, 19]] = 1
    assert stale_ranges(stale) == [(0, 3), (5, 1), (9, 2), (19, 1)]
    assert stale_ranges(np.zeros(4, np.uint8)) == []


@pytest.mark.parametrize("n", [1, 11, 12, 13, 25, 36])
def test_discards_are_batched_twelve_ranges_per_command(n):
    ranges = [(2 * i, 1) for i in range(n)]
    wire = encode_discards(ranges, PS)
    r = FrameReader(1 << 16, Geometry(PS, 128 * PS), precopy=True)
    r.buf[: len(wire)] = wire
    r.end = len(wire)
    frames = list(r.frames())
    assert [f.mtype for f in frames] == [MSG_DISCARD] * -(-n // DISCARD_MAX_RANGES)
    assert all(1 <= f.count <= DISCARD_MAX_RANGES for f in frames)
    assert [f.count for f in frames[:-1]] == [DISCARD_MAX_RANGES] * (len(frames) - 1)  # full batches first
    got = [(off // PS, length // PS) for f in frames for off, length in f.ranges]
    assert got == ranges


def decode(data: bytes, precopy: bool = True, urgent: bool = False) -> list:
    r = FrameReader(1 << 16, None, precopy=precopy, urgent=urgent)
    r.buf[: len(data)] = data
    r.end = len(data)
    return list(r.frames())


def discard_frame(ranges: list[tuple[int, int]], count: int | None = None, flags: int = 0, offset: int = 0) -> bytes:
    payload = b"".join(DISCARD_RANGE.pack(o, n) for o, n in ranges)
    return HDR.pack(MSG_DISCARD, flags, len(ranges) if count is None else count, len(payload), offset) + payload


BAD_PRECOPY = [
    (HELLO + discard_frame([(0, PS)]), dict(precopy=False), "DISCARD: not in precopy"),
    (HELLO + encode_postcopy_start(), dict(precopy=False), "POSTCOPY_START: not in precopy"),
    (HELLO + discard_frame([(0, PS)]), dict(urgent=True), "DISCARD: on the urgent channel"),
    (HELLO + encode_postcopy_start() + discard_frame([(0, PS)]), {}, "DISCARD: not in precopy"),
    (HELLO + encode_postcopy_start() + encode_postcopy_start(), {}, "POSTCOPY_START: not in precopy"),
    (HELLO + discard_frame([(0, PS)] * 13), {}, "DISCARD: 13 ranges, must be 1..12"),
    (HELLO + HDR.pack(MSG_DISCARD, 0, 0, 0, 0), {}, "DISCARD: 0 ranges, must be 1..12"),
    (HELLO + discard_frame([(0, PS)], count=2), {}, "DISCARD: payload length 16, expected 32 for 2 ranges"),
    (HELLO + discard_frame([(0, PS)], flags=1), {}, "DISCARD: unknown flags 0x1"),
    (HELLO + discard_frame([(0, PS)], offset=PS), {}, "DISCARD: offset must be 0"),
    (HELLO + discard_frame([(1, PS)]), {}, "DISCARD: range 0 (0x1+0x1000) is not whole pages"),
    (HELLO + discard_frame([(0, PS), (PS, 0)]), {}, "DISCARD: range 1 (0x1000+0x0) is not whole pages"),
    (HELLO + discard_frame([(0, PS), (PS, NPAGES * PS)]), {}, "outside guest RAM"),
    (HELLO + discard_frame([(2**64 - PS, 2 * PS)]), {}, "outside guest RAM"),  # no wrap-around
    (HELLO + HDR.pack(MSG_POSTCOPY_START, 0, 1, 0, 0), {}, "POSTCOPY_START: must carry nothing"),
    (HELLO + HDR.pack(MSG_POSTCOPY_START, 0, 0, 4, 0) + bytes(4), {}, "POSTCOPY_START: must carry nothing"),
    (discard_frame([(0, PS)]), {}, "DISCARD: received before HELLO"),
]


@pytest.mark.parametrize("data,kw,words", BAD_PRECOPY, ids=range(len(BAD_PRECOPY)))
def test_python_decoder_refuses_bad_precopy_frames(data, kw, words):
    with pytest.raises(ProtocolError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        decode(data, **{"precopy": True, **kw})


# ---------------------------------------------------------------- the destination's C core


@pytest.fixture
def pdest():
    d = CDest()
    lib.pch_dest_set_precopy(d.d, d.fd)
    yield d
    d.close()


@requires_uffd
@pytest.mark.kernel
@pytest.mark.parametrize("data,kw,words", BAD_PRECOPY, ids=range(len(BAD_PRECOPY)))
def test_c_decoder_refuses_bad_precopy_frames(data, kw, words):
    d = CDest()
    try:
        if kw.get("precopy", True):
            lib.pch_dest_set_precopy(d.d, d.fd)
        assert d.feed(data, 1 if kw.get("urgent") else 0) < 0
        assert words in d.error, d.error
        assert "\n" not in d.error
    finally:
        d.close()


def plain_view(d: CDest):
    """A second mapping of the destination's memfd, not registered with any uffd: reads never block."""
    return kernel.mmap_fd(d.fd, GEO.ram_size, writable=False)


@requires_uffd
@pytest.mark.kernel
def test_discard_drops_pages_so_that_they_can_be_placed_again(pdest):
    d = pdest
    data = HELLO + pages_frame(0, 8)
    assert d.feed(data) == len(data)
    assert d.stats.placed == 8 and d.stats.placed_precopy == 8
    assert d.events() == []  # no vCPU runs during precopy: nothing for the engines
    disc = encode_discards([(2, 3), (7, 1)], PS)
    assert d.feed(disc) == len(disc)
    assert [d.received[p] for p in range(8)] == [1, 1, 0, 0, 0, 1, 1, 0]
    assert d.stats.discarded == 4 and d.stats.placed == 4 and d.stats.discard_msgs == 1
    view = plain_view(d)
    try:
        for p in (2, 3, 4, 7):  # the page cache gave them up: holes (asked without touching them)
            assert os.lseek(d.fd, p * PS, os.SEEK_HOLE) == p * PS
        assert os.lseek(d.fd, 0, os.SEEK_HOLE) == 2 * PS and os.lseek(d.fd, 5 * PS, os.SEEK_HOLE) == 7 * PS
        assert check_page(view.addr + PS, SPEC, 1) == 0  # the rest is untouched
        start = encode_postcopy_start()
        assert d.feed(start) == len(start) and d.stats.t_postcopy_start > 0
        again = pages_frame(2, 3) + pages_frame(7, 1)  # postcopy: they come again, placed by UFFDIO_COPY
        assert d.feed(again) == len(again)
        assert d.stats.copy_eexist == 0 and d.stats.placed == 8 and d.stats.placed_background == 4
        assert len(d.events()) == 4  # placements count again once postcopy started
        for p in range(8):
            assert check_page(view.addr + p * PS, SPEC, p) == 0
    finally:
        view.close()


@requires_uffd
@pytest.mark.kernel
def test_a_page_sent_again_during_precopy_replaces_the_old_copy(pdest):
    d = pdest
    data = HELLO + pages_frame(0, 2)
    assert d.feed(data) == len(data)
    newer = Image(ContentSpec(PS, NPAGES, seed=99, zero_permille=0))  # other content for the same pages
    try:
        frame = HDR.pack(2, 0, 1, PS, PS) + bytes(newer.page(1))
        assert d.feed(frame) == len(frame)
        assert d.stats.precopy_rewrites == 1 and d.stats.placed == 2 and d.stats.duplicates == 0
        view = plain_view(d)
        try:
            assert bytes(view.buffer(PS, PS)) == bytes(newer.page(1))
            assert bytes(view.buffer(0, PS)) == bytes(IMG.page(0))
        finally:
            view.close()
    finally:
        newer.close()


@requires_uffd
@pytest.mark.kernel
def test_without_precopy_a_page_sent_twice_is_still_dropped():
    d = CDest()
    try:
        data = HELLO + pages_frame(0, 1) + pages_frame(0, 1)
        assert d.feed(data) == len(data)
        assert d.stats.duplicates == 1 and d.stats.precopy_rewrites == 0
    finally:
        d.close()


def test_generation_map_is_shared_through_its_fd():
    g = GenerationMap(3000)
    try:
        other = GenerationMap(3000, fd=g.fd)  # as the source maps it
        other.array[2999] = 7
        other.close()
        assert g.array[2999] == 7
        assert ffi.cast("uint32_t *", g.pointer)[2999] == 7
    finally:
        g.close()


# ---------------------------------------------------------------- end to end


def run(**kw) -> dict:
    cfg = RunConfig(**kw).validate()
    return build_report(cfg, execute(cfg))


def assert_verified(rep: dict, npages: int) -> None:
    assert rep["status"] == "completed", rep.get("error")
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0 and v["ram-pages-verified"] == npages
    assert v["pages-checked"] == npages  # random: the vCPUs' slices cover RAM
    p = rep["pages"]
    assert p["placed"] == npages
    assert p["precopy"] + p["urgent"] + p["background"] == npages


PRECOPY = dict(vcpus=2, ram=16 << 20, workload="random", precopy=0.3, dirty_rate=2000)


@requires_uffd
@pytest.mark.kernel
def test_discarded_pages_fault_again_and_every_page_is_verified(clean_machine):
    """Demand paging after precopy: a discarded page can only come back because a vCPU faulted on it."""
    rep = run(**PRECOPY, background=False)
    assert_verified(rep, 4096)
    p, f = rep["pages"], rep["faults"]
    assert p["discarded"] > 0
    assert f["on-discarded"] == p["discarded"]  # every discarded page faulted again...
    assert f["requests-discarded"] == p["discarded"] == p["requested"]  # ...and was requested: nothing else was
    assert rep["precopy"]["discard-commands"] >= -(-rep["precopy"]["discard-ranges"] // 12)
    assert rep["precopy"]["pages-dirtied"] > 0 and rep["precopy"]["rounds"] >= 2
    assert rep["duration-s"]["precopy"] >= 0.3


@requires_uffd
@pytest.mark.kernel
def test_precopy_with_the_background_stream(clean_machine):
    rep = run(**PRECOPY)
    assert_verified(rep, 4096)
    assert rep["pages"]["discarded"] > 0 and rep["pages"]["precopy"] > 0


@requires_uffd
@pytest.mark.kernel
def test_a_forgotten_discard_is_caught_by_verification(clean_machine):
    """The source keeps a few stale ranges off the discard list: the destination holds the old
    generation of those pages, and the vCPUs that read them must say so: the run fails and the final
    check names them stale (an older generation)."""
    rep = run(**PRECOPY, background=False, precopy_skip_discards=3)
    assert rep["status"] == "failed" and "verification failed" in rep["error"]
    v = rep["verification"]
    assert v["mismatches"] > 0 and v["by-kind"]["stale"] == v["ram-bad-pages"] > 0


@requires_uffd
@pytest.mark.kernel
def test_precopy_without_dirtying_leaves_nothing_to_discard(clean_machine):
    rep = run(vcpus=2, ram=8 << 20, precopy=0.1, background=False)
    assert_verified(rep, 2048)
    assert rep["pages"]["discarded"] == 0 and rep["pages"]["precopy"] == 2048 and rep["faults"]["total"] == 0


@requires_uffd
@pytest.mark.kernel
def test_precopy_on_a_modelled_link(clean_machine):
    """A link too slow to send all RAM within the precopy time: postcopy brings the rest."""
    rep = run(**PRECOPY, link="200mbit")
    assert_verified(rep, 4096)
    assert 0 < rep["pages"]["precopy"] < 4096 and rep["pages"]["discarded"] > 0


@requires_uffd
@pytest.mark.kernel
def test_precopy_on_hugetlbfs(hugepages, clean_machine):
    hugepages(12)
    rep = run(vcpus=2, ram=16 << 20, backing="hugetlb", workload="random", precopy=0.3, dirty_rate=100,
              background=False)
    assert_verified(rep, 8)
    assert rep["pages"]["discarded"] > 0
    assert rep["faults"]["on-discarded"] == rep["pages"]["discarded"]


@pytest.mark.parametrize("kw,words", [
    (dict(dirty_rate=100), "--dirty-rate needs --precopy"),
    (dict(precopy=-1), "--precopy -1: must be 0..3600"),
    (dict(precopy=float("nan")), "--precopy nan"),
    (dict(precopy=1, dirty_rate=-5), "--dirty-rate -5"),
    (dict(precopy=1, dirty_rate=float("inf")), "--dirty-rate inf"),
])
def test_bad_precopy_settings(kw, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig(**kw).validate()


def test_dirty_rate_with_an_image_is_refused(tmp_path):
    img = tmp_path / "ram.img"
    img.write_bytes(os.urandom(4096) * 16)
    with pytest.raises(ConfigError, match="--dirty-rate with --image"):
        RunConfig(ram=16 * 4096, image=str(img), precopy=1, dirty_rate=10).validate()


def test_a_hello_is_what_the_fixture_says():
    assert encode_hello(GEO) == HELLO
