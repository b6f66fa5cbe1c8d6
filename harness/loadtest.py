"""``postcopy-harness loadtest``: sweep vCPU counts x workloads x backing x wake policy.

Every point of the sweep is a full run (:func:`harness.run.execute`), repeated ``--repeat`` times;
its row holds the medians (the maximum for max latency).  Rows are printed as points complete,
under a progress bar, and the CSV and JSON files are rewritten after every point, so an
interrupted sweep keeps what it measured.  A point that fails (no huge pages reserved, a dead
process, wrong content) becomes a failed row with its one-line error and the sweep goes on; the
exit code is then 1.  Bad flags are refused up front with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from harness.config import ConfigError, RunConfig, parse_size
from postcopy_core.blocktime import ALL_ENGINE_NAMES as ENGINES  # one CSV column each (truth included)

PROG = "postcopy-harness loadtest"

# CSV / JSON row keys, in order.  Medians over the repeats unless the name says otherwise.
COLUMNS: tuple[str, ...] = (
    "backing", "workload", "wake-policy", "vcpus", "ram-bytes", "repeats", "status",
    "faults", "faults-per-s", "p50-us", "p99-us", "max-us",
    *(f"blocktime-{e}-ms" for e in ENGINES),
    "handler-cpu-s", "source-cpu-s", "stall-ms-mean", "workload-s", "error",
    # --reference: the C reference (uffd_ref -m mp) at the same point, medians; why not, if it could not run
    "ref-faults-per-s", "ref-p50-us", "ref-p99-us", "ref-error",
)


class SweepError(ValueError):
    """A bad sweep definition; reported as one line, exit code 2."""


@dataclass(frozen=True)
class Point:
    """One point of the sweep (everything that varies between runs)."""

    backing: str
    workload: str
    wake_policy: str
    vcpus: int

    def label(self) -> str:
        return f"{self.backing} {self.workload} wake={self.wake_policy} {self.vcpus} vCPUs"


# ------------------------------------------------------------------ sweep definition


def parse_list(text: str, flag: str, convert: Callable[[str], Any] = str) -> list:
    """``"1,8,64"`` -> ``[1, 8, 64]``: comma list, order kept, duplicates dropped, one-line errors."""
    out: list = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise SweepError(f"{flag} {text!r}: empty item in the comma list")
        try:
            value = convert(item)
        except ValueError:
            raise SweepError(f"{flag} {text!r}: {item!r} is not valid here") from None
        if value not in out:
            out.append(value)
    return out


def plan(args: argparse.Namespace) -> tuple[list[Point], dict, dict]:
    """The points of the sweep, the settings they share and the parsed lists; all validated up front."""
    try:
        ram = parse_size(args.ram)
    except ConfigError as e:
        raise SweepError(f"--ram: {e}") from None
    vcpus = parse_list(args.vcpus, "--vcpus", int)
    workloads = parse_list(args.workload, "--workload")
    backings = parse_list(args.backing, "--backing")
    policies = parse_list(args.wake_policy, "--wake-policy")
    if args.repeat < 1:
        raise SweepError(f"--repeat {args.repeat}: must be at least 1")
    common = dict(ram=ram, link=args.link, seed=args.seed, background=args.background, timeout=args.timeout,
                  pin=args.pin)
    points = [Point(b, w, p, n) for b, w, p, n in product(backings, workloads, policies, vcpus)]
    for pt in points:
        try:
            config_for(pt, common).validate()
        except ConfigError as e:
            raise SweepError(f"{pt.label()}: {e}") from None
    lists = dict(vcpus=vcpus, workloads=workloads, backings=backings, wake_policies=policies)
    return points, common, lists


def config_for(point: Point, common: dict) -> RunConfig:
    """The run configuration of one point."""
    return RunConfig(vcpus=point.vcpus, workload=point.workload, backing=point.backing,
                     wake_policy=point.wake_policy, **common)


# ------------------------------------------------------------------ running a point


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def _child_stderr() -> Iterator[list[str]]:
    """Collect what the run's processes write to fd 2 (children inherit it); yields the lines at exit.

    A failing child says why on stderr (``vcpu 0: KernelError: mmap failed: ENOMEM``) while the
    orchestrator only sees its exit status; the row's error gets both, and the lines do not tear
    through the table and progress bar.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += [ln for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip()]


