"""Each layout shared by C and Python is declared once; the other side is made from it or checked
against it here, field by field (offsets and sizes, not only the total)."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import pytest

from harness.accounting import RECORD
from postcopy_core import handoff
from postcopy_core._uffd import ffi, lib
from postcopy_core.handler import EVENT
from vcpu_workers.workloads import WORKLOADS

CSRC = Path(__file__).resolve().parent.parent / "postcopy_core" / "csrc"


def struct_fields(fmt: str) -> list[tuple[int, int]]:
    """(offset, size) of each field of a ``struct`` format with no padding ("<", "=" or ">")."""
    codes = re.findall(r"(\d*)([a-zA-Z?])", fmt[1:])
    out, at = [], 0
    for count, code in codes:
        size = struct.calcsize(fmt[0] + count + code)
        out.append((at, size))
        at += size
    return out


def cffi_fields(ctype: str) -> list[tuple[int, int]]:
    return [(f.offset, ffi.sizeof(f.type)) for _, f in ffi.typeof(ctype).fields]


def test_event_record_is_made_from_the_c_declaration():
    t = ffi.typeof("struct pch_event")
    assert ffi.sizeof(t) == 26  # packed: what the accounting stream has always carried
    assert RECORD.names == tuple(name for name, _ in t.fields)
    assert [(RECORD.fields[n][1], RECORD.fields[n][0].itemsize) for n in RECORD.names] == cffi_fields(
        "struct pch_event")
    assert struct_fields(EVENT.format) == cffi_fields("struct pch_event")


def test_event_record_round_trips_through_c_offsets():
    e = ffi.new("struct pch_event *", {"t": -5, "addr": 1 << 40, "vcpu": -1, "tid": 77, "kind": ord("P"),
                                        "flag": 1})
    raw = bytes(ffi.buffer(e))
    assert EVENT.unpack(raw) == (-5, 1 << 40, -1, 77, ord("P"), 1)
    import numpy as np

    rec = np.frombuffer(raw, RECORD)[0]
    assert (int(rec["t"]), int(rec["addr"]), int(rec["tid"]), int(rec["kind"])) == (-5, 1 << 40, 77, ord("P"))


def test_handoff_hello_matches_the_c_declaration_field_by_field():
    assert handoff.HELLO.size == ffi.sizeof("struct pch_handoff_hello")
    assert struct_fields(handoff.HELLO.format) == cffi_fields("struct pch_handoff_hello")
    h = ffi.new("struct pch_handoff_hello *", {"magic": b"PCHW", "version": 1, "vcpu": 3, "pid": 99,
                                                "base": 1 << 33, "length": 1 << 28})
    assert handoff.HELLO.unpack(bytes(ffi.buffer(h))) == (b"PCHW", 1, 3, 99, 1 << 33, 1 << 28)


def test_workload_names_come_from_the_c_enum():
    assert WORKLOADS == ("sequential", "random", "stride", "hotset", "shared")
    for i, name in enumerate(WORKLOADS):
        assert getattr(lib, f"PCH_WL_{name.upper()}") == i
    text = (CSRC / "workloads.c").read_text()
    assert "enum {" not in text  # the kinds are not declared a second time there


def test_frame_reader_is_test_only():
    import postcopy_core.protocol as protocol

    assert not hasattr(protocol, "FrameReader")


# the wire (csrc/wire.h): QEMU's return path and our page stream, offsets as documented in protocol.py
WIRE = [
    ("struct pch_frame_hdr", "HDR", [("type", 0, 1), ("flags", 1, 1), ("count", 2, 2), ("payload_len", 4, 4),
                                     ("offset", 8, 8)], lib.PCH_HDR_SIZE),
    ("struct pch_hello", "HELLO", [("magic", 0, 4), ("version", 4, 2), ("page_size", 6, 4), ("ram_size", 10, 8),
                                   ("idlen", 18, 1)], lib.PCH_HELLO_SIZE),
    ("struct pch_discard_range", "DISCARD_RANGE", [("offset", 0, 8), ("length", 8, 8)], lib.PCH_DISCARD_RANGE_SIZE),
    ("struct pch_rp_hdr", "RP_HDR", [("type", 0, 2), ("len", 2, 2)], 4),
    ("struct pch_rp_req", "REQ", [("offset", 0, 8), ("length", 8, 4)], lib.PCH_REQ_PAGES_SIZE - 4),
    ("struct pch_rp_shut", "SHUT", [("status", 0, 4)], 4),
    ("struct pch_rp_bitmap", "BITMAP", [("first", 0, 8), ("pages", 8, 4)], lib.PCH_BITMAP_HDR),
    ("struct pch_rp_resume", "RESUME", [("received", 0, 8)], 8),
]


def big_endian_in_c(value: int, size: int) -> int:
    """What a C field holds for ``value`` after htobe: the big-endian bytes read in host order."""
    return int.from_bytes(value.to_bytes(size, "big"), sys.byteorder)


@pytest.mark.parametrize("ctype, name, fields, size", WIRE, ids=[w[1] for w in WIRE])
def test_wire_layout_is_the_c_declaration_field_by_field(ctype, name, fields, size):
    import postcopy_core.protocol as protocol

    fmt = getattr(protocol, name)
    assert fmt.format.startswith(">")  # every field is big endian on the wire
    assert [(n, f.offset, ffi.sizeof(f.type)) for n, f in ffi.typeof(ctype).fields] == fields
    assert ffi.sizeof(ctype) == size == fmt.size
    assert struct_fields(fmt.format) == cffi_fields(ctype)


@pytest.mark.parametrize("ctype, name, fields, size", WIRE, ids=[w[1] for w in WIRE])
def test_wire_struct_bytes_round_trip(ctype, name, fields, size):
    """Bytes laid out by C through the struct (big-endian values, as the lanes store them) unpack in
    Python to the values, and Python's bytes read back in C field by field."""
    import postcopy_core.protocol as protocol

    fmt = getattr(protocol, name)
    values = [b"PCHS" if n == "magic" else (0x0102030405060708 >> (8 * (8 - width))) + i
              for i, (n, _, width) in enumerate(fields)]
    c = ffi.new(ctype + " *")
    for (n, _, width), v in zip(fields, values, strict=True):
        setattr(c, n, v if n == "magic" else big_endian_in_c(v, width))
    assert list(fmt.unpack(bytes(ffi.buffer(c)))) == values
    raw = bytearray(fmt.pack(*values))  # kept alive while C reads it
    back = ffi.cast(ctype + " *", ffi.from_buffer(raw))
    for (n, _, width), v in zip(fields, values, strict=True):
        got = ffi.string(getattr(back, n), 4) if n == "magic" else big_endian_in_c(getattr(back, n), width)
        assert got == v, n


def test_wire_layouts_are_declared_once():
    import postcopy_core.protocol as protocol

    text = Path(protocol.__file__).read_text()
    assert "struct.Struct(" not in text  # every format is made from csrc/wire.h
    wire_h = (CSRC / "wire.h").read_text()
    assert "be16 type" not in wire_h  # the layouts are structs there, not comments
