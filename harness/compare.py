"""``postcopy-harness compare``: the same workload under each source strategy, side by side.

Each strategy's run goes through the ordinary run path (:func:`harness.runner.run_config`), so a
row is exactly what ``run --strategy NAME`` with the same flags reports.  With ``--repeat N`` the
runs alternate (A, B, C, A, B, C, ...), so that load from others on the machine spreads over every
strategy, and the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

from rich.table import Table

EXIT_BAD_INPUT = 2
NOT_HERE = ("trace", "report")  # per-run outputs: `run` writes them


def add_parser(sub) -> None:
    from harness.cli import add_run_flags

    p = sub.add_parser("compare", help="run the same workload under several source strategies; one table",
                       description="Run the workload once per strategy (every other flag as for run) and print "
                                   "fault p50/p99, blocktime from every engine, pages requested / streamed / "
                                   "prepaged and the migration time of each.",
                       epilog="exit status: 0 every run completed; 1 a run failed; 2 bad input; 130 Ctrl-C")
    add_run_flags(p, many_strategies=True)
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="runs per strategy, alternating between strategies; the table shows medians "
                        "(default %(default)s)")
    from harness.restore import add_handler_flags

    add_handler_flags(p, events=False)  # compare --handler CMD: it and the built-in one (harness/handler_sweep.py)
    for action in p._actions:  # this command's --json is the comparison's document
        if action.dest == "json":
            action.help = 'write {"strategies": [one run report per strategy]} here (default: none)'
    p.set_defaults(func=run)


def configs(args: argparse.Namespace) -> list:
    """One validated RunConfig per strategy named in ``args.strategy`` (ConfigError on bad input)."""
    from harness.config import ConfigError, RunConfig, image_bytes

    names = [n.strip() for n in args.strategy.split(",")]
    if not all(names):
        raise ConfigError(f"--strategy {args.strategy!r}: an empty name in the list")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategy {args.strategy!r}: a strategy named twice")
    if not args.background and names != ["demand"]:
        raise ConfigError("--no-background is --strategy demand; compare takes --strategy demand instead")
    for flag in NOT_HERE:
        if getattr(args, flag):
            raise ConfigError(f"--{flag} is for run (one run); compare writes --json only")
    if args.live:
        raise ConfigError("--live is for run; compare shows a table at the end")
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: must be at least 1")
    out = []
    for name in names:
        fields = {k: getattr(args, k) for k in RunConfig().as_dict() if hasattr(args, k)}
        fields.update(strategy=name, json=None, background=True)
        if name != "prefetch":
            fields["working_set"] = None  # only prefetch reads it
        if fields["ram"] is None:
            fields["ram"] = image_bytes(args.image) if args.image else RunConfig().ram
        out.append(RunConfig(**fields).validate())
    return out


def _metrics(rep: dict) -> dict:
    """The numbers of one row (None where the run failed)."""
    if "latency-us" not in rep:
        return {}
    p = rep["pages"]
    m = {"p50": rep["latency-us"]["p50"], "p99": rep["latency-us"]["p99"], "faults": rep["faults"]["total"],
         "requested": p["requested"], "streamed": p["background"] - p.get("prepaged", 0),
         "prepaged": p.get("prepaged", 0), "migration-s": rep["duration-s"]["postcopy"],
         "workload-s": rep["duration-s"]["workload"]}
    for name, eng in rep.get("engines", {}).items():
        m[f"blocktime-{name}"] = eng.get("postcopy-blocktime")
    return m


def median_metrics(reports: list[dict]) -> dict:
    """Per column, the median over the completed runs of one strategy."""
    rows = [_metrics(r) for r in reports if r["status"] == "completed"]
    keys = rows[0].keys() if rows else ()
    return {k: statistics.median(r[k] for r in rows if r.get(k) is not None) for k in keys}


def table(names: list[str], runs: dict[str, list[dict]]) -> Table:
    """The comparison table: one row per strategy (medians when repeated)."""
    engines = []
    for reps in runs.values():
        for r in reps:
            engines += [e for e in r.get("engines", {}) if e not in engines]
    t = Table(show_header=True, header_style="bold")
    cols = [("strategy", "left"), ("status", "left"), ("faults", "right"), ("p50 µs", "right"),
            ("p99 µs", "right"), *[(f"blocktime {e} ms", "right") for e in engines],
            ("requested / streamed / prepaged", "right"), ("migration s", "right")]
    for title, justify in cols:
        t.add_column(title, justify=justify)
    for name in names:
        reps = runs[name]
        ok = sum(r["status"] == "completed" for r in reps)
        status = "completed" if ok == len(reps) else f"{len(reps) - ok} of {len(reps)} failed"
        m = median_metrics(reps)
        if not m:
            t.add_row(name, f"[red]{status}[/]", *["-"] * (len(cols) - 2))
            continue

        def n(key: str, fmt: str = "{:,.0f}", m: dict = m) -> str:
            return "-" if m.get(key) is None else fmt.format(m[key])

        t.add_row(name, status if ok == len(reps) else f"[yellow]{status}[/]", n("faults"), n("p50", "{:,.1f}"),
                  n("p99", "{:,.1f}"), *[n(f"blocktime-{e}") for e in engines],
                  f"{n('requested')} / {n('streamed')} / {n('prepaged')}", n("migration-s", "{:.3f}"))
    return t


def _median_report(reports: list[dict]) -> dict:
    """The run whose fault p50 is the median one (the first report when none completed)."""
    done = sorted((r for r in reports if r["status"] == "completed"), key=lambda r: r["latency-us"]["p50"])
    return done[(len(done) - 1) // 2] if done else reports[0]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "handler", None) is not None:
        return handler_compare(args)
    from harness.cli import err, unwritable
    from harness.config import ConfigError
    from harness.report import output_console, provenance
    from harness.run import check_memory
    from harness.runner import run_config
    from harness.supervise import RunFailed

    try:
        cfgs = configs(args)
    except ConfigError as e:
        err.print(f"postcopy-harness compare: {e}")
        return EXIT_BAD_INPUT
    problem = unwritable(args.json)
    if problem:
        err.print(f"postcopy-harness compare: --json {args.json}: {problem}")
        return EXIT_BAD_INPUT
    try:
        check_memory(cfgs[0])
    except RunFailed as e:
        err.print(f"postcopy-harness compare: {e}")
        return EXIT_BAD_INPUT
    console = output_console()
    names = [c.strategy for c in cfgs]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    argv = getattr(args, "argv", None)
    for i in range(args.repeat):
        for cfg in cfgs:
            rep = run_config(cfg, argv=argv, write=False)
            runs[cfg.strategy].append(rep)
            if not args.quiet:
                lat = rep.get("latency-us", {})
                console.print(f"{cfg.strategy} ({i + 1}/{args.repeat}): {rep['status']}"
                              + (f", fault p50 {lat['p50']:,.1f} µs" if lat else f": {rep['error']}"),
                              markup=False, highlight=False)
    first = cfgs[0]
    if not args.quiet:
        console.print(f"compare: {first.vcpus} vCPUs, {first.ram / 2**20:,.0f} MiB {first.backing}, workload "
                      f"{first.workload}, link {first.link_model.describe()}"
                      + (f", medians of {args.repeat} runs" if args.repeat > 1 else ""),
                      style="italic", markup=False, highlight=False, soft_wrap=True)
        console.print(table(names, runs))
    if args.json:
        doc = {**provenance(argv=argv), "repeat": args.repeat,
               "strategies": [_median_report(runs[n]) for n in names],
               "medians": {n: median_metrics(runs[n]) for n in names}}
        if args.repeat > 1:
            doc["runs"] = {n: runs[n] for n in names}
        try:
            from postcopy_core.outfile import open_output

            with open_output(args.json) as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
        except OSError as e:
            err.print(f"postcopy-harness compare: cannot write --json {args.json}: {e.strerror}")
            return 1
    failed = [r for reps in runs.values() for r in reps if r["status"] != "completed"]
    for r in failed[:1]:
        err.print(f"postcopy-harness compare: {r.get('strategy')}: failed: {r['error']}")
    return 1 if failed else 0


def handler_compare(args: argparse.Namespace) -> int:
    """compare --handler CMD: the built-in handler and CMD on the same memory file, one row each."""
    from harness.config import RunConfig
    from harness.handler_sweep import main as sweep

    ns = argparse.Namespace(**vars(args))  # every flag goes along: one that --handler does not use is refused
    ns.vcpus, ns.csv, ns.prog = str(args.vcpus), None, "postcopy-harness compare"
    ns.ram = args.ram if args.ram is not None else RunConfig().ram
    return sweep(ns)
