"""Each layout shared by C and Python is declared once; the other side is made from it or checked
against it here, field by field (offsets and sizes, not only the total)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

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
