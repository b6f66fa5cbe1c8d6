"""Live blocktime accounting for a run: the handler's event records -> engines (+ trace file).

The fault handler writes one fixed-size record per fault and per placed page to a socket, a batch
per loop turn; this consumer, a thread of the orchestrator, decodes them and feeds the seed,
modern and exact engines (and the --trace writer) in the order the handler saw them, so the
engines run off the fault path and a replay of the trace gives the same numbers.
"""

from __future__ import annotations

import time

from postcopy_core.blocktime import ENGINE_NAMES, Fault, Placed, TraceMeta, make_engine
from postcopy_core.blocktime.trace import TraceWriter
from postcopy_core.handler import EV_FAULT, EV_PLACED, EVENT


class LiveAccounting:
    """Decode handler event records and feed them to engines and a trace as they arrive."""

    def __init__(self, meta: TraceMeta, engines: tuple[str, ...] = ENGINE_NAMES, trace: str | None = None) -> None:
        self.meta = meta
        self.engines = {name: make_engine(name, meta) for name in engines}
        self.trace = TraceWriter(trace, meta) if trace else None
        self._tail = b""
        self.events = 0
        self.cpu_s = 0.0  # thread CPU spent decoding and accounting

    def feed(self, chunk: bytes) -> None:
        """Consume a chunk of the record stream (records may straddle chunks)."""
        t0 = time.thread_time()
        data = self._tail + chunk if self._tail else chunk
        n = len(data) // EVENT.size
        self._tail = data[n * EVENT.size :]
        faults = [e.fault for e in self.engines.values()]
        placed = [e.placed for e in self.engines.values()]
        out = []
        for t, addr, vcpu, tid, kind, flag in EVENT.iter_unpack(data[: n * EVENT.size]):
            if kind == EV_FAULT:
                ev = Fault(t, addr, vcpu, tid, bool(flag))
                for f in faults:
                    f(ev)
            elif kind == EV_PLACED:
                ev = Placed(t, addr, bool(flag))
                for p in placed:
                    p(ev)
            else:
                raise ValueError(f"handler event stream: unknown record kind {kind}")
            out.append(ev)
        if self.trace is not None:
            self.trace.write_many(out)
        self.events += n
        self.cpu_s += time.thread_time() - t0

    def results(self) -> dict[str, dict]:
        return {name: eng.result() for name, eng in self.engines.items()}

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()


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
