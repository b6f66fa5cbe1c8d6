"""cffi (API mode) build script for postcopy_core._uffd: assembles the bindings of this folder.

One small module per binding (kernel, wire, verify, workers, source, dest), each naming what
Python uses, written out: INCLUDES (the C headers), TYPES (constants and structs), PACKED
(structs laid out without padding, as PCH_PACKED does in C), FUNCTIONS and SOURCES (its
csrc/*.c).  In API mode the C compiler builds the declarations against the headers, and cffi
checks each struct's size and field offsets against the compiler's when the struct is first used
(tests/test_bindings.py uses every one).  One extension for all: they share structs (a
pch_finding in a worker's result, the wire's header in the source's pump).  Built at install time
through setuptools' ``cffi_modules`` (setup.py); this folder is not installed.
"""

import importlib.util
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# Relative to the project root (where setup.py runs): setuptools refuses absolute source paths.
CSRC = Path("postcopy_core") / "csrc"
# in dependency order: a struct is declared before the bindings that embed it
BINDINGS = ("kernel", "wire", "verify", "workers", "source", "dest")


def load_bindings() -> list:
    """The binding modules, loaded by path (this folder is not a package)."""
    out = []
    for name in BINDINGS:
        spec = importlib.util.spec_from_file_location(f"_pch_binding_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append(module)
    return out


def make_ffi() -> FFI:
    bindings = load_bindings()
    ffi = FFI()
    for b in bindings:
        ffi.cdef(b.TYPES)
        if getattr(b, "PACKED", ""):
            ffi.cdef(b.PACKED, packed=True)
    for b in bindings:
        ffi.cdef(b.FUNCTIONS)
    ffi.set_source(
        "postcopy_core._uffd",
        "\n".join(b.INCLUDES for b in bindings),
        sources=[str(CSRC / src) for b in bindings for src in b.SOURCES],
        libraries=["m"],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            # a declaration here that does not match its header fails the build
                            "-Werror=incompatible-pointer-types", "-Werror=int-conversion",
                            "-Werror=implicit-function-declaration"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
