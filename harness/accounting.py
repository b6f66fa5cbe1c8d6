"""Blocktime accounting for a run: the handler's event records -> engines (+ trace file).

The fault handler writes one fixed-size record per fault and per placed page (csrc/dest.h, struct
pch_event) to a socket, in batches; a thread of the orchestrator receives them.  By default it only
keeps them, and the engines run over the whole stream once the workload is over (the columnar
path), so accounting costs the fault path nothing.  With ``live=True`` the thread decodes each batch
and feeds the engines' per-event path as the records arrive (a dashboard's view), at the price of
CPU that the workers and the handler share on a small machine.  Either way the engines see the
records in the order the handler produced them, and a replay of the trace gives the same numbers.
"""

from __future__ import annotations

import time

import numpy as np

from postcopy_core.blocktime import ENGINE_NAMES, EventColumns, Fault, Placed, TraceMeta, make_engine, replay_columns
from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED
from postcopy_core.blocktime.trace import TraceWriter
from postcopy_core.handler import EV_FAULT, EV_PLACED, EVENT

RECORD = np.dtype([("t", "<i8"), ("addr", "<u8"), ("vcpu", "<i4"), ("tid", "<u4"), ("kind", "u1"),
                   ("flag", "u1")])
assert RECORD.itemsize == EVENT.size


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

    def results(self, trace: str | None = None) -> dict[str, dict]:
        """The engines' query-migrate fields; writes the trace to ``trace`` when given."""
        cols = columns_from_records(b"".join(self.chunks))
        if trace:
            with TraceWriter(trace, self.meta) as w:
                w.write_many(cols.to_events())
        if self.live:
            return {name: eng.result() for name, eng in self.engines.items()}
        return replay_columns(self.meta, cols, self.names)


def accuracy(stall_ms: list[float], engines: dict[str, dict]) -> dict:
    """Each engine's per-vCPU blocktime next to the workers' own stall clocks, as a share."""
    out: dict = {"vcpu-stall-ms": stall_ms}
    total_stall = sum(stall_ms)
    for name, res in engines.items():
        if "vcpu-blocktime-ns" in res:
            per = [ns / 1e6 for ns in res["vcpu-blocktime-ns"]]
        else:
            per = [float(ms) for ms in res["postcopy-vcpu-blocktime"]]
        out[name] = {
            "vcpu-blocktime-ms": [round(x, 3) for x in per],
            "share": [round(b / s, 4) if s > 0 else None for b, s in zip(per, stall_ms, strict=True)],
            "total-share": round(sum(per) / total_stall, 4) if total_stall > 0 else None,
            "max-excess-ms": round(max((b - s for b, s in zip(per, stall_ms, strict=True)), default=0.0), 3),
        }
    return out
