"""Reading a QEMU trace log safely, and cutting it into one piece per migration.

Both importers (QEMU <= 10.0 and QEMU 10.1+) start here.  Everything a crafted file could use to
make them allocate or loop without bound is refused with one line first: a line longer than
``MAX_LINE`` bytes, bytes that are not text, the bounds of ``textfile`` (lines, decompressed bytes,
gzip ratio, records), a vCPU index or count above ``MAX_VCPUS``.

A log can hold several migrations (a file appended to by several QEMU runs, or one destination that
was migrated into again).  Each blocktime context starts at ``loadvm_postcopy_handle_advise``;
QEMU <= 10.0 also names its context in every line (``dd: 0x...``) and QEMU 10.1 prints its
``postcopy_blocktime_tid_cpu_map`` lines when a context is created, so a change of either starts a
new migration too, for logs recorded without the advise event.
"""

from __future__ import annotations

import os
import re

from .events import BlocktimeError
from .textfile import bounded_lines, too_many_records

MAX_LINE = 4096  # bytes; QEMU's blocktime lines are < 200
MAX_VCPUS = 16384  # above any QEMU machine's max_cpus; bounds what a log may make us allocate
# blocktime lines kept (~250 bytes each as Python objects: ~1 GiB at the bound); about 4 per fault,
# so a log of a million faults -- more than a real migration takes on demand
MAX_KEPT = 1 << 22

_DD = re.compile(r"\bdd: (0x[0-9a-fA-F]{1,16}|\(nil\))")
_BLOCKTIME = (
    "mark_postcopy_blocktime_begin",
    "mark_postcopy_blocktime_end",
    "postcopy_blocktime_begin",
    "postcopy_blocktime_end",
)


def _used(line: str) -> bool:
    # every event either importer or split_migrations reads has one of these in its name
    return "postcopy" in line or "get_mem_fault_cpu_index" in line


def read_log_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of the lines of a plain or gzip log the importers use, within the bounds of
    ``textfile`` (lines of at most ``MAX_LINE`` bytes; other trace events are checked, not kept)."""
    path = os.fspath(path)
    out: list[tuple[int, str]] = []
    for n, text in bounded_lines(path, MAX_LINE, keep=_used):
        if len(out) >= MAX_KEPT:
            raise too_many_records(path, n, MAX_KEPT)
        out.append((n, text))
    return out


def split_migrations(lines: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The log cut at every new blocktime context; pieces without blocktime lines are dropped."""
    pieces: list[list[tuple[int, str]]] = [[]]
    has_bt = [False]
    dd: str | None = None
    in_map = False  # inside a run of tid_cpu_map lines
    for n, line in lines:
        new = False
        if "loadvm_postcopy_handle_advise" in line:
            new = True
        elif "postcopy_blocktime_tid_cpu_map" in line:
            new = not in_map and has_bt[-1]
            in_map = True
        else:
            in_map = in_map and not any(k in line for k in _BLOCKTIME)
            m = _DD.search(line) if "mark_postcopy_blocktime_" in line else None
            if m is not None:
                new = dd is not None and m.group(1) != dd
                dd = m.group(1)
        if new and pieces[-1]:
            pieces.append([])
            has_bt.append(False)
            if "mark_postcopy_blocktime_" not in line:
                dd = None
        pieces[-1].append((n, line))
        if any(k in line for k in _BLOCKTIME):
            has_bt[-1] = True
    return [p for p, bt in zip(pieces, has_bt, strict=True) if bt]


def check_vcpus(path: str, what: str, value: int, line: int | None = None) -> None:
    """Refuse a vCPU index or count a real QEMU cannot have, before anything is sized by it."""
    if not 0 <= value < MAX_VCPUS:
        where = f"line {line}: " if line is not None else ""
        raise BlocktimeError(f"{path}: {where}{what} {value} is out of range (at most {MAX_VCPUS - 1})")
