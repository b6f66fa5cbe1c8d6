"""Trace files: the harness's native event format (documented in docs/trace-format.md).

A trace is text, one record per line, optionally gzip-compressed (detected by content when reading,
chosen by a ``.gz`` suffix when writing)::

    #postcopy-harness-trace v1
    M {"vcpus": 2, "page_size": 4096, "start_ns": 0, "source": "harness", "tid_map": {"4242": 0}, "extra": {}}
    F 1500000 0 0x7000 4242 -
    P 3000000 0x7000 0
    S 0 1400000 3100000 0x7000
    #end events=2 stalls=1

``F t_ns vcpu addr tid already_received`` (vcpu ``-`` = look the tid up in tid_map; already_received
``-``/``0``/``1``), ``P t_ns addr zero``, and ``S vcpu start_ns end_ns addr``: a stall interval the
vCPU itself recorded (for the truth engine; a trace without ``S`` records and without ``stalls=`` in
its end marker has no truth).  Everything the engines use is stored, so a replay gives exactly the
live numbers.
"""

from __future__ import annotations

import array
import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import IO

from .events import (
    AR_UNKNOWN,
    KIND_FAULT,
    KIND_PLACED,
    MAX_NS,
    MAX_VCPUS,
    BlocktimeError,
    Event,
    EventColumns,
    Fault,
    Placed,
    StallColumns,
    TraceMeta,
)
from .textfile import MAX_RECORDS, bounded_lines, too_many_records

MAGIC = "#postcopy-harness-trace"
VERSION = 1
FORMATS = ("auto", "native", "qemu-log")
MAX_LINE = 1 << 20  # bytes; the 'M' line of 16384 vCPUs' tid_map is ~300 KB, records < 100
SNIFF_LINES = 500  # lines (blank ones too) detect_format looks at
_QEMU_LINE = re.compile(r"^\d+@\d+\.\d+:\w+")
_AR_TEXT = {None: "-", False: "0", True: "1"}
_AR_PARSE = {"-": AR_UNKNOWN, "0": 0, "1": 1}


class TraceWriter:
    """Write a native trace: ``TraceWriter(path, meta)``, ``.write(ev)`` per event, ``.close()``.

    Use as a context manager.  The closing ``#end events=N`` line lets readers tell a complete trace
    from one cut short by a crash; ``.write_stalls(stalls)`` adds the vCPUs' stall intervals and
    ``stalls=K`` to that line.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta) -> None:
        meta.check()
        from postcopy_core.outfile import open_output

        self.path = os.fspath(path)
        # mode 0600, no symbolic link followed: the trace tells which guest pages were touched when
        self._raw = open_output(self.path, "wb", private=True)
        if self.path.endswith(".gz"):
            # compresslevel 6: ~3x faster than the default 9 for nearly the same size on traces.
            gz = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=6)
            self._fh: IO[str] = io.TextIOWrapper(gz, encoding="ascii")
        else:
            self._fh = io.TextIOWrapper(self._raw, encoding="ascii")
        self.count = 0
        self.stalls: int | None = None  # stall records written (None: this trace has no intervals)
        self._fh.write(f"{MAGIC} v{VERSION}\n")
        self._fh.write("M " + json.dumps(meta_to_json(meta), sort_keys=True) + "\n")

    def write(self, ev: Event) -> None:
        """Append one event."""
        if type(ev) is Fault:
            line = f"F {ev.t_ns} {ev.vcpu} {ev.addr:#x} {ev.tid} {_AR_TEXT[ev.already_received]}\n"
        elif type(ev) is Placed:
            line = f"P {ev.t_ns} {ev.addr:#x} {int(ev.zero)}\n"
        else:
            raise BlocktimeError(f"not a blocktime event: {ev!r}")
        self._fh.write(line)
        self.count += 1

    def write_many(self, events: Iterable[Event]) -> None:
        """Append many events."""
        for ev in events:
            self.write(ev)

    def write_stalls(self, stalls: StallColumns) -> None:
        """Append the vCPUs' stall intervals (``S`` records); the trace then has a ``truth``."""
        lines = [
            f"S {v} {s} {e} {a:#x}\n"
            for v, s, e, a in zip(
                stalls.vcpu.tolist(), stalls.start_ns.tolist(), stalls.end_ns.tolist(),
                stalls.addr.tolist(), strict=True,
            )
        ]
        self._fh.writelines(lines)
        self.stalls = (self.stalls or 0) + len(lines)

    def flush(self) -> None:
        """Push buffered lines to the file (a live run may call this now and then)."""
        self._fh.flush()

    def close(self) -> None:
        """Write the end marker and close; safe to call twice."""
        if self._fh.closed:
            return
        tail = "" if self.stalls is None else f" stalls={self.stalls}"
        self._fh.write(f"#end events={self.count}{tail}\n")
        self._fh.close()
        self._raw.close()  # a GzipFile leaves the file it wrote into open

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def meta_to_json(meta: TraceMeta) -> dict:
    """TraceMeta as the JSON object of the ``M`` line (tid_map keys become strings)."""
    return {
        "vcpus": meta.vcpus,
        "page_size": meta.page_size,
        "start_ns": meta.start_ns,
        "source": meta.source,
        "tid_map": {str(k): v for k, v in meta.tid_map.items()},
        "extra": meta.extra,
    }


