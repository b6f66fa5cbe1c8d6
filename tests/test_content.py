"""Generated RAM content: deterministic, zero share honoured, every flipped byte detected."""

from __future__ import annotations

import ctypes

from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy_core import kernel
from postcopy_core.content import ContentSpec, Image, check_page

PS = kernel.PAGE_SIZE


def test_same_seed_same_content_other_seed_differs():
    a, b, c = (Image(ContentSpec(PS, 16, seed=s, zero_permille=0)) for s in (5, 5, 6))
    try:
        assert bytes(a.mapping.buffer()) == bytes(b.mapping.buffer())
        assert bytes(a.mapping.buffer()) != bytes(c.mapping.buffer())
    finally:
        for i in (a, b, c):
            i.close()


def test_zero_share_is_roughly_honoured():
    spec = ContentSpec(PS, 4000, seed=1, zero_permille=250)
    zeros = sum(spec.is_zero(p) for p in range(spec.npages))
    assert 850 < zeros < 1150
    img = Image(spec)
    try:
        for p in range(64):
            assert (bytes(img.page(p)) == bytes(PS)) == spec.is_zero(p)
    finally:
        img.close()


@settings(max_examples=60, deadline=None)
@given(page=st.integers(0, 7), byte=st.integers(0, PS - 1), seed=st.integers(0, 2**63 - 1))
def test_any_flipped_byte_is_a_mismatch(page, byte, seed):
    spec = ContentSpec(PS, 8, seed=seed, zero_permille=300)
    img = Image(spec)
    try:
        addr = img.mapping.addr + page * PS
        assert check_page(addr, spec, page) == 0
        b = ctypes.c_uint8.from_address(addr + byte)
        b.value ^= 0x5A
        assert check_page(addr, spec, page) == 1
        assert check_page(addr, spec, page, ref=None) == 1
    finally:
        img.close()
