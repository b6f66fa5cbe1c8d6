"""``postcopy-harness qemu``: your QEMU under test, a real VM migrated in postcopy, QEMU's blocktime
held against the guest's own clock.  Runs ``harness.qemu_run`` and reports ``harness.qemu_compare``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from harness.qemu_run import ACCELS, BACKINGS, QemuRunConfig, QemuRunError
from postcopy_core.guest import WORKLOADS

PROG = "postcopy-harness qemu"


def add_parser(sub) -> None:
    from postcopy_core.link import RATE_UNITS

    p = sub.add_parser("qemu", help="migrate a real VM between two local QEMUs in postcopy; compare QEMU's "
                                    "blocktime, the engines' and the guest's own stalls")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY",
                   help="the QEMU under test, source and destination both (default: %(default)s on PATH)")
    p.add_argument("--smp", type=int, default=2, metavar="N", help="vCPUs, 1..8 (default %(default)s)")
    p.add_argument("--mem", default="128M", metavar="SIZE", help="guest RAM, e.g. 128M (default %(default)s)")
    p.add_argument("--accel", choices=ACCELS, default="kvm",
                   help="kvm, or tcg (emulated: the guest's TSC is QEMU's, its stalls include translation); "
                        "default %(default)s")
    p.add_argument("--backing", choices=BACKINGS, default="anon",
                   help="guest RAM: anon (QEMU's default), shmem (memfd, share=on), hugetlb (2 MiB memfd; "
                        "reserves huge pages for the run); default %(default)s")
    p.add_argument("--postcopy-bandwidth", default=None, metavar="RATE",
                   help=f"max-postcopy-bandwidth ({RATE_UNITS}); default unlimited")
    p.add_argument("--precopy", type=float, default=1.0, metavar="SECONDS",
                   help="precopy time before migrate-start-postcopy (default %(default)s)")
    p.add_argument("--workload", choices=WORKLOADS, default="sequential",
                   help="how the vCPUs walk RAM: in order, in a random full-period order, all over the same "
                        "pages, or only the BSP (the APs stay halted); default %(default)s")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="migrations to run (default %(default)s)")
    p.add_argument("--stall-threshold", type=float, default=50.0, metavar="US",
                   help="a gap between two guest accesses longer than this is a stall (default %(default)s us)")
    p.add_argument("--noise", type=float, default=2.0, metavar="SECONDS",
                   help="the guest runs alone this long before migrating: its noise floor (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' = stdout; default: none)")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, summary.txt, plots and a Perfetto trace there (default: none)")
    p.set_defaults(func=run)


def _config(args) -> QemuRunConfig:
    from harness.config import ConfigError, parse_size
    from postcopy_core.link import parse_link

    try:
        mem = parse_size(args.mem)
    except ConfigError as exc:
        raise QemuRunError(f"--mem: {exc}") from None
    bw = None
    if args.postcopy_bandwidth:
        try:
            bw = parse_link(args.postcopy_bandwidth).bytes_per_s
        except ValueError as exc:
            raise QemuRunError(str(exc).replace("--link", "--postcopy-bandwidth")) from None
    if not 1 <= args.smp <= 8:
        raise QemuRunError(f"--smp {args.smp}: must be 1..8")
    if not 1 <= args.repeat <= 100:
        raise QemuRunError(f"--repeat {args.repeat}: must be 1..100")
    cfg = QemuRunConfig(qemu=args.qemu, smp=args.smp, mem=mem, accel=args.accel, backing=args.backing,
                        postcopy_bandwidth=bw, precopy_s=args.precopy, workload=args.workload,
                        threshold_us=args.stall_threshold, noise_s=args.noise)
    cfg.check()
    return cfg


def _f(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return "[" + ", ".join(_f(v) for v in x) + "]"
    return f"{x:,.1f}" if isinstance(x, float) else str(x)


def render(rep: dict) -> Table:
    """Blocktime side by side: QEMU, each engine, the guest; and each one's error against the guest."""
    c = rep["config"]
    t = Table(title=f"{rep['qemu-version']}: smp {c['smp']}, {c['mem'] >> 20} MiB {c['backing']}, {c['accel']}, "
                    f"workload {c['workload']}")
    for col in ("source", "per-vCPU blocktime ms", "all-vCPUs ms", "error per vCPU ms", "error all ms (%)"):
        t.add_column(col)
    g = rep["guest"]
    t.add_row("guest (its own TSC)", _f(g["vcpu-stall-ms"]), _f(g["all-stalled-ms"]), "", "")
    rows = [("qemu (query-migrate)", rep["qemu"].get("postcopy-vcpu-blocktime"), rep["qemu"].get("postcopy-blocktime"),
             "qemu")]
    for name, r in rep["engines"].items():
        if name == "bounds":
            for side in ("lower", "upper"):
                rows.append((f"bounds {side}", r[side]["postcopy-vcpu-blocktime"], r[side]["postcopy-blocktime"],
                             f"bounds-{side}"))
        else:
            rows.append((name, r["postcopy-vcpu-blocktime"], r["postcopy-blocktime"], name))
    for label, per, total, key in rows:
        e = rep["error"].get(key, {})
        t.add_row(label, _f(per), _f(total), _f(e.get("vcpu-ms")),
                  f"{_f(e.get('total-ms'))} ({_f(e.get('total-pct'))}%)" if e else "")
    return t