def meta_from_json(obj: object, lineno: int) -> TraceMeta:
    """Validate and convert the ``M`` line's object."""

    def bad(why: str) -> BlocktimeError:
        return BlocktimeError(f"line {lineno}: bad metadata: {why}")

    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    for key in ("vcpus", "page_size"):
        if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool):
            raise bad(f"{key!r} must be an integer")
    start = obj.get("start_ns", 0)
    if not isinstance(start, int):
        raise bad("'start_ns' must be an integer")
    tid_map = obj.get("tid_map", {})
    if not isinstance(tid_map, dict):
        raise bad("'tid_map' must be an object")
    try:
        tids = {int(k): int(v) for k, v in tid_map.items()}
    except (TypeError, ValueError, OverflowError):
        raise bad("'tid_map' must map thread ids to vCPU indexes") from None
    extra = obj.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("'extra' must be an object")
    meta = TraceMeta(
        vcpus=obj["vcpus"],
        page_size=obj["page_size"],
        tid_map=tids,
        start_ns=start,
        source=str(obj.get("source", "harness")),
        extra=extra,
    )
    try:
        meta.check()
    except BlocktimeError as exc:
        raise bad(str(exc)) from None
    return meta


def iter_lines(path: str | os.PathLike, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) of a plain or gzip native trace, within the bounds of
    ``textfile`` (lines of at most ``MAX_LINE`` bytes), with one-line errors."""
    return bounded_lines(path, MAX_LINE, skip_blank=skip_blank)


def detect_format(path: str | os.PathLike) -> str:
    """ "native" or "qemu-log", from the first lines."""
    for n, line in iter_lines(path, skip_blank=False):
        if n > SNIFF_LINES:  # blank lines count: a file of newlines is told apart at once
            break
        if line.startswith(MAGIC):
            return "native"
        if _QEMU_LINE.match(line) or "postcopy_blocktime_" in line:
            return "qemu-log"
    raise BlocktimeError(
        f"{os.fspath(path)}: unrecognised format: neither a postcopy-harness trace "
        f"(first line '{MAGIC} v{VERSION}') nor a QEMU trace log with 'TID@SEC.USEC:event' lines"
    )


def _not_a_record(path: str, n: int, line: str, seen_magic: bool) -> tuple[bool, tuple[int, int | None] | None]:
    """A line that holds no record: before the header only blank lines and the header itself;
    after it, blank lines and comments, one of which may be the end marker.  (header seen now,
    the end marker's counts or None)."""
    if not seen_magic:
        if not line.strip():
            return False, None
        _check_magic(path, n, line)
        return True, None
    return True, _end_marker(path, n, line) if line.startswith("#end") else None


def _check_magic(path: str, n: int, line: str) -> None:
    """The first line: this format, this version."""
    m = re.fullmatch(re.escape(MAGIC) + r" v(\d{1,9})\s*", line)
    if not m:
        raise BlocktimeError(
            f"{path}: line {n}: not a postcopy-harness trace (expected '{MAGIC} v1')"
        )
    if int(m.group(1)) != VERSION:
        raise BlocktimeError(
            f"{path}: line {n}: unsupported trace version v{m.group(1)} "
            f"(this reader knows v{VERSION})"
        )


def _end_marker(path: str, n: int, line: str) -> tuple[int, int | None]:
    """``#end events=N [stalls=M]``: (N, M or None)."""
    m = re.fullmatch(r"#end events=(\d{1,19})(?: stalls=(\d{1,19}))?\s*", line)
    if not m:
        raise BlocktimeError(f"{path}: line {n}: malformed end marker: {line[:80]!r}")
    return int(m.group(1)), None if m.group(2) is None else int(m.group(2))


def _metadata(path: str, n: int, line: str) -> TraceMeta:
    """The ``M {json}`` line."""
    try:
        obj = json.loads(line[2:])
    except json.JSONDecodeError as exc:
        raise BlocktimeError(
            f"{path}: line {n}: metadata is not valid JSON ({exc.msg})"
        ) from None
    except (ValueError, RecursionError):  # a number of thousands of digits, deep nesting
        raise BlocktimeError(f"{path}: line {n}: metadata is not usable JSON") from None
    try:
        return meta_from_json(obj, n)
    except BlocktimeError as exc:
        raise BlocktimeError(f"{path}: {exc}") from None


def _check_whole(path: str, seen_magic: bool, meta: TraceMeta | None, declared_end: int | None, events: int,
                 declared_stalls: int | None, stalls: int) -> TraceMeta:
    """After the last line: a header was there, and the end marker's counts match (no marker: the
    trace is marked incomplete)."""
    if not seen_magic:
        raise BlocktimeError(f"{path}: empty file")
    if meta is None:
        raise BlocktimeError(f"{path}: no 'M' metadata line")
    if declared_end is None:
        meta.extra = {**meta.extra, "complete": False}
    elif declared_end != events:
        raise BlocktimeError(f"{path}: end marker says {declared_end} events, the file holds {events}")
    if declared_stalls is not None and declared_stalls != stalls:
        raise BlocktimeError(
            f"{path}: end marker says {declared_stalls} stall intervals, the file holds {stalls}"
        )
    return meta


def read_native_columns(path: str | os.PathLike) -> tuple[TraceMeta, EventColumns]:
    """Parse a native trace into columns; raise BlocktimeError naming the line on any bad input."""
    path = os.fspath(path)
    # typed arrays, not lists: 8 bytes a value instead of ~36, so MAX_RECORDS bounds the memory
    kind, flag = array.array("b"), array.array("b")
    ts, addr, vcpu, tid = (array.array("q") for _ in range(4))
    s_vcpu, s_start, s_end, s_addr = (array.array("q") for _ in range(4))
    meta: TraceMeta | None = None
    declared_end: int | None = None
    declared_stalls: int | None = None
    seen_magic = False
    tid_map: dict[int, int] = {}
    for n, line in iter_lines(path):
        if not seen_magic or not line or line[0] == "#":  # the header, a blank line, a comment, the end
            seen_magic, end = _not_a_record(path, n, line, seen_magic)
            if end is not None:
                declared_end = end[0]
                declared_stalls = declared_stalls if end[1] is None else end[1]
            continue
        if declared_end is not None or len(kind) + len(s_vcpu) >= MAX_RECORDS:
            raise (BlocktimeError(f"{path}: line {n}: record after the end marker") if declared_end is not None
                   else too_many_records(path, n))
        tag = line[0]
        parts = line.split()
        try:
            if tag == "F" and len(parts) == 6 and meta is not None:
                t = int(parts[1])
                th = int(parts[4])
                v = tid_map.get(th, -1) if parts[2] == "-" else int(parts[2])
                a = int(parts[3], 16)
                f = _AR_PARSE[parts[5]]
                if not -1 <= v < MAX_VCPUS or not (0 <= a <= MAX_NS and 0 <= t <= MAX_NS and 0 <= th <= MAX_NS):
                    raise ValueError
                kind.append(KIND_FAULT)
                vcpu.append(v)
                tid.append(th)
                flag.append(f)
            elif tag == "P" and len(parts) == 4 and meta is not None:
                t = int(parts[1])
                a = int(parts[2], 16)
                z = parts[3]
                if z not in ("0", "1") or not 0 <= a <= MAX_NS or not 0 <= t <= MAX_NS:
                    raise ValueError
                kind.append(KIND_PLACED)
                vcpu.append(0)
                tid.append(0)
                flag.append(int(z))
            elif tag == "S" and len(parts) == 5 and meta is not None:
                v, t0, t1, a = int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4], 16)
                if v < 0 or t0 < 0 or t1 < t0 or a < 0:
                    raise ValueError
                s_vcpu.append(v)
                s_start.append(t0)
                s_end.append(t1)
                s_addr.append(a)
                continue  # not an event: no time/address in the event columns
            elif tag == "M" and meta is None and line.startswith("M "):
                meta = _metadata(path, n, line)
                tid_map = meta.tid_map
                continue
            else:
                raise (BlocktimeError(f"{path}: line {n}: event before the 'M' metadata line") if meta is None
                       else ValueError)
        except BlocktimeError:
            raise  # already names the line (and is a ValueError, so it must pass through first)
        except (ValueError, KeyError, OverflowError):
            raise BlocktimeError(f"{path}: line {n}: malformed record: {line[:80]!r}") from None
        ts.append(t)
        addr.append(a)
    meta = _check_whole(path, seen_magic, meta, declared_end, len(kind), declared_stalls, len(s_vcpu))
    cols = EventColumns.from_lists(kind, ts, addr, vcpu, tid, flag)
    if s_vcpu or declared_stalls is not None:
        cols.stalls = StallColumns.from_lists(s_vcpu, s_start, s_end, s_addr)
    return meta, cols


