"""Replay speed of the blocktime engines, on one core.

Prints events/s of every engine on the columnar replay path (what ``postcopy-harness replay`` uses)
at 8, 256 and 1024 vCPUs (target: >= 1 M events/s at 256), the per-event path (what a live run with
--live-engines uses), the seed engine's scanning reference (seed.SeedEngine: its placement scans
every vCPU, as QEMU's does; the QEMU-log importer drives it), and native trace read/write speed.

Reproduce:  python bench/bench_replay.py            (about a minute)
            python bench/bench_replay.py --quick    (a few seconds, smaller inputs)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable

try:  # the installed package (plain or editable), not this checkout's files by path
    from rich.table import Table

    from harness.report import output_console
    from postcopy_core.blocktime import ENGINE_NAMES, replay, replay_columns
    from postcopy_core.blocktime.seed import compute_columns_per_event
    from postcopy_core.blocktime.synth import synthetic_run
    from postcopy_core.blocktime.trace import TraceWriter, read_trace_columns
except ImportError as e:
    sys.exit(f"bench/bench_replay.py needs postcopy-harness installed (pip install . or pip install -e .): {e}")


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of ``repeat`` runs (the least disturbed by the rest of the machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def workload(vcpus: int, events: int, seed: int = 1):
    """A synthetic run of about ``events`` events: per fault, one placement and 2 background ones."""
    faults_per_vcpu = max(1, events // (4 * vcpus))
    return synthetic_run(vcpus, faults_per_vcpu, seed=seed, background_per_fault=2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2_000_000, help="events for the columnar runs")
    ap.add_argument("--quick", action="store_true", help="small inputs, for a smoke test")
    args = ap.parse_args()
    n_col = 200_000 if args.quick else args.events
    n_live = 50_000 if args.quick else 400_000
    n_seed = {8: 40_000, 256: 8_000, 1024: 4_000} if args.quick else {8: 400_000, 256: 80_000, 1024: 40_000}
    repeat = 1 if args.quick else 3
    console = output_console()  # no wrapped numbers when piped
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as promised

    t = Table(title="blocktime engines: replay speed (one core)")
    for col in ("path", "engine", "vCPUs", "events", "seconds", "events/s", "note"):
        t.add_column(col, justify="right" if col in ("vCPUs", "events", "seconds", "events/s") else "left")

    for vcpus in (8, 256, 1024):
        meta, cols = workload(vcpus, n_col)
        for name in ENGINE_NAMES:
            dt = best_of(repeat, lambda m=meta, c=cols, name=name: replay_columns(m, c, [name]))
            rate = len(cols) / dt
            note = ("target 1 M/s " + ("met" if rate >= 1e6 else "MISSED")) if vcpus == 256 else ""
            t.add_row("columnar", name, str(vcpus), f"{len(cols):,}", f"{dt:.3f}", f"{rate:,.0f}", note)

    for vcpus in (256, 8):  # the 8-vCPU events are kept for the trace I/O rows
        meta_l, cols_l = workload(vcpus, n_live)
        events = cols_l.to_events()
        for name in ENGINE_NAMES:
            dt = best_of(repeat, lambda m=meta_l, ev=events, name=name: replay(m, ev, [name]))
            t.add_row("per-event", name, str(vcpus), f"{len(events):,}", f"{dt:.3f}", f"{len(events) / dt:,.0f}",
                      "live API")

    for vcpus, n in n_seed.items():
        meta_s, cols_s = workload(vcpus, n)
        placements = int((cols_s.kind == 1).sum())
        dt = best_of(1 if vcpus > 8 else repeat, lambda m=meta_s, c=cols_s: compute_columns_per_event(m, c))
        us = dt / placements * 1e6
        t.add_row(
            "reference",
            "seed (scan)",
            str(vcpus),
            f"{len(cols_s):,}",
            f"{dt:.3f}",
            f"{len(cols_s) / dt:,.0f}",
            f"{us:.1f} us per placement (the O(vCPUs) scan)",
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.trace")
        ev_io = events[:n_live]

        def write() -> None:
            with TraceWriter(path, meta_l) as w:
                w.write_many(ev_io)

        dt_w = best_of(1, write)
        dt_r = best_of(1, lambda: read_trace_columns(path))
        size = os.path.getsize(path)
        t.add_row(
            "trace I/O",
            "write",
            "8",
            f"{len(ev_io):,}",
            f"{dt_w:.3f}",
            f"{len(ev_io) / dt_w:,.0f}",
            f"{size / len(ev_io):.1f} bytes/event",
        )
        t.add_row("trace I/O", "read", "8", f"{len(ev_io):,}", f"{dt_r:.3f}", f"{len(ev_io) / dt_r:,.0f}", "")

    console.print(t)
    print(
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"reproduce: python bench/bench_replay.py{' --quick' if args.quick else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
