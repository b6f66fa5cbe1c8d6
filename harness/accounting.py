"""Blocktime accounting for a run: the handler's event records -> engines (+ trace file).

The fault handler writes one fixed-size record per fault and per placed page (csrc/dest.h, struct
pch_event) to a socket, in batches; a thread of the orchestrator receives them.  By default it only
keeps them, and the engines run over the whole stream once the workload is over (the columnar
path), so accounting costs the fault path nothing.  With ``live=True`` the thread decodes each batch
and feeds the engines' per-event path as the records arrive (a dashboard's view), at the price of
CPU that the workers and the handler share on a small machine.  Either way the engines see the
records in the order the handler produced them, and a replay of the trace gives the same numbers.

The fourth engine, ``truth``, needs no handler records: it takes the stall intervals the vCPU workers
recorded themselves (given to ``results`` once the workload is over) and is written to the trace too.
"""

from __future__ import annotations

import time

import numpy as np

from postcopy_core.blocktime import (
    ENGINE_NAMES,
    TRUTH,
    EventColumns,
    Fault,
    Placed,
    StallColumns,
    TraceMeta,
    make_engine,
    replay_columns,
    truth_result,
)
from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED
from postcopy_core.blocktime.trace import TraceWriter
from postcopy_core.handler import EV_FAULT, EV_PLACED, EVENT
from postcopy_core.layouts import numpy_dtype

RECORD = numpy_dtype("struct pch_event")  # csrc/dest.h: field names and offsets as cffi read them


def columns_from_records(data: bytes) -> EventColumns:
    """Decode handler records into the engines' column form."""
    if len(data) % RECORD.itemsize:
        raise ValueError(f"handler event stream ends inside a record ({len(data)} bytes)")
    rec = np.frombuffer(data, dtype=RECORD)
    kind = rec["kind"]
    if not np.isin(kind, (EV_FAULT, EV_PLACED)).all():
        raise ValueError("handler event stream: unknown record kind")
    fault = kind == EV_FAULT
    return EventColumns(
        kind=np.where(fault, KIND_FAULT, KIND_PLACED).astype(np.int8),
        t_ns=rec["t"].astype(np.int64),
        addr=rec["addr"].astype(np.int64),
        vcpu=np.where(fault, rec["vcpu"], 0).astype(np.int32),
        tid=rec["tid"].astype(np.int64),
        flag=rec["flag"].astype(np.int8),
    )


class Accounting:
    """Receives the handler's record stream; gives the engines' results and writes the trace."""

    def __init__(self, meta: TraceMeta, live: bool = False, engines: tuple[str, ...] = ENGINE_NAMES) -> None:
        self.meta, self.live, self.names = meta, live, engines
        self.chunks: list[bytes] = []
        self.engines = {name: make_engine(name, meta) for name in engines} if live else {}
        self._tail = b""
        self.cpu_s = 0.0  # CPU this thread spent on accounting while the run went on

    def feed(self, chunk: bytes) -> None:
        """Take a chunk of the record stream (records may straddle chunks)."""
        self.chunks.append(chunk)
        if not self.live:
            return
        t0 = time.thread_time()
        data = self._tail + chunk if self._tail else chunk
        n = len(data) // EVENT.size
        self._tail = data[n * EVENT.size :]
        faults = [e.fault for e in self.engines.values()]
        placed = [e.placed for e in self.engines.values()]
        for t, addr, vcpu, tid, kind, flag in EVENT.iter_unpack(data[: n * EVENT.size]):
            if kind == EV_FAULT:
                ev = Fault(t, addr, vcpu, tid, bool(flag))
                for f in faults:
                    f(ev)
            else:
                ev = Placed(t, addr, bool(flag))
                for p in placed:
                    p(ev)
        self.cpu_s += time.thread_time() - t0

    @property
    def events(self) -> int:
        return sum(len(c) for c in self.chunks) // EVENT.size

    def material(self, stalls: StallColumns | None) -> tuple[TraceMeta, EventColumns]:
        """The metadata and the whole record stream as columns, with the vCPUs' stall intervals
        (what ``--report`` draws)."""
        cols = columns_from_records(b"".join(self.chunks))
        cols.stalls = stalls
        return self.meta, cols

    def results(self, trace: str | None = None, stalls: StallColumns | None = None) -> dict[str, dict]:
        """The engines' query-migrate fields (``truth`` too when the vCPUs' ``stalls`` are given);
        writes the trace to ``trace`` when given."""
        cols = columns_from_records(b"".join(self.chunks))
        if trace:
            with TraceWriter(trace, self.meta) as w:
                w.write_many(cols.to_events())
                if stalls is not None:
                    w.write_stalls(stalls)
        if self.live:
            out = {name: eng.result() for name, eng in self.engines.items()}
        else:
            out = replay_columns(self.meta, cols, self.names)
        if stalls is not None:
            out[TRUTH] = truth_result(self.meta, stalls)
        return out


def _vcpu_ms(res: dict) -> list[float]:
    """An engine's per-vCPU blocktime in ms, at ns precision where the engine gives it."""
    if "vcpu-blocktime-ns" in res:
        return [ns / 1e6 for ns in res["vcpu-blocktime-ns"]]
    return [float(ms) for ms in res["postcopy-vcpu-blocktime"]]


def _total_ms(res: dict) -> float:
    """An engine's all-vCPUs-blocked time in ms, at ns precision where the engine gives it."""
    if "blocktime-ns" in res:
        return res["blocktime-ns"] / 1e6
    return float(res["postcopy-blocktime"])


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _against_truth(per: list[float], total: float, truth: dict) -> dict:
    """How an engine's per-vCPU and all-vCPUs blocktime compare with the truth engine's."""
    t_per, t_total = _vcpu_ms(truth), _total_ms(truth)
    return {
        "vcpu-share": [_share(b, t) for b, t in zip(per, t_per, strict=True)],
        "vcpu-total-share": _share(sum(per), sum(t_per)),
        "blocktime-ms": round(total, 3),
        "truth-blocktime-ms": round(t_total, 3),
        "blocktime-share": _share(total, t_total),
    }


def accuracy(stall_ms: list[float], engines: dict[str, dict]) -> dict:
    """Each engine's per-vCPU blocktime next to the workers' own stall clocks, as a share; with a
    ``truth`` engine, also each other engine's per-vCPU and total blocktime against truth's."""
    out: dict = {"vcpu-stall-ms": stall_ms}
    total_stall = sum(stall_ms)
    truth = engines.get(TRUTH)
    for name, res in engines.items():
        per = _vcpu_ms(res)
        out[name] = {
            "vcpu-blocktime-ms": [round(x, 3) for x in per],
            "share": [round(b / s, 4) if s > 0 else None for b, s in zip(per, stall_ms, strict=True)],
            "total-share": round(sum(per) / total_stall, 4) if total_stall > 0 else None,
            "max-excess-ms": round(max((b - s for b, s in zip(per, stall_ms, strict=True)), default=0.0), 3),
        }
        if truth is not None and name != TRUTH:
            out[name]["vs-truth"] = _against_truth(per, _total_ms(res), truth)
    return out