def run_once(cfg: RunConfig) -> tuple[dict, list[str]]:
    """One run of the harness -> (report, lines its processes wrote to stderr).

    Failures become a failed report, never an exception; KeyboardInterrupt passes through (the run
    has torn itself down by then).
    """
    from harness.report import build_report
    from harness.run import execute
    from harness.supervise import RunFailed
    from postcopy_core.kernel import KernelError

    error: str | None = None
    raw = None
    with _child_stderr() as said:
        try:
            raw = execute(cfg)
        except (RunFailed, KernelError, OSError, ValueError) as e:
            error = _one_line(e)
        except Exception as e:  # a bug in one point must not end a long sweep; say what it was
            error = _one_line(f"{type(e).__name__}: {e}")
    if error and said:
        error = f"{error} ({_one_line(said[0])})"  # the first complaint is the cause, later ones fallout
    return build_report(cfg, raw, error), said


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(point: Point, cfg: RunConfig, reports: list[dict]) -> dict:
    """The row of a point: medians over its runs; failed if any run failed."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({"backing": point.backing, "workload": point.workload, "wake-policy": point.wake_policy,
                "vcpus": point.vcpus, "ram-bytes": cfg.ram, "repeats": len(reports), "error": ""})
    failed = [r for r in reports if r.get("status") != "completed"]
    row["status"] = "failed" if failed else "completed"
    if failed:
        row["error"] = _one_line(failed[0].get("error") or "failed")
    done = [r for r in reports if "faults" in r]
    if not done:
        return row

    def med(get: Callable[[dict], float | None]) -> float | None:
        return _median(get(r) for r in done)

    row["faults"] = med(lambda r: r["faults"]["total"])
    row["faults-per-s"] = med(lambda r: r["faults"]["per-second"])
    row["p50-us"] = med(lambda r: r["latency-us"]["p50"])
    row["p99-us"] = med(lambda r: r["latency-us"]["p99"])
    row["max-us"] = max(r["latency-us"]["max"] for r in done)
    for e in ENGINES:
        row[f"blocktime-{e}-ms"] = med(lambda r, e=e: r.get("engines", {}).get(e, {}).get("postcopy-blocktime"))
    row["handler-cpu-s"] = med(lambda r: r["handler"]["cpu-s"])
    row["source-cpu-s"] = med(lambda r: r["source"]["cpu-s"])
    row["stall-ms-mean"] = med(lambda r: round(statistics.fmean(r["workers"]["vcpu-stall-ms"]), 3))
    row["workload-s"] = med(lambda r: r["duration-s"]["workload"])
    return row


# ------------------------------------------------------------------ output


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


# (header, width, row -> cell); fixed widths so rows printed one at a time line up under the header
_TABLE: tuple[tuple[str, int, Callable[[dict], str]], ...] = (
    ("backing", 7, lambda r: r["backing"]),
    ("workload", 10, lambda r: r["workload"]),
    ("wake", 7, lambda r: r["wake-policy"]),
    ("vCPUs", 5, lambda r: str(r["vcpus"])),
    ("status", 6, lambda r: "ok" if r["status"] == "completed" else "FAILED"),
    ("faults/s", 9, lambda r: _fmt(r["faults-per-s"])),
    ("p50 µs", 8, lambda r: _fmt(r["p50-us"], ",.1f")),
    ("p99 µs", 8, lambda r: _fmt(r["p99-us"], ",.1f")),
    ("max µs", 8, lambda r: _fmt(r["max-us"], ",.0f")),
    *((f"bt:{e}", 9, (lambda r, e=e: _fmt(r[f"blocktime-{e}-ms"], ",.0f"))) for e in ENGINES),
    ("hdl CPU", 7, lambda r: _fmt(r["handler-cpu-s"], ",.2f")),
)
_LEFT = 3  # the first columns (the point) are text, left-aligned; the rest are numbers
TABLE_NOTE = "latency in µs; bt:ENGINE = postcopy-blocktime in ms per engine; hdl CPU = fault handler CPU s"
# with --reference: the C reference's faults/s and p50 at the same point, and the harness's ratio
_REF_TABLE = _TABLE + (
    ("ref f/s", 9, lambda r: _fmt(r["ref-faults-per-s"])),
    ("ref p50", 8, lambda r: _fmt(r["ref-p50-us"], ",.1f")),
    ("ratio", 6, lambda r: _fmt(r["faults-per-s"] / r["ref-faults-per-s"], ".2f") + "x"
     if r["faults-per-s"] and r["ref-faults-per-s"] else "-"),
)
REF_NOTE = "; ref = C reference uffd_ref -m mp at the same point, ratio = harness / ref faults/s"


def _line(cells: list[str], styles: dict[int, str] | None = None, table: tuple = _TABLE) -> str:
    """Cells padded to their column (wider values push, never cut), as rich markup."""
    out = []
    for i, ((_, width, _), cell) in enumerate(zip(table, cells, strict=True)):
        text = escape(cell.ljust(width) if i < _LEFT else cell.rjust(width))
        style = (styles or {}).get(i)
        out.append(f"[{style}]{text}[/]" if style else text)
    return " ".join(out)


def format_header(reference: bool = False) -> str:
    """The column headers, as rich markup (with the reference's columns if it ran)."""
    table = _REF_TABLE if reference else _TABLE
    return f"[bold]{_line([name for name, _, _ in table], table=table)}[/]"


def format_row(row: dict, reference: bool = False) -> str:
    """One point as a fixed-width line under :func:`format_header` (rich markup: status coloured)."""
    table = _REF_TABLE if reference else _TABLE
    status = [name for name, _, _ in table].index("status")
    colour = "green" if row["status"] == "completed" else "red"
    return _line([cell(row) for _, _, cell in table], {status: colour}, table)


def write_csv(rows: list[dict], path: str) -> None:
    """One line per point, the columns of :data:`COLUMNS` (empty cell = not measured)."""
    from postcopy_core.outfile import open_output

    with open_output(path) as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})


