"""How much of the vCPUs' real stall each blocktime engine sees: seed, modern and exact against
``truth`` (the vCPUs' own clocks), demand-only and with the background stream, on an unlimited
and on a modelled link, one run per cell (medians of ``--repeat``).

Per engine two shares: ``vCPU`` = sum of its per-vCPU blocktime / sum of truth's per-vCPU
blocktime; ``all`` = its ``postcopy-blocktime`` (all vCPUs blocked at once) / truth's.

Reproduce:  python bench/accuracy.py --vcpus 4 --ram 64M --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from typing import Any

try:  # the installed package (plain or editable), not this checkout's files by path
    from rich.table import Table

    from harness.config import ConfigError, RunConfig, parse_size
    from harness.report import output_console
except ImportError as e:
    sys.exit(f"bench/accuracy.py needs postcopy-harness installed (pip install . or pip install -e .): {e}")

PROG = "accuracy"
ENGINES = ("seed", "modern", "exact")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="accuracy.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vcpus", type=int, default=4, help="vCPUs (default 4)")
    ap.add_argument("--ram", default="64M", help="guest RAM (default 64M)")
    ap.add_argument("--workloads", default="sequential,shared", help="comma list (default sequential,shared)")
    ap.add_argument("--links", default="unlimited,1gbit,2ms", metavar="LIST",
                    help="'unlimited' and/or one modelled link, e.g. 1gbit,2ms (default unlimited,1gbit,2ms)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per cell; medians (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="write every cell here")
    return ap.parse_args(argv)


def links(text: str) -> list[str | None]:
    """'unlimited,1gbit,2ms' -> [None, '1gbit,2ms'] (a link spec itself holds a comma)."""
    out: list[str | None] = []
    if text.startswith("unlimited"):
        out.append(None)
        text = text[len("unlimited"):].lstrip(",")
    if text:
        out.append(text)
    return out


def shares(rep: dict) -> dict[str, dict[str, float | None]]:
    """Each engine's share of truth; None where truth saw no stall at all (the stream won every race),
    since a share of nothing means nothing."""
    t_vcpu, t_all = stall_ns(rep["engines"]["truth"])
    out = {}
    for name in ENGINES:
        e_vcpu, e_all = stall_ns(rep["engines"][name])
        out[name] = {"vcpu": e_vcpu / t_vcpu if t_vcpu else None, "all": e_all / t_all if t_all else None}
    return out


def stall_ns(engine: dict) -> tuple[int, int]:
    """(sum of per-vCPU blocktime, all-blocked blocktime) in ns: the engine's ns fields where it has
    them, since the QEMU-style ms figures round a short run's stalls to 0; seed has only ms."""
    if "vcpu-blocktime-ns" in engine:
        return sum(engine["vcpu-blocktime-ns"]), engine["blocktime-ns"]
    return sum(engine["postcopy-vcpu-blocktime"]) * 10**6, engine["postcopy-blocktime"] * 10**6


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the runs that have a share; None when none has."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def cell(args: argparse.Namespace, ram: int, workload: str, link: str | None, background: bool) -> dict[str, Any]:
    from harness.report import build_report
    from harness.run import execute

    runs = []
    for _ in range(args.repeat):
        cfg = RunConfig(vcpus=args.vcpus, ram=ram, workload=workload, background=background, seed=args.seed,
                        **({"link": link} if link else {}))
        rep = build_report(cfg, execute(cfg))
        if rep["status"] != "completed":
            raise RuntimeError(f"{workload} {link or 'unlimited'}: {rep['error']}")
        runs.append(shares(rep) | {"truth-ms": rep["engines"]["truth"]["blocktime-ns"] / 1e6})
    med = {n: {k: median_or_none([r[n][k] for r in runs]) for k in ("vcpu", "all")} for n in ENGINES}
    return {"workload": workload, "link": link or "unlimited", "stream": background, "shares": med,
            "truth-all-ms": statistics.median(r["truth-ms"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ram = parse_size(args.ram)
        RunConfig(vcpus=args.vcpus, ram=ram).validate()
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"{PROG}: --repeat must be at least 1", file=sys.stderr)
        return 2
    rows = []
    try:
        for link in links(args.links):
            for workload in args.workloads.split(","):
                for background in (False, True):
                    rows.append(cell(args, ram, workload, link, background))
    except (RuntimeError, ConfigError, OSError) as e:
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    t = Table(title=f"share of the vCPUs' own stall each engine sees ({args.vcpus} vCPUs, {args.ram}, "
                    f"median of {args.repeat}): per-vCPU sum / all-vCPUs-blocked total")
    for c in ("link", "workload", "pages", *ENGINES, "truth all-blocked ms"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["link"], r["workload"], "stream + demand" if r["stream"] else "demand only",
                  *[f"{percent(r['shares'][n]['vcpu'])} / {percent(r['shares'][n]['all'])}" for n in ENGINES],
                  f"{r['truth-all-ms']:.2f}")
    console = output_console()  # no wrapped numbers when piped
    console.print(t)
    cmd = "python bench/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    console.print(f"reproduce: {cmd}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "cells": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
