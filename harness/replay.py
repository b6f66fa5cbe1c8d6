"""``postcopy-harness replay FILE``: run recorded faults and placements through the blocktime engines.

FILE is a native trace (``run --trace``) or a QEMU trace log (``-msg timestamp=on``), plain or gzip.
Prints a table (engines side by side, QEMU's query-migrate names and units) or writes JSON with the
same ``engines`` object the run report has.  A harness trace that holds the vCPUs' own stall
intervals also gives ``truth``; other traces and QEMU logs have none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.table import Table

from postcopy_core.blocktime import ALL_ENGINE_NAMES, TRUTH, BlocktimeError, EventColumns, replay_columns
from postcopy_core.blocktime.bounds import blocktime_bounds
from postcopy_core.blocktime.qemu_log import import_qemu_migrations
from postcopy_core.blocktime.trace import FORMATS, detect_format, read_trace_columns
from postcopy_core.outfile import open_output, output_problem

# (field, unit shown in the table)
_ROWS = (
    ("postcopy-blocktime", "ms"),
    ("postcopy-vcpu-blocktime", "ms"),
    ("postcopy-latency", "ns"),
    ("postcopy-vcpu-latency", "ns"),
    ("postcopy-non-vcpu-latency", "ns"),
    ("postcopy-latency-dist", "count/bucket"),
    ("vcpu-faults", ""),
    ("non-vcpu-faults", ""),
)
_MAX_COMPARE = 16 << 20  # bytes of a --compare file
_MAX_LIST = 8  # vCPU lists longer than this are shortened in the table (the JSON has them all)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``replay`` subcommand (sets ``func=run``)."""
    p = subparsers.add_parser(
        "replay",
        help="replay a trace or QEMU trace log through the blocktime engines",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("file", metavar="FILE", help="native trace or QEMU trace log (plain or .gz)")
    p.add_argument(
        "--engine", choices=(*ALL_ENGINE_NAMES, "all"), default="all", help="engine to run (default: all)"
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: auto)")
    p.add_argument(
        "--vcpus", type=int, metavar="N",
        help="vCPU count (default: the trace's; needed when some vCPU never faults in a QEMU log)"
    )
    p.add_argument(
        "--migration",
        type=int,
        metavar="N",
        help="QEMU log with several migrations: replay only the N-th (1-based; default: all, one result each)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout; default: none)")
    p.add_argument(
        "--compare",
        metavar="FILE",
        help="a query-migrate JSON from the same migration: show how each engine compares to it (default: none)",
    )
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, summary.txt, PNG plots and a Perfetto trace.json into DIR (default: none)")
    p.set_defaults(func=run)


def _fmt_value(value: object) -> str:
    if isinstance(value, list):
        shown = ", ".join(f"{x:,}" if isinstance(x, int) else str(x) for x in value[:_MAX_LIST])
        more = f", ... ({len(value)} values)" if len(value) > _MAX_LIST else ""
        return f"[{shown}{more}]"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _fmt_dist(dist: list[int]) -> str:
    """Only the non-empty buckets, as ``2^N us: count``."""
    parts = [f"2^{i}us:{c}" for i, c in enumerate(dist) if c]
    return " ".join(parts) if parts else "(empty)"


def render_table(results: dict[str, dict], title: str) -> Table:
    """The engines side by side, one row per query-migrate field."""
    table = Table(title=title, show_lines=False)
    table.add_column("field", no_wrap=True)
    table.add_column("unit", style="dim", no_wrap=True)
    for name in results:
        table.add_column(name, overflow="fold")
    for field, unit in _ROWS:
        if not any(field in r for r in results.values()):
            continue
        cells = []
        for r in results.values():
            v = r.get(field)
            cells.append(
                _fmt_dist(v) if field == "postcopy-latency-dist" and v is not None else _fmt_value(v)
            )
        table.add_row(field, unit, *cells)
    return table


def _compare(results: dict[str, dict], path: str) -> dict[str, dict]:
    from postcopy_core.blocktime.textfile import read_json_file

    qm = read_json_file(path, "a query-migrate JSON file", _MAX_COMPARE)  # bounded: the answer is a few KB
    if not isinstance(qm, dict) or "postcopy-blocktime" not in qm:
        raise BlocktimeError(f"{path}: no 'postcopy-blocktime' in this query-migrate JSON")
    out = {}
    theirs = qm.get("postcopy-vcpu-blocktime", [])
    for name, r in results.items():
        mine = r["postcopy-vcpu-blocktime"]
        out[name] = {
            "postcopy-blocktime": r["postcopy-blocktime"] - qm["postcopy-blocktime"],
            "postcopy-vcpu-blocktime": [a - b for a, b in zip(mine, theirs, strict=False)],
        }
    return {"query-migrate": qm, "difference": out}


def run(args: argparse.Namespace) -> int:
    """Replay ``args.file``; exit 0, or 2 with one line on stderr for bad input."""
    from harness.report import output_console, provenance

    console = output_console()
    started = provenance(argv=getattr(args, "argv", None))
    engines = ALL_ENGINE_NAMES if args.engine == "all" else (args.engine,)
    from harness.report_dir import report_dir_problem

    problem = report_dir_problem(getattr(args, "report", None))
    if problem:
        print(f"postcopy-harness replay: --report {args.report}: {problem}", file=sys.stderr)
        return 2
    problem = output_problem(args.json) if args.json not in (None, "-") else None
    if problem:
        print(f"postcopy-harness replay: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    try:
        fmt, runs = _load(args)
        reports = []
        for meta, cols in runs:
            reports.append((_replay_report(args, started, fmt, meta, cols, engines), meta, cols))
    except BlocktimeError as exc:
        print(f"postcopy-harness replay: {exc}", file=sys.stderr)  # one line, never wrapped
        return 2
    # One migration: the report itself; several: one report each under "migrations".
    out = reports[0][0] if len(reports) == 1 else {**started, "file": args.file,
                                                     "migrations": [r for r, _, _ in reports]}
    if args.json:
        code = _write_json(args, out)
        if code is not None:
            return code
    to_stdout = args.json != "-"
    for i, (report, meta, cols) in enumerate(reports, 1):
        extra = meta.extra
        which = ""
        if extra.get("qemu", {}).get("migrations", 1) > 1:
            q = extra["qemu"]
            which = f" migration {q['migration']} of {q['migrations']} (from line {q['first_line']})"
        title = (f"{args.file}{which}: {report['events']:,} events, {report['vcpus']} vCPUs "
                 f"({report['recorded-by']})")
        notes = _notes(extra, report.get("compare")) + _bounds_notes(report.get("bounds"))
        if to_stdout:
            console.print(render_table(report["engines"], title))
            for line in notes:
                print(line)
        if getattr(args, "report", None):
            # several migrations: one folder each inside DIR
            folder = args.report if len(reports) == 1 else os.path.join(args.report, f"migration-{i}")
            if not _write_folder(folder, report, meta, cols, title, notes, to_stdout):
                return 1
    return 0


def _replay_report(args: argparse.Namespace, started: dict, fmt: str, meta, cols, engines) -> dict:
    """One migration replayed: its report (engines, bounds for a QEMU log, --compare)."""
    from harness.report import kebab

    if args.engine == TRUTH and cols.stalls is None:
        raise BlocktimeError(f"{args.file}: no stall intervals in this trace (truth needs a run's --trace)")
    results = replay_columns(meta, cols, engines)
    comparison = _compare(results, args.compare) if args.compare else None
    report = {
        **started,
        "file": args.file,
        "format": fmt,
        "recorded-by": meta.source,
        "events": len(cols),
        "stall-intervals": None if cols.stalls is None else len(cols.stalls),
        "vcpus": meta.vcpus,
        "page-size": meta.page_size,
        "meta": kebab(meta.extra),
        "engines": results,
    }
    if meta.source == "qemu-log":
        report["bounds"] = blocktime_bounds(meta, cols)
    if comparison is not None:
        report["compare"] = comparison
    return report


def _write_json(args: argparse.Namespace, out: dict) -> int | None:
    """--json FILE or - (stdout); the exit code when replay ends here, None when it goes on."""
    text = json.dumps(out, indent=2, sort_keys=False) + "\n"
    if args.json == "-":  # stdout is the JSON: no table; a --report is still written
        sys.stdout.write(text)
        return None if getattr(args, "report", None) else 0
    try:
        with open_output(args.json) as fh:
            fh.write(text)
    except OSError as exc:
        print(f"postcopy-harness replay: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
        return 2
    return None


def _write_folder(folder: str, report: dict, meta, cols, title: str, notes: list[str], to_stdout: bool) -> bool:
    """One migration's --report folder, and the line that says so; False (said) when it cannot be written."""
    from harness.report_dir import write_report_dir, wrote_line

    def summary(c) -> None:
        c.print(render_table(report["engines"], title))
        for line in notes:
            c.print(line, markup=False, highlight=False)

    try:
        paths = write_report_dir(folder, report, summary, (meta, cols), title=f"replay: {title}")
    except OSError as exc:
        print(f"postcopy-harness replay: cannot write --report {folder}: {exc.strerror or exc}", file=sys.stderr)
        return False
    print(wrote_line(folder, paths), file=sys.stdout if to_stdout else sys.stderr)
    return True


def _load(args: argparse.Namespace) -> tuple[str, list[tuple]]:
    """The format read, and (meta, columns) per migration to replay: every migration of a QEMU log,
    or the one asked for."""
    fmt = detect_format(args.file) if args.format == "auto" else args.format
    if fmt != "qemu-log":
        if args.migration not in (None, 1):
            raise BlocktimeError(f"--migration {args.migration}: a native trace holds one run")
        return fmt, [read_trace_columns(args.file, fmt, args.vcpus)]
    if args.vcpus is not None and args.vcpus < 1:
        raise BlocktimeError(f"--vcpus must be at least 1, got {args.vcpus}")
    found = import_qemu_migrations(args.file, args.vcpus)
    if args.migration is not None:
        if not 1 <= args.migration <= len(found):
            raise BlocktimeError(f"--migration {args.migration}: the log holds {len(found)} migration(s)")
        found = [found[args.migration - 1]]
    return fmt, [(meta, EventColumns.from_events(events)) for meta, events in found]


def _bounds_notes(bounds: dict | None) -> list[str]:
    if not bounds:
        return []
    lo, hi = bounds["lower"], bounds["upper"]
    return [
        "bounds (a QEMU log has no measured truth; the real blocked time lies between):",
        f"  lower (each vCPU's latest pending fault only): blocktime {lo['postcopy-blocktime']} ms, "
        f"per vCPU {_fmt_value(lo['postcopy-vcpu-blocktime'])} ms",
        f"  upper (exact: every fault until its placement): blocktime {hi['postcopy-blocktime']} ms, "
        f"per vCPU {_fmt_value(hi['postcopy-vcpu-blocktime'])} ms",
    ]


def _notes(extra: dict, comparison: dict | None) -> list[str]:
    notes = []
    q = extra.get("qemu")
    if q and q.get("version") == "10.1+":
        notes.append(
            f"QEMU 10.1+ log: {q['begin_lines']} begin / {q['end_lines']} end lines; the modern engine "
            f"reproduces {q['verified_ends']} of {q['end_lines']} end lines (affected vCPUs and non-vCPU "
            "faults, left faults, exist flags)."
        )
        if q["mismatched_ends"]:
            notes.append(f"warning: {q['mismatched_ends']} end lines disagree with the replay "
                         f"(first: {q['first_mismatch_lines']})")
        if q.get("backwards_times"):
            notes.append(f"warning: {q['backwards_times']} lines whose time: goes backwards (a 10.1 log is "
                         f"written in time: order: this one is damaged; first: {q['first_backwards_lines']})")
    elif q:
        notes.append(
            f"QEMU log: {q['begin_lines']} begin / {q['end_lines']} end lines; the seed engine reproduces "
            f"{q['verified_ends']} of {q['end_lines']} end lines (running total and affected vCPUs); "
            f"the log's own final total: {q['logged_total_ms']} ms."
        )
        if q["mismatched_ends"]:
            notes.append(f"warning: {q['mismatched_ends']} end lines the seed engine cannot explain "
                         f"(first: {q['first_mismatch_lines']})")
        if q["vcpus_inferred"]:
            notes.append(
                "  vCPU count inferred from the highest vCPU that faulted; pass --vcpus N if one never did."
            )
    if q and q.get("ends_without_begin"):
        notes.append(f"warning: {q['ends_without_begin']} end lines affected vCPUs on an address no begin line "
                     f"named (impossible in a whole log: lines lost?; first: {q['first_ends_without_begin']})")
    if extra.get("complete") is False:
        notes.append("warning: the trace has no end marker (the recording run did not finish cleanly).")
    if comparison:
        for name, d in comparison["difference"].items():
            notes.append(
                f"{name} - query-migrate: blocktime {d['postcopy-blocktime']:+d} ms, "
                f"per vCPU {d['postcopy-vcpu-blocktime']} ms"
            )
    return notes