def _memory(m: dict) -> str:
    if m["passed"]:
        return ("passed (every page's counter equals its pass count; passes on the destination "
                f"{m['passes-on-destination']})")
    if not m["ran-on-destination"]:
        return "FAILED: the guest did not run on the destination"
    return f"FAILED: {m['mismatching-pages']} page counters disagree with their pass count (a write was lost)"


def notes(rep: dict) -> list[str]:
    g, f = rep["guest"], rep["faults"]
    nf = g["noise-floor"]
    out = [f"guest: {g['stalls']} stalls over {g['threshold-us']:g} us, TSC {g['tsc-hz'] / 1e9:.3f} GHz, "
           f"postcopy window {_f(g['window-s'])} s; noise floor in that window {_f(nf['vcpu-ms-in-window'])} ms "
           f"(the same guest, no migration, {nf['measured-s']:g} s): postcopy's share of the stall per vCPU "
           f"{_f(nf['vcpu-stall-ms-less-noise'])}..{_f(g['vcpu-stall-ms'])} ms",
           "memory check: " + _memory(g["memory-check"])]
    if g["switchover-gap-ms"]:
        out.append(f"switchover gap (not counted): {_f(g['switchover-gap-ms'])} ms")
    if f:
        share = f["share-of-guest-stall-traced"]
        out.append(f"per fault: {f['traced-faults']} traced vCPU faults, {f['matched']} matched to a guest stall on "
                   f"the same page; QEMU's trace saw {'-' if share is None else f'{100 * share:.1f}%'} of the "
                   f"guest's stall; {f['untraced-stall-count']} stalls ({f['untraced-stall-ms']:.1f} ms) on pages "
                   f"it never traced (noise included), {f['unfelt-fault-count']} traced faults the guest never felt")
        h = f["ratio-histogram"]
        out.append("traced/guest ratio per fault: " + ", ".join(
            f"[{a},{b}): {n}" for a, b, n in zip(h["edges"][:-1], h["edges"][1:], h["counts"], strict=True)))
    tr = rep["trace"]
    if tr["problem"]:
        out.append(f"trace: {tr['problem']}")
    m = tr.get("meta") or {}
    if m:
        which = "modern" if m.get("version") == "10.1+" else "seed"
        line = (f"trace: {m.get('begin_lines')} begin / {m.get('end_lines')} end lines; the {which} engine "
                f"reproduces {m.get('verified_ends')} of the end lines")
        if m.get("logged_total_ms") is not None:
            line += f"; the log's own final total {m['logged_total_ms']} ms"
        out.append(line)
        if m.get("mismatched_ends"):
            out.append(f"warning: {m['mismatched_ends']} end lines the replay cannot explain "
                       f"(first: {m.get('first_mismatch_lines')})")
    if rep["config"]["accel"] == "tcg":
        out.append("TCG: the guest's TSC is QEMU's emulated one and its accesses include translation; "
                   "stalls are indicative only")
    return out


def summarize(reps: list[dict]) -> dict:
    """--repeat: per source, the median (and min..max) of the all-vCPUs total and of the per-vCPU sum."""
    import statistics

    def totals(r: dict) -> dict[str, tuple[float, float]]:
        out = {"guest": (r["guest"]["all-stalled-ms"], sum(r["guest"]["vcpu-stall-ms"]))}
        if "postcopy-blocktime" in r["qemu"]:
            out["qemu"] = (r["qemu"]["postcopy-blocktime"], sum(r["qemu"]["postcopy-vcpu-blocktime"]))
        for name in ("seed", "modern", "exact"):
            if name in r["engines"]:
                e = r["engines"][name]
                out[name] = (e["postcopy-blocktime"], sum(e["postcopy-vcpu-blocktime"]))
        return out

    per = [totals(r) for r in reps]
    out = {}
    for name in per[0]:
        vals = [p[name] for p in per if name in p]
        a, b = [v[0] for v in vals], [v[1] for v in vals]
        out[name] = {"all-ms": {"median": statistics.median(a), "min": min(a), "max": max(a)},
                     "vcpu-sum-ms": {"median": statistics.median(b), "min": min(b), "max": max(b)}}
    return {"runs": len(reps), "sources": out}