def write_json(doc: dict, path: str) -> None:
    from postcopy_core.outfile import open_output

    with open_output(path) as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------ the command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``loadtest`` subcommand (sets ``func=run``)."""
    from postcopy_core.handler import WAKE_POLICIES
    from postcopy_core.link import LINK_UNITS
    from vcpu_workers.workloads import WORKLOADS

    d = RunConfig()
    p = subparsers.add_parser(
        "loadtest", help="sweep vCPU counts x workloads x backing; table, CSV and JSON",
        description="Run the harness at every combination of the listed vCPU counts, workloads, "
                    "backings and wake policies; print one row per point (faults/s, fault latency, "
                    "blocktime per engine, handler CPU) and write CSV and JSON. Failed points are "
                    "recorded and the sweep goes on; the exit code is 1 if any point failed.")
    p.add_argument("--vcpus", default="1,8,64", metavar="LIST", help="comma list of vCPU counts (default 1,8,64)")
    p.add_argument("--workload", default="sequential,random,shared", metavar="LIST",
                   help=f"comma list from {','.join(WORKLOADS)} (default sequential,random,shared)")
    p.add_argument("--backing", default="shmem", metavar="LIST", help="comma list from shmem,hugetlb (default shmem)")
    p.add_argument("--wake-policy", default=d.wake_policy, metavar="LIST",
                   help=f"comma list from {','.join(WAKE_POLICIES)} (default {d.wake_policy})")
    p.add_argument("--ram", default="256M",
                   help="guest RAM size of every point in bytes, K/M/G/T suffixes = KiB/MiB/GiB/TiB (default 256M)")
    p.add_argument("--link", default=d.link, metavar="BANDWIDTH[,LATENCY]",
                   help=f"the migration link, e.g. 1gbit,2ms; {LINK_UNITS} (default %(default)s)")
    p.add_argument("--pin", action="store_true",
                   help="handler and source on CPU 0, vCPU workers on CPU 1 (as the C reference's -A; "
                        "default: not pinned)")
    p.add_argument("--no-background", dest="background", action="store_false",
                   help="pure demand paging: only requested pages move until the workload ends "
                        "(default: a background stream too)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per point; rows show medians (default 1)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the RAM content and the access orders (default %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="fail a run after this many seconds (default %(default)g)")
    p.add_argument("--csv", metavar="FILE", help="write one line per point here (default: none)")
    p.add_argument("--json", metavar="FILE",
                   help="write the points, each with its full run reports, here (default: none)")
    p.add_argument("--reference", action="store_true",
                   help="also run the project's C reference (uffd_ref -m mp, built with the system compiler) at "
                        "every point it supports (sequential/shared, up to its worker limit), alternating with "
                        "the harness; adds its faults/s and p50 to the table, CSV and plot, with the published "
                        "one-shared-uffd figures (default: off)")
    p.add_argument("--reference-source", metavar="FILE",
                   help="another C file with the reference's command line and output to build instead "
                        "(default: the one shipped with the package)")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json (the --json document), summary.txt and loadtest.png (faults/s, "
                        "p50/p99 and blocktime against the vCPU count) into DIR (default: none)")
    from harness.restore import add_handler_flags

    add_handler_flags(p, events=False)  # loadtest --handler CMD: it and the built-in one (harness/handler_sweep.py)
    p.set_defaults(func=run)


def _check_writable(path: str | None, flag: str) -> None:
    from postcopy_core.outfile import output_problem

    problem = output_problem(path)
    if problem:
        raise SweepError(f"{flag} {path}: {problem}")


def run(args: argparse.Namespace) -> int:
    """Run the sweep: 0 if every point completed, 1 if any failed, 2 for bad flags, 130 on Ctrl-C."""
    if getattr(args, "handler", None) is not None:
        from harness.handler_sweep import main

        return main(args)
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # one-line messages stay one line
    try:
        points, common, lists = plan(args)
        _check_writable(args.csv, "--csv")
        _check_writable(args.json, "--json")
        from harness.report_dir import report_dir_problem

        problem = report_dir_problem(getattr(args, "report", None))
        if problem:
            raise SweepError(f"--report {args.report}: {problem}")
    except SweepError as e:
        err.print(f"{PROG}: {e}")
        return 2
    reference = None
    if getattr(args, "reference", False):
        from harness.reference import Reference, ReferenceError

        try:
            reference = Reference(args.reference_source)
        except ReferenceError as e:
            err.print(f"{PROG}: --reference: {e}")
            return 2
    try:
        return _sweep(args, points, common, lists, reference, console, err)
    finally:
        if reference is not None:
            reference.close()


def reference_runs(reference, pt: Point, cfg: RunConfig, repeat: int, harness_run: Callable[[], None]) -> list:
    """``repeat`` reference runs at this point, alternated with the harness's (``harness_run``, called
    once per repeat): even repeats run the harness first, odd ones the reference, so both sides see the
    same machine.  Each entry: the reference's result, or ``{"error": why}``."""
    from harness.reference import ReferenceError

    why = reference.supports(pt.workload, pt.vcpus, cfg.npages) if reference is not None else "not asked"
    out = []
    for i in range(repeat):
        if i % 2 == 0:
            harness_run()
        if why is None:
            try:
                out.append(reference.run(pt.vcpus, cfg.ram, pt.workload, pt.backing == "hugetlb", cfg.pin,
                                         cfg.timeout))
            except ReferenceError as e:
                out.append({"error": _one_line(e)})
        if i % 2 == 1:
            harness_run()
    return out if why is None else [{"error": why}]


