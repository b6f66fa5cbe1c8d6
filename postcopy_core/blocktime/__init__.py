"""Postcopy blocktime accounting: three engines over one event stream, and the vCPUs' own truth.

* ``seed``   -- QEMU's 2018 algorithm, flaws included (ms, one slot per vCPU).  ``seed.SeedEngine`` keeps
  its O(vCPUs) scan per placement as the reference; ``make_engine`` and the columnar replay give the
  same numbers without it.
* ``modern`` -- QEMU 10.1's algorithm (ns, per-address fault lists, latencies, histogram).
* ``exact``  -- the handler-side oracle from intervals (union per vCPU, all-vCPUs-blocked overlap).
* ``truth``  -- the same fields from the vCPU workers' own stall intervals (``EventColumns.stalls``),
  not from events: only ``replay_columns`` runs it, and only when the stream carries intervals.

Live use: ``make_engine(name, meta)`` then ``.fault(ev)`` / ``.placed(ev)`` in event order and
``.result()``.  Replay: ``replay(meta, events)`` (the same per-event code, so a recorded run replays to
exactly the live numbers) or ``replay_columns(meta, cols)`` (vectorised, for long traces).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import exact, modern, seed, truth
from .common import Engine
from .events import BlocktimeError, Event, EventColumns, Fault, Placed, StallColumns, TraceMeta

__all__ = [
    "ALL_ENGINE_NAMES",
    "ENGINE_NAMES",
    "TRUTH",
    "BlocktimeError",
    "Engine",
    "Event",
    "EventColumns",
    "Fault",
    "Placed",
    "StallColumns",
    "TraceMeta",
    "make_engine",
    "replay",
    "replay_columns",
    "truth_result",
]

ENGINE_NAMES = ("seed", "modern", "exact")  # the engines over the handler's events
TRUTH = truth.NAME  # the engine over the vCPUs' stall intervals
ALL_ENGINE_NAMES = (*ENGINE_NAMES, TRUTH)

_CLASSES = {"seed": seed.IndexedSeedEngine, "modern": modern.ModernEngine, "exact": exact.ExactEngine}
_COLUMNAR = {"seed": seed.compute_columns, "modern": modern.compute_columns, "exact": exact.compute_columns}


def _check_names(engines: Sequence[str], allowed: Sequence[str] = ENGINE_NAMES) -> None:
    for name in engines:
        if name not in allowed:
            raise BlocktimeError(f"unknown engine {name!r} (choose from {', '.join(allowed)})")


def make_engine(name: str, meta: TraceMeta) -> Engine:
    """A fresh engine called ``name`` ("seed", "modern" or "exact") for a run described by ``meta``."""
    if name == TRUTH:
        raise BlocktimeError("the truth engine takes stall intervals, not events: use replay_columns")
    _check_names([name])
    return _CLASSES[name](meta)


def replay(
    meta: TraceMeta, events: Iterable[Event], engines: Sequence[str] = ENGINE_NAMES
) -> dict[str, dict]:
    """Feed ``events`` (in order) to each named engine; returns {engine name: query-migrate fields}."""
    _check_names(engines)
    live = [make_engine(name, meta) for name in engines]
    handlers = []
    for eng in live:
        handlers.append((eng.fault, eng.placed))
    for ev in events:
        if type(ev) is Fault:
            for f, _ in handlers:
                f(ev)
        elif type(ev) is Placed:
            for _, p in handlers:
                p(ev)
        else:
            raise BlocktimeError(f"not a blocktime event: {ev!r}")
    return {name: eng.result() for name, eng in zip(engines, live, strict=True)}


def replay_columns(
    meta: TraceMeta, cols: EventColumns, engines: Sequence[str] = ALL_ENGINE_NAMES
) -> dict[str, dict]:
    """Like ``replay`` over a column stream, with the vectorised paths of modern and exact.

    ``truth`` is computed from ``cols.stalls``; a stream without intervals has no ``truth`` entry.
    """
    _check_names(engines, ALL_ENGINE_NAMES)
    out = {name: _COLUMNAR[name](meta, cols) for name in engines if name != TRUTH}
    if TRUTH in engines and cols.stalls is not None:
        out[TRUTH] = truth_result(meta, cols.stalls)
    return out


def truth_result(meta: TraceMeta, stalls: StallColumns) -> dict:
    """The truth engine's query-migrate fields from the vCPUs' stall intervals."""
    return truth.compute(meta, stalls)