def render_summary(summary: dict) -> Table:
    t = Table(title=f"{summary['runs']} runs: median (min..max)")
    for col in ("source", "all-vCPUs ms", "sum of per-vCPU ms"):
        t.add_column(col)
    for name, v in summary["sources"].items():
        a, b = v["all-ms"], v["vcpu-sum-ms"]
        t.add_row(name, f"{a['median']:,.1f} ({a['min']:,.1f}..{a['max']:,.1f})",
                  f"{b['median']:,.1f} ({b['min']:,.1f}..{b['max']:,.1f})")
    return t


def _write_report(folder: str, rep: dict) -> None:
    from harness.report_dir import write_report_dir
    from postcopy_core.blocktime import EventColumns
    from postcopy_core.blocktime.qemu_log import import_qemu_migrations

    material = None
    found = import_qemu_migrations(rep["trace"]["file"], rep["config"]["smp"]) if rep["trace"]["migrations"] else []
    if found:
        meta, events = found[-1]
        material = (meta, EventColumns.from_events(events))

    def summary(c) -> None:
        c.print(render(rep))
        for line in notes(rep):
            c.print(line, markup=False, highlight=False)

    write_report_dir(folder, rep, summary, material, title=f"qemu: {rep['qemu-version']}",
                     argv=rep.get("argv"))
    from harness import plots

    bars = {"guest": {"sum of per-vCPU ms": sum(rep["guest"]["vcpu-stall-ms"]),
                      "all-vCPUs ms": rep["guest"]["all-stalled-ms"]}}
    if "postcopy-vcpu-blocktime" in rep["qemu"]:
        bars["qemu"] = {"sum of per-vCPU ms": sum(rep["qemu"]["postcopy-vcpu-blocktime"]),
                        "all-vCPUs ms": rep["qemu"]["postcopy-blocktime"]}
    for name in ("seed", "exact"):
        if name in rep["engines"]:
            r = rep["engines"][name]
            bars[name] = {"sum of per-vCPU ms": sum(r["postcopy-vcpu-blocktime"]),
                          "all-vCPUs ms": r["postcopy-blocktime"]}
    plots.plot_bars(bars, os.path.join(folder, "guest-vs-qemu.png"), rep.get("argv"), "blocktime: guest vs QEMU")
    from harness.qemu_plot import plot_guest_vs_trace

    plot_guest_vs_trace(rep, os.path.join(folder, "guest-vs-trace.png"), rep.get("argv"),
                        f"qemu: the guest's stalls against what QEMU's trace saw ({rep['qemu-version'].split('(')[0]})")


def run(args: argparse.Namespace) -> int:
    from harness.qemu_compare import compare
    from harness.report import output_console, provenance
    from harness.report_dir import report_dir_problem

    started = provenance(argv=getattr(args, "argv", None))
    try:
        cfg = _config(args)
        if args.report:
            problem = report_dir_problem(args.report)
            if problem:
                raise QemuRunError(f"--report {args.report}: {problem}")
    except QemuRunError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    import signal

    from harness.qemu_run import migrate
    from harness.run import raise_terminated

    old_term = signal.signal(signal.SIGTERM, raise_terminated)  # unwind: both QEMUs stopped, exit 143
    try:

        reports = []
        with tempfile.TemporaryDirectory(prefix="pch-qemu-trace-") as keep:
            for i in range(args.repeat):
                folder = None
                if args.report:
                    folder = args.report if args.repeat == 1 else os.path.join(args.report, f"run-{i + 1}")
                    os.makedirs(folder, exist_ok=True)
                trace = Path(folder or keep) / "qemu-trace.log"
                rep = {**started, **compare(migrate(cfg, trace))}
                if folder is None:
                    rep["trace"]["file"] = None  # gone with the temp dir
                reports.append((rep, folder))
                console = output_console()
                console.print(render(rep))
                for line in notes(rep):
                    print(line)
                if folder:
                    _write_report(folder, rep)
    except (QemuRunError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    doc = reports[0][0] if len(reports) == 1 else {**started, "runs": [r for r, _ in reports],
                                                   "summary": summarize([r for r, _ in reports])}
    if len(reports) > 1:
        output_console().print(render_summary(doc["summary"]))
    if args.json:
        text = json.dumps(doc, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).write_text(text)
            except OSError as exc:
                print(f"{PROG}: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
                return 2
    ok = all(r["guest"]["memory-check"]["passed"] and r["qemu"].get("status") == "completed" for r, _ in reports)
    return 0 if ok else 1
