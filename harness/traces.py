"""Read, write and replay traces through the blocktime engines (the API behind ``postcopy_harness``).

``postcopy_harness`` re-exports these names; the ``replay`` command and the pytest plugin use them too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from postcopy_core import blocktime as _bt
from postcopy_core.blocktime import Engine, Event, EventColumns, TraceMeta
from postcopy_core.blocktime import trace as _trace


def engine_names() -> tuple[str, ...]:
    """Names of every blocktime engine, in report order (read at call time: new engines appear)."""
    return tuple(_bt.ALL_ENGINE_NAMES)


def make_engine(name: str, meta: TraceMeta) -> Engine:
    """A fresh per-event engine: call ``.fault(Fault)`` / ``.placed(Placed)`` in order, then ``.result()``."""
    return _bt.make_engine(name, meta)


def _engines(engines: Sequence[str] | str | None) -> tuple[str, ...]:
    if engines is None or engines == "all":
        return engine_names()
    if isinstance(engines, str):
        return (engines,)
    return tuple(engines)


def read_trace(
    path: str | os.PathLike, format: str = "auto", vcpus: int | None = None
) -> tuple[TraceMeta, EventColumns]:
    """Read a native trace (``run --trace``) or a QEMU trace log, plain or gzip.

    ``format`` is "auto" (detect), "native" or "qemu-log"; ``vcpus`` overrides the vCPU count (needed
    for a QEMU log in which some vCPU never faults).  Returns the metadata and the events as columns
    (``cols.to_events()`` gives ``Fault``/``Placed`` objects).  Bad input raises BlocktimeError.
    """
    return _trace.read_trace_columns(os.fspath(path), format, vcpus)


def write_trace(path: str | os.PathLike, meta: TraceMeta, events: Iterable[Event] | EventColumns) -> int:
    """Write events (``Fault``/``Placed`` objects or columns) as a native trace; ``.gz`` compresses.

    Returns the number of events written.  The file replays to exactly the numbers of the same events.
    """
    if isinstance(events, EventColumns):
        events = events.to_events()
    count = 0
    with _trace.TraceWriter(os.fspath(path), meta) as w:
        for ev in events:
            w.write(ev)
            count += 1
    return count


def replay_events(
    meta: TraceMeta, events: Iterable[Event] | EventColumns, engines: Sequence[str] | str | None = None
) -> dict[str, dict]:
    """Run events through the named engines (default: all); ``{engine: query-migrate fields}``.

    Columns take the engines' vectorised path; event objects are converted to columns first (both
    paths give identical numbers).
    """
    cols = events if isinstance(events, EventColumns) else EventColumns.from_events(events)
    return _bt.replay_columns(meta, cols, _engines(engines))


def replay(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    vcpus: int | None = None,
    engines: Sequence[str] | str | None = None,
) -> dict[str, dict]:
    """Replay a trace file or QEMU trace log (what ``postcopy-harness replay FILE`` computes).

    Returns the ``engines`` dict: ``{engine name: query-migrate fields}``.  Raises BlocktimeError for
    unreadable or inconsistent input and for an unknown engine name.
    """
    meta, cols = read_trace(path, format, vcpus)
    return replay_events(meta, cols, engines)