def read_trace_columns(
    path: str | os.PathLike, fmt: str = "auto", vcpus: int | None = None
) -> tuple[TraceMeta, EventColumns]:
    """Read a native trace or a QEMU trace log into columns; ``vcpus`` overrides the vCPU count."""
    if fmt not in FORMATS:
        raise BlocktimeError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
        raise BlocktimeError(f"--vcpus must be 1..{MAX_VCPUS}, got {vcpus}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "native":
        meta, cols = read_native_columns(path)
        if vcpus is not None:
            used = int(cols.vcpu[cols.kind == KIND_FAULT].max(initial=-1)) + 1
            if vcpus < used:  # the user's number is wrong, not the trace
                raise BlocktimeError(f"--vcpus {vcpus} is smaller than the {used} vCPUs the trace "
                                     f"{os.fspath(path)} uses (vCPU {used - 1} faults)")
            meta.vcpus = vcpus
        return meta, cols
    from .qemu_log import import_qemu_log  # the importer is big; load it only when needed

    meta, events = import_qemu_log(path, vcpus=vcpus)
    return meta, EventColumns.from_events(events)


def read_trace(
    path: str | os.PathLike, fmt: str = "auto", vcpus: int | None = None
) -> tuple[TraceMeta, list[Event]]:
    """Read a native trace or a QEMU trace log (plain or gzip, ``fmt`` auto-detected by default).

    Returns the metadata and the events in stream order.  ``vcpus`` overrides the vCPU count (needed
    when some vCPU never faults in a QEMU log).  Bad input raises BlocktimeError naming the line.
    """
    if fmt not in FORMATS:
        raise BlocktimeError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
        raise BlocktimeError(f"--vcpus must be 1..{MAX_VCPUS}, got {vcpus}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "qemu-log":
        from .qemu_log import import_qemu_log

        return import_qemu_log(path, vcpus=vcpus)
    meta, cols = read_trace_columns(path, fmt, vcpus)
    return meta, cols.to_events()
