"""``postcopy-harness demo``: short teaching demos, each a real run or a replay, with what to watch for.

``demo --list`` prints one demo a line (name first, then what it shows); ``demo NAME`` explains what
to look at, runs (slowly enough to watch; ``--fast`` for tests), prints what each engine counted and,
with ``--report DIR``, writes the pictures (the same files as ``run --report``, plus the demo's own).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

PROG = "postcopy-harness demo"
NS_MS = 1_000_000


@dataclass(frozen=True)
class Demo:
    """One demo: its name, a line saying what it shows, and its body (None: not available yet)."""

    name: str
    shows: str
    body: Callable[[argparse.Namespace, Console], int] | None
    missing: str = ""


class DemoError(Exception):
    """A demo that cannot run here (exit 2) or whose run failed (exit 1); one line."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ shared pieces


def _pause(args: argparse.Namespace, seconds: float) -> None:
    """Time to read (none with --fast)."""
    if not args.fast:
        time.sleep(seconds)


def _explain(console: Console, args: argparse.Namespace, title: str, lines: list[str]) -> None:
    console.print(f"[bold]{title}[/]")
    for line in lines:
        console.print(f"  {line}", highlight=False)
    console.print()
    _pause(args, 2.0)


def _engine_table(engines: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("engine")
    t.add_column("all vCPUs stalled (ms)", justify="right")
    t.add_column("per vCPU (ms)", justify="right")
    for name, r in engines.items():
        t.add_row(name, f"{r['postcopy-blocktime']:,}", ", ".join(f"{x:,}" for x in r["postcopy-vcpu-blocktime"]))
    return t


def _written(console: Console, folder: str | None, names: list[str]) -> None:
    if folder:
        console.print(f"pictures in {folder}: {', '.join(names)} (trace.json opens in ui.perfetto.dev)")


def _run_harness(args: argparse.Namespace, console: Console, **options) -> dict:
    """A real run (processes, userfaultfd) with the live view unless --fast; the report dict."""
    from harness.config import RunConfig
    from harness.runner import run_config

    cfg = RunConfig(report=args.report, **options).validate()
    progress = None
    if not args.fast:
        from harness.live import LiveView

        progress = LiveView(cfg)
    rep = run_config(cfg, progress=progress, argv=args.argv)
    if rep["status"] != "completed":
        raise DemoError(f"the run failed: {rep['error']}", 1)
    if rep.get("report-error"):
        raise DemoError(rep["report-error"], 1)
    return rep


def _replay_report(args: argparse.Namespace, meta, cols, engines: dict, title: str, notes: list[str]) -> None:
    """A replay's report folder (report.json, summary.txt, plots, trace.json)."""
    if not args.report:
        return
    from harness.replay import render_table
    from harness.report import provenance
    from harness.report_dir import write_report_dir

    rep = {**provenance(argv=args.argv), "demo": args.name, "vcpus": meta.vcpus, "page-size": meta.page_size,
           "events": len(cols), "engines": engines, "notes": notes}

    def summary(c: Console) -> None:
        c.print(render_table(engines, title))
        for line in notes:
            c.print(line, markup=False, highlight=False)

    write_report_dir(args.report, rep, summary, (meta, cols), title=title)


# ------------------------------------------------------------------ overlap


def overlap(args: argparse.Namespace, console: Console) -> int:
    """Three vCPUs on a slow link: their stalls overlap; the all-stalled span and each engine's count."""
    _explain(console, args, "overlap: three vCPUs whose stalls overlap", [
        "Three vCPU processes read random pages of their own slice of guest RAM over a slow link.",
        "Watch: each vCPU is stalled on the page it touches until that page arrives.",
        "postcopy-blocktime counts only the time ALL three are stalled at once: it stops growing",
        "as soon as one vCPU has all its pages and runs (or finishes), while the others still wait.",
        "Each engine counts it its own way: seed (QEMU 2018, ms), modern (QEMU 10.1), exact (handler",
        "intervals) and truth (the vCPUs' own clocks, which also see the wake-up).",
    ])
    fast = dict(ram=1 << 20, link="200mbit,1ms") if args.fast else dict(ram=4 << 20, link="10mbit,5ms")
    rep = _run_harness(args, console, vcpus=3, workload="random", seed=1, **fast)
    engines = rep["engines"]
    console.print(_engine_table(engines, "what each engine counted"))
    stall = rep["workers"]["vcpu-stall-ms"]
    console.print(f"the vCPUs' own stall clocks: {', '.join(f'{s:,.1f}' for s in stall)} ms; the all-stalled "
                  f"time can never exceed the smallest ({min(stall):,.1f} ms)", highlight=False)
    _written(console, args.report, ["timeline.png (the shaded band: all three stalled)", "latency.png",
                                    "placements.png", "trace.json"])
    return 0


# ------------------------------------------------------------------ reentrant

A, B, C = 0x1000, 0x2000, 0x3000
REENTRANT = (  # (ms, kind, vCPU, page, what happens)
    (10, "F", 0, A, "vCPU 0 faults on page A"),
    (20, "F", 1, B, "vCPU 1 faults on page B"),
    (25, "F", 1, C, "vCPU 1 faults again, on page C, before B arrived (its access to B was interrupted)"),
    (30, "P", -1, B, "page B arrives: the seed has forgotten vCPU 1 waited on it"),
    (40, "P", -1, A, "page A arrives: vCPU 0 runs again"),
    (45, "P", -1, C, "page C arrives: vCPU 1 runs again"),
)
STALLED = ((0, 10, 40, A), (1, 20, 45, C))  # what the vCPUs' own clocks record: one stall each


def _reentrant_stream():
    from postcopy_core.blocktime import EventColumns, StallColumns, TraceMeta
    from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED

    start = 1_000 * NS_MS
    meta = TraceMeta(2, 4096, {}, start_ns=start, source="demo reentrant")
    cols = EventColumns.from_lists(
        [KIND_FAULT if k == "F" else KIND_PLACED for _, k, _, _, _ in REENTRANT],
        [start + ms * NS_MS for ms, *_ in REENTRANT], [a for *_, a, _ in REENTRANT],
        [max(v, 0) for _, _, v, _, _ in REENTRANT], [0] * len(REENTRANT),
        [-1 if k == "F" else 0 for _, k, _, _, _ in REENTRANT])
    cols.stalls = StallColumns.from_lists([v for v, *_ in STALLED], [start + s * NS_MS for _, s, _, _ in STALLED],
                                          [start + e * NS_MS for _, _, e, _ in STALLED], [a for *_, a in STALLED])
    return meta, cols


def reentrant(args: argparse.Namespace, console: Console) -> int:
    """The seed's one slot per vCPU: a second fault overwrites the first, next to exact and truth."""
    from postcopy_core.blocktime import ALL_ENGINE_NAMES, replay_columns
    from postcopy_core.blocktime.seed import SeedEngine

    _explain(console, args, "reentrant: a vCPU's second fault overwrites its first (the 2018 seed)", [
        "QEMU's 2018 accounting keeps ONE (page, time) slot per vCPU. If a vCPU reports a second fault",
        "before the first page arrived (a signal interrupted the first access, it retried elsewhere),",
        "the second overwrites the first: the first wait is lost, and last_begin moves forward.",
        "Watch the seed's slots below, then compare its numbers with exact (handler intervals) and",
        "truth (here: what the vCPUs' own clocks record for this synthetic stream).",
    ])
    meta, cols = _reentrant_stream()
    eng = SeedEngine(meta)
    names = {A: "A", B: "B", C: "C"}
    for ev, (ms, kind, _, _, what) in zip(cols.to_events(), REENTRANT, strict=True):
        (eng.fault if kind == "F" else eng.placed)(ev)
        slots = "  ".join(f"vCPU{v}:[{names.get(eng.vcpu_addr[v], '-')} @{eng.fault_time[v] or '-'}]"
                          for v in range(meta.vcpus))
        console.print(f"  t={ms:3d} ms  {what}", highlight=False)
        console.print(f"             seed slots {slots}  per-vCPU {eng.vcpu_blocktime}  total {eng.total}",
                      style="dim", highlight=False)
        _pause(args, 1.2)
    engines = replay_columns(meta, cols, ALL_ENGINE_NAMES)
    console.print(_engine_table(engines, "the same six events, four engines"))
    notes = [f"seed charges vCPU 1 {engines['seed']['postcopy-vcpu-blocktime'][1]} ms (only 25..45: its wait on B "
             f"was overwritten); exact and truth charge {engines['exact']['postcopy-vcpu-blocktime'][1]} ms (20..45).",
             f"seed's all-stalled total is {engines['seed']['postcopy-blocktime']} ms (from last_begin 25 to 40); "
             f"both vCPUs were really stalled together from 20 to 40: {engines['exact']['postcopy-blocktime']} ms."]
    for line in notes:
        console.print(line, highlight=False)
    if args.report:
        from postcopy_core.blocktime.trace import TraceWriter

        os.makedirs(args.report, exist_ok=True)
        path = os.path.join(args.report, "reentrant.trace")
        with TraceWriter(path, meta) as w:
            w.write_many(cols.to_events())
            w.write_stalls(cols.stalls)
        _replay_report(args, meta, cols, engines, "reentrant: vCPU 1's second fault overwrites its first", notes)
        _written(console, args.report, ["timeline.png (seed's band for vCPU 1 starts late)", "trace.json",
                                        f"reentrant.trace (try: postcopy-harness replay {path})"])
    return 0


# ------------------------------------------------------------------ overcount

CAPTURE = "smp4"  # the capture whose seed total is above the exact all-stalled time
SEED_OVER = (  # the mechanism, in the 2 vCPUs of tests/test_blocktime_engines.py (ms, kind, vCPU, page)
    (10, "F", 0, 0x1000), (20, "F", 1, 0x2000), (30, "P", -1, 0x2000), (32, "F", 1, 0x3000),
    (33, "F", 0, 0x5000), (34, "P", -1, 0x1000), (40, "P", -1, 0x3000), (41, "P", -1, 0x5000),
)


def _captures_dir() -> str:
    """The QEMU captures shipped with the package (harness/data/qemu; tests/data/qemu links to them)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "qemu")


def _running_totals(meta, cols):
    """Seed's running total and the exact all-stalled time, both over the log's time (ms)."""
    import numpy as np

    from harness.timeline import all_stalled_spans, exact_lanes
    from postcopy_core.blocktime.seed import SeedEngine

    eng = SeedEngine(meta)
    t_s, v_s = [0.0], [0]
    for ev in cols.to_events():
        if hasattr(ev, "vcpu"):
            eng.fault(ev)
        else:
            before = eng.total
            eng.placed(ev)
            if eng.total != before:
                t_s.append((ev.t_ns - meta.start_ns) / NS_MS)
                v_s.append(eng.total)
    spans = all_stalled_spans(meta.vcpus, exact_lanes(meta, cols))
    t_e = [0.0] + [b / NS_MS for _, b in spans]
    v_e = np.cumsum([0] + [(b - a) / NS_MS for a, b in spans])
    return (np.asarray(t_s), np.asarray(v_s, float)), (np.asarray(t_e), v_e)


def overcount(args: argparse.Namespace, console: Console) -> int:
    """The seed's system-wide total above what was really all-stalled: a real QEMU 7.2 capture."""

    from postcopy_core.blocktime import ENGINE_NAMES, replay_columns
    from postcopy_core.blocktime.trace import read_trace_columns

    folder = args.capture or os.path.join(_captures_dir(), CAPTURE)
    log = os.path.join(folder, "trace.log.gz")
    if not os.path.exists(log):
        raise DemoError(f"no QEMU capture at {folder} (give one with --capture DIR: trace.log.gz, query-migrate.json)")
    _explain(console, args, "overcount: the seed's all-vCPUs total, counted too high", [
        f"A real QEMU 7.2 migration ({os.path.basename(folder)}): its trace log replayed through the engines.",
        "The 2018 seed adds 'now - last_begin' whenever a page ends a wait while its count says every",
        "vCPU is down; last_begin is the LATEST fault of any vCPU, in whole ms, and a vCPU whose slot",
        "was overwritten still counts as down.  So its total can exceed the time all vCPUs really",
        "were stalled at once (exact), and even a vCPU's own blocktime (the mechanism, below).",
    ])
    from postcopy_core.blocktime import BlocktimeError
    from postcopy_core.blocktime.textfile import read_json_file

    qm_path = os.path.join(folder, "query-migrate.json")
    qm = None
    try:  # a --capture folder is user input: bounded readers, one line when it is not a capture
        meta, cols = read_trace_columns(log, "auto", None)
        if os.path.exists(qm_path):
            qm = read_json_file(qm_path, "a query-migrate JSON file")
            if not isinstance(qm, dict) or not all(k in qm for k in ("postcopy-blocktime", "postcopy-vcpu-blocktime")):
                raise BlocktimeError(f"{qm_path}: no postcopy-blocktime / postcopy-vcpu-blocktime in it")
    except BlocktimeError as e:
        raise DemoError(str(e)) from None
    engines = replay_columns(meta, cols, ENGINE_NAMES)
    if qm is not None:
        engines = {"QEMU said": {k: qm[k] for k in ("postcopy-blocktime", "postcopy-vcpu-blocktime")}, **engines}
    console.print(_engine_table(engines, f"{os.path.basename(folder)}: {len(cols):,} events, {meta.vcpus} vCPUs"))
    seed_t, exact_t = engines["seed"]["postcopy-blocktime"], engines["exact"]["postcopy-blocktime"]
    notes = [f"seed (and QEMU) total {seed_t} ms vs exact all-stalled {exact_t} ms: "
             f"{'over' if seed_t > exact_t else 'under'} by {abs(seed_t - exact_t)} ms."]
    _pause(args, 1.5)
    # the mechanism where the total exceeds a vCPU's own blocktime, in eight events
    from postcopy_core.blocktime import EventColumns, TraceMeta
    from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED

    start = 1_000 * NS_MS
    small = EventColumns.from_lists([KIND_FAULT if k == "F" else KIND_PLACED for _, k, _, _ in SEED_OVER],
                                    [start + ms * NS_MS for ms, *_ in SEED_OVER], [a for *_, a in SEED_OVER],
                                    [max(v, 0) for _, _, v, _ in SEED_OVER], [0] * len(SEED_OVER),
                                    [-1 if k == "F" else 0 for _, k, _, _ in SEED_OVER])
    mech = replay_columns(TraceMeta(2, 4096, {}, start_ns=start), small, ("seed", "exact"))
    s = mech["seed"]
    notes.append(f"the mechanism (2 vCPUs, 8 events; vCPU 0's first wait is overwritten): seed total "
                 f"{s['postcopy-blocktime']} ms > seed's own vCPU 0 blocktime {s['postcopy-vcpu-blocktime'][0]} ms; "
                 f"exact: total {mech['exact']['postcopy-blocktime']} ms, vCPU 0 "
                 f"{mech['exact']['postcopy-vcpu-blocktime'][0]} ms.")
    for line in notes:
        console.print(line, highlight=False)
    if args.report:
        from harness.plots import plot_series

        _replay_report(args, meta, cols, engines if qm is None else {k: v for k, v in engines.items()
                                                                       if k != "QEMU said"},
                       f"overcount: QEMU 7.2 capture {os.path.basename(folder)}", notes)
        (ts, vs), (te, ve) = _running_totals(meta, cols)
        plot_series({f"seed running total (final {seed_t} ms)": (ts, vs),
                     f"exact all-vCPUs-stalled time (final {exact_t} ms)": (te, ve)},
                    os.path.join(args.report, "overcount.png"), args.argv,
                    f"overcount: postcopy-blocktime as it grows, QEMU 7.2 capture {os.path.basename(folder)}",
                    "time since the accounting start (ms)", "all-vCPUs blocktime so far (ms)")
        _written(console, args.report, ["overcount.png (the two totals as they grow)", "timeline.png", "trace.json"])
    return 0


# ------------------------------------------------------------------ hugepages

HUGE_FAST, HUGE_SLOW = 4 << 20, 64 << 20


HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def _reserve(need: int, wanted: int) -> Callable[[], None]:
    """Raise nr_hugepages by ``need`` so that ``wanted`` are free; returns the function that puts the
    old value back (already called if the kernel could not give them)."""
    from postcopy_core.probe import free_huge_pages

    with open(HUGEPAGES) as f:
        old = f.read().strip()

    def restore() -> None:
        with open(HUGEPAGES, "w") as f:
            f.write(old)

    try:
        with open(HUGEPAGES, "w") as f:
            f.write(str(int(old) + need))
    except OSError as e:
        raise DemoError(f"cannot reserve huge pages in {HUGEPAGES}: {e.strerror}") from None
    got = free_huge_pages()
    if got < wanted:
        restore()
        raise DemoError(f"hugepages needs {wanted} free 2 MiB huge pages; the kernel gave only {got} "
                        "(memory fragmented? try again after echo 3 > /proc/sys/vm/drop_caches)")
    return restore


def hugepages(args: argparse.Namespace, console: Console) -> int:
    """4 KiB vs 2 MiB pages: the same RAM and workload, fewer faults, longer stalls."""
    from postcopy_core.probe import free_huge_pages

    ram = HUGE_FAST if args.fast else HUGE_SLOW
    need = ram >> 21
    free = free_huge_pages()
    restore = None
    if 0 <= free < need:
        # as root the demo reserves what is missing itself and puts the setting back afterwards
        if os.geteuid() != 0:
            raise DemoError(f"hugepages needs {need} free 2 MiB huge pages, {free} are free (reserve them: "
                            f"echo {need} > {HUGEPAGES} as root, or run the demo as root: it reserves and "
                            "restores them itself)")
        restore = _reserve(need - free, need)
    try:
        _explain(console, args, "hugepages: 4 KiB pages vs 2 MiB pages", [
            f"The same {ram >> 20} MiB of guest RAM, the same workload, twice: shmem (4 KiB pages), then",
            "hugetlbfs (2 MiB pages).  A 2 MiB page is 512 small ones: one fault brings all of it, so there",
            "are far fewer faults, but each one waits for 2 MiB to cross the link: longer stalls.",
        ])
        link = "1gbit,200us" if args.fast else "200mbit,2ms"
        out = {}
        base = args.report
        for backing in ("shmem", "hugetlb"):
            args.report = os.path.join(base, backing) if base else None
            console.print(f"[bold]{backing}[/] ...")
            out[backing] = _run_harness(args, console, vcpus=2, workload="random", ram=ram, link=link,
                                        backing=backing, background=False)
        args.report = base
    finally:
        if restore:
            restore()
    t = Table(title="the same RAM, two page sizes", title_justify="left")
    for col in ("backing", "page", "faults", "p50 stall (us)", "max stall (us)", "truth blocktime (ms)"):
        t.add_column(col, justify="right")
    for backing, rep in out.items():
        lat = rep["latency-us"]
        t.add_row(backing, f"{rep['page-size'] >> 10} KiB", f"{rep['faults']['total']:,}", f"{lat['p50']:,.0f}",
                  f"{lat['max']:,.0f}", f"{rep['engines']['truth']['postcopy-blocktime']:,}")
    console.print(t)
    if base:
        from harness.plots import plot_bars

        plot_bars({b: {"faults": r["faults"]["total"], "p50 stall (us)": r["latency-us"]["p50"],
                       "truth blocktime (ms)": r["engines"]["truth"]["postcopy-blocktime"]} for b, r in out.items()},
                  os.path.join(base, "hugepages.png"), args.argv,
                  f"hugepages: {ram >> 20} MiB, 4 KiB (shmem) vs 2 MiB (hugetlbfs) pages")
        _written(console, base, ["hugepages.png", "shmem/ and hugetlb/ (each run's report)"])
    return 0


def preempt(args: argparse.Namespace, console: Console) -> int:
    """Vanilla vs preempt postcopy: the same run, answers behind the stream or on their own channel."""
    ram = 16 << 20 if args.fast else 64 << 20
    link = "1gbit,1ms"
    _explain(console, args, "preempt: one channel (vanilla) vs an urgent channel (postcopy-preempt)", [
        f"The same {ram >> 20} MiB, random workload, link {link}, twice.  Vanilla (QEMU's default): a",
        "requested page is queued behind the stream already in flight, about 1 MiB of it here, 8 ms at",
        "1 Gbit/s.  Preempt (QEMU 7.1+): it takes its own channel and overtakes the stream, so a fault",
        "costs one round trip (2 ms) and its own transfer.  Watch the fault p50.",
    ])
    out = {}
    base = args.report
    for name in ("vanilla", "preempt"):
        args.report = os.path.join(base, name) if base else None
        console.print(f"[bold]{name}[/] ...")
        out[name] = _run_harness(args, console, vcpus=2, workload="random", ram=ram, link=link, strategy=name)
    args.report = base
    t = Table(title="the same run, two ways to send an urgent page", title_justify="left")
    for col in ("strategy", "faults", "p50 stall (us)", "p99 stall (us)", "truth blocktime (ms)"):
        t.add_column(col, justify="right")
    for name, rep in out.items():
        lat = rep["latency-us"]
        t.add_row(name, f"{rep['faults']['total']:,}", f"{lat['p50']:,.0f}", f"{lat['p99']:,.0f}",
                  f"{rep['engines']['truth']['postcopy-blocktime']:,}")
    console.print(t)
    ratio = out["preempt"]["latency-us"]["p50"] / max(out["vanilla"]["latency-us"]["p50"], 1e-9)
    console.print(f"preempt's fault p50 is {ratio:.2f}x vanilla's (QEMU reported 10.7 ms -> 0.57 ms).", highlight=False)
    if base:
        from harness.plots import plot_bars

        plot_bars({n: {"p50 stall (us)": r["latency-us"]["p50"], "p99 stall (us)": r["latency-us"]["p99"],
                       "truth blocktime (ms)": r["engines"]["truth"]["postcopy-blocktime"]} for n, r in out.items()},
                  os.path.join(base, "preempt.png"), args.argv, f"preempt: {ram >> 20} MiB random, link {link}")
        _written(console, base, ["preempt.png", "vanilla/ and preempt/ (each run's report)"])
    return 0


# ------------------------------------------------------------------ the command

DEMOS: dict[str, Demo] = {d.name: d for d in (
    Demo("overlap", "three vCPUs whose stalls overlap; the all-vCPUs-stalled span, drawn and counted by each engine",
         overlap),
    Demo("reentrant", "the 2018 seed's flaw: a vCPU's second fault overwrites its first, next to exact and truth",
         reentrant),
    Demo("overcount", "the seed's all-vCPUs total above the time all vCPUs really stalled (a QEMU 7.2 capture)",
         overcount),
    Demo("hugepages", "4 KiB vs 2 MiB pages: fewer faults, longer stalls (needs free huge pages)", hugepages),
    Demo("preempt", "vanilla vs preempt postcopy: an urgent page behind the stream or on its own channel",
         preempt),
    Demo("qemu", "a real VM migrated between two local QEMUs: the guest's own stalls against QEMU's trace "
         "(needs QEMU)", lambda args, console: _qemu_demo(args, console)),
)}


def _qemu_demo(args: argparse.Namespace, console: Console) -> int:
    from harness.qemu_demo import qemu_demo

    return qemu_demo(args, console)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", help="teaching demos: watch vCPUs stall and the engines count",
                              description="Run a teaching demo (a real run or a replay) and say what to watch for.")
    p.add_argument("name", nargs="?", metavar="NAME", help="the demo to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the demos, one a line")
    p.add_argument("--fast", action="store_true", help="as quick as possible: no pauses, small runs (for tests)")
    p.add_argument("--report", metavar="DIR", help="write the demo's pictures and reports into DIR (default: none)")
    p.add_argument("--capture", metavar="DIR",
                   help="overcount: the QEMU capture folder (default: smp4, shipped with the package)")
    p.add_argument("--reserve-hugepages", action="store_true",
                   help="kept for old command lines: as root, hugepages reserves the huge pages it needs and "
                        "restores the setting after in any case")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``demo --list`` or ``demo NAME``: 0, 1 if the run failed, 2 for a demo that cannot run here."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.list:
        for d in DEMOS.values():
            print(f"{d.name:<10} {d.shows}")
        return 0
    if not args.name:
        err.print(f"{PROG}: give a demo NAME (choose from {', '.join(DEMOS)}; --list says what each shows)",
                  markup=False)
        return 2
    demo = DEMOS.get(args.name)
    if demo is None:
        err.print(f"{PROG}: no demo {args.name!r} (choose from {', '.join(DEMOS)})", markup=False)
        return 2
    if demo.body is None:
        err.print(f"{PROG}: {demo.name} is not available yet: {demo.missing}", markup=False)
        return 2
    from harness.report_dir import report_dir_problem

    problem = report_dir_problem(args.report)
    if problem:
        err.print(f"{PROG}: --report {args.report}: {problem}", markup=False)
        return 2
    args.argv = getattr(args, "argv", None) or ["postcopy-harness", "demo", args.name]
    console = Console(highlight=False, soft_wrap=True)
    try:
        return demo.body(args, console)
    except DemoError as e:
        err.print(f"{PROG} {demo.name}: {e}", markup=False)
        return e.code
    except OSError as e:
        err.print(f"{PROG} {demo.name}: {e.strerror or e}", markup=False)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.demo``, the same as the subcommand."""
    from harness.cliparser import OneLineParser

    parser = OneLineParser(prog="postcopy-harness")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