def summarise_reference(row: dict, runs: list[dict]) -> None:
    """The reference's medians into ``row`` (or why it has none)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        row["ref-error"] = runs[0]["error"] if runs else ""
        return
    for k in ("faults-per-s", "p50-us", "p99-us"):
        row[f"ref-{k}"] = _median(r[k] for r in good)
    row["ref-error"] = ""


def _sweep_point(pt: Point, cfg, repeat: int, reference, progress: Progress, task, err: Console) -> tuple[dict, dict]:
    """One point of the sweep: its runs (alternated with the reference's), its row and its JSON."""
    reports: list[dict] = []

    def harness_run() -> None:
        progress.update(task, description=f"{pt.label()} (run {len(reports) + 1}/{repeat})")
        rep, said = run_once(cfg)
        reports.append(rep)
        if said and rep["status"] == "completed":  # warnings of a good run: pass them on
            err.print("\n".join(said), markup=False)
        progress.advance(task)

    withref = reference is not None
    ref_runs = reference_runs(reference, pt, cfg, repeat, harness_run)
    row = summarise(pt, cfg, reports)
    if withref:
        summarise_reference(row, ref_runs)
    return row, {**row, "runs": reports, **({"reference-runs": ref_runs} if withref else {})}


def _sweep(args: argparse.Namespace, points: list[Point], common: dict, lists: dict, reference,
           console: Console, err: Console) -> int:
    """The sweep itself (flags checked, the reference built if asked)."""
    from harness.report import kebab, provenance

    # tool-version, started-at, host, argv, units: once, for the whole sweep
    started = provenance(argv=getattr(args, "argv", None))
    sweep = kebab(dict(**lists, ram=common["ram"], link=args.link, background=args.background, pin=args.pin,
                       reference=reference is not None, repeat=args.repeat, seed=args.seed))
    rows: list[dict] = []
    points_json: list[dict] = []
    status = "completed"

    def document() -> dict:
        return dict(started, command="loadtest", status=status, sweep=sweep, columns=list(COLUMNS),
                    points=points_json)

    def save() -> None:
        if args.csv:
            write_csv(rows, args.csv)
        if args.json:
            write_json(document(), args.json)

    from harness.config import typed

    ram = typed(common["ram"], f"{common['ram'] / 2**20:g} MiB")  # as typed: --ram 1T says 1T
    console.print(f"[bold]loadtest[/]: {len(points)} point(s) x {args.repeat} run(s), --ram {ram}, "
                  f"link {args.link}, {'background + demand' if args.background else 'demand paging only'}",
                  soft_wrap=True)
    withref = reference is not None
    console.print(TABLE_NOTE + (REF_NOTE if withref else ""), style="dim", soft_wrap=True)
    console.print(format_header(withref), soft_wrap=True)  # soft wrap: a narrow terminal wraps, nothing is cut
    t0 = time.monotonic()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True, refresh_per_second=4)
    from harness.run import Terminated, raise_terminated

    old_term = signal.signal(signal.SIGTERM, raise_terminated)  # between runs too: save, then exit 143
    try:
        with progress:
            task = progress.add_task("", total=len(points) * args.repeat)
            for pt in points:
                row, point_json = _sweep_point(pt, config_for(pt, common), args.repeat, reference, progress, task,
                                               err)
                rows.append(row)
                points_json.append(point_json)
                progress.console.print(format_row(row, withref), soft_wrap=True)
                if row["error"]:
                    progress.console.print(f"  [red]{row['error']}[/]", soft_wrap=True)
                save()
    except KeyboardInterrupt as e:
        status = "terminated" if isinstance(e, Terminated) else "interrupted"
        save()
        err.print(f"{PROG}: {status} after {len(rows)} of {len(points)} points")
        return 143 if status == "terminated" else 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    failed = [r for r in rows if r["status"] != "completed"]
    status = "failed" if failed else "completed"
    save()
    if getattr(args, "report", None):
        from harness.report_dir import write_loadtest_dir

        def summary(c: Console) -> None:
            c.print(TABLE_NOTE + (REF_NOTE if withref else ""), markup=False)
            c.print(format_header(withref))
            for r in rows:
                c.print(format_row(r, withref))

        try:
            paths = write_loadtest_dir(args.report, document(), rows, summary, reference=withref)
        except OSError as e:
            err.print(f"{PROG}: cannot write --report {args.report}: {e.strerror or e}")
            return 1
        from harness.report_dir import wrote_line

        console.print(wrote_line(args.report, paths), markup=False, highlight=False, soft_wrap=True)
    written = " ".join(f"{k} {v}" for k, v in (("CSV", args.csv), ("JSON", args.json)) if v)
    console.print(f"{len(rows)} point(s) in {time.monotonic() - t0:.1f} s"
                  + (f"; wrote {written}" if written else ""))
    if failed:
        err.print(f"{PROG}: {len(failed)} of {len(rows)} points failed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m harness.loadtest``), the same as the subcommand."""
    from harness.cliparser import OneLineParser

    parser = OneLineParser(prog="postcopy-harness")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *(sys.argv[1:] if argv is None else argv)])
    args.argv = ["postcopy-harness", "loadtest", *(sys.argv[1:] if argv is None else argv)]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
