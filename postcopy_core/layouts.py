"""``struct`` formats and numpy dtypes made from C structs as cffi lays them out (the bindings in
_cffi_src/ are checked against csrc/*.h when built), so a layout shared by C and Python is written
once, in C."""

from __future__ import annotations

import struct

from postcopy_core._uffd import ffi

_CODES = {"int64_t": "q", "uint64_t": "Q", "int32_t": "i", "uint32_t": "I", "uint16_t": "H", "uint8_t": "B"}


def _code(t) -> str:
    if t.kind == "array" and t.item.cname == "char":
        return f"{t.length}s"
    return _CODES[t.cname]


def struct_format(ctype: str, order: str = "<") -> struct.Struct:
    """The C struct ``ctype`` of integer (and char[n]) fields as a ``struct.Struct`` in byte order
    ``order`` ("<" little, ">" big endian).  TypeError when the struct has padding (the format could
    not follow its offsets) or a field of another type."""
    t = ffi.typeof(ctype)
    at = 0
    for name, f in t.fields:
        if f.offset != at:
            raise TypeError(f"{ctype}: padding before {name} (offset {f.offset}, not {at})")
        at += ffi.sizeof(f.type)
    out = struct.Struct(order + "".join(_code(f.type) for _, f in t.fields))
    if out.size != ffi.sizeof(t):
        raise TypeError(f"{ctype} has padding: {ffi.sizeof(t)} bytes, its fields {out.size}")
    return out


def numpy_dtype(ctype: str):
    """The numpy dtype of the C struct ``ctype``, field by field at cffi's offsets (nested structs
    and arrays too, padding kept): a field added to the header (and its binding) shows up here by
    itself."""
    import numpy as np

    t = ffi.typeof(ctype)
    names, formats, offsets = [], [], []
    for name, f in t.fields:
        ft = f.type
        if ft.kind == "struct":
            fmt = numpy_dtype(ft.cname)
        elif ft.kind == "array":
            fmt = (np.dtype(ft.item.cname.replace("_t", "")), ft.length)
        else:
            fmt = np.dtype(ft.cname.replace("_t", ""))
        names.append(name)
        formats.append(fmt)
        offsets.append(f.offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": ffi.sizeof(t)})
