"""The cffi bindings (postcopy_core/_cffi_src/) against the C headers (postcopy_core/csrc/*.h):
every function, struct and integer constant a header offers Python is declared in exactly one
binding, nothing is declared there that no header has, and a binding whose layout drifts from its
header is caught (cffi compares each struct with the compiler's layout)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from postcopy_core._uffd import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "postcopy_core" / "csrc"
SRC = ROOT / "postcopy_core" / "_cffi_src"
C_ONLY_HEADERS = {"content.h"}  # inline helpers of the C files, no binding
C_ONLY_DEFINES = {"PCH_PACKED"}  # the attribute itself, not a number


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_test_binding_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = load(SRC / "build.py")
BINDINGS = {name: load(SRC / f"{name}.py") for name in BUILD.BINDINGS}


def header_names() -> tuple[set[str], set[str], set[str]]:
    """(functions, structs, integer #defines) the Python-facing headers declare."""
    funcs, structs, defines = set(), set(), set()
    for h in CSRC.glob("*.h"):
        if h.name in C_ONLY_HEADERS:
            continue
        text = re.sub(r"/\*.*?\*/", "", h.read_text(), flags=re.S)  # comments name functions too
        funcs |= set(re.findall(r"\b(pch_[a-z0-9_]+)\s*\(", text))
        structs |= set(re.findall(r"^struct (?:PCH_PACKED )?(pch_[a-z0-9_]+)\s*(?:\{|;)", text, re.M))
        defines |= set(re.findall(r"^#define (PCH_[A-Z0-9_]+) +\S", text, re.M)) - C_ONLY_DEFINES
    return funcs, structs, defines


def declared(pattern: str) -> dict[str, list[str]]:
    """Name -> the bindings whose cdef strings declare it."""
    out: dict[str, list[str]] = {}
    for name, b in BINDINGS.items():
        text = b.TYPES + getattr(b, "PACKED", "") + b.FUNCTIONS
        for found in set(re.findall(pattern, text, re.M)):
            out.setdefault(found, []).append(name)
    return out


def test_every_header_function_is_bound_once_and_nothing_else():
    funcs, _, _ = header_names()
    bound = declared(r"\b(pch_[a-z0-9_]+)\(")
    assert sorted(funcs - set(bound)) == []
    assert sorted(set(bound) - funcs) == []
    assert {f: b for f, b in bound.items() if len(b) > 1} == {}
    lib_funcs = {n for n in dir(lib) if n.startswith("pch_")}
    assert lib_funcs == funcs


def test_every_header_struct_is_bound_once_and_laid_out_as_the_compiler_does():
    _, structs, _ = header_names()
    bound = declared(r"^struct (pch_[a-z0-9_]+)\s*(?:\{|;)")
    assert sorted(structs ^ set(bound)) == []
    assert {s: b for s, b in bound.items() if len(b) > 1} == {}
    for name in sorted(structs - {"pch_dest"}):  # pch_dest is opaque to Python
        # the first use of a struct makes cffi compare its cdef with the compiler's sizeof and offsets
        assert ffi.sizeof(f"struct {name}") > 0


def test_every_header_constant_is_bound():
    _, _, defines = header_names()
    bound = declared(r"^#define (PCH_[A-Z0-9_]+)\b")
    assert sorted(defines ^ set(bound)) == []
    for name in defines:
        assert isinstance(getattr(lib, name), int)


def test_every_c_file_is_built_by_one_binding():
    sources = [s for b in BINDINGS.values() for s in b.SOURCES]
    assert sorted(sources) == sorted(p.name for p in CSRC.glob("*.c"))
    for name, b in BINDINGS.items():
        assert b.__doc__ and b.INCLUDES.strip(), name  # says what it binds, names its headers


@pytest.mark.slow
def test_a_binding_that_drifts_from_its_header_is_caught(tmp_path):
    """The check the bindings rely on, shown on a throw-away module: a cdef with a field of the
    wrong width makes the struct's first use fail."""
    script = f"""
import sys
from cffi import FFI
ffi = FFI()
ffi.cdef("struct pch_rp_hdr {{ uint16_t type; uint32_t len; }};", packed=True)
ffi.set_source("_drift", '#include "wire.h"', include_dirs=[{str(CSRC)!r}])
ffi.compile(tmpdir={str(tmp_path)!r})
sys.path.insert(0, {str(tmp_path)!r})
from _drift import ffi as built
try:
    built.sizeof("struct pch_rp_hdr")
except built.error as e:
    print("caught:", e)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "caught:" in p.stdout and "pch_rp_hdr" in p.stdout, p.stdout
