"""The same run over the in-process link model and over a real tc-shaped veth pair (--link-mode netns).

For each ``--link``: the run (RAM, workload, seed) with ``--link-mode model`` and ``--link-mode
netns``, alternating which goes first; medians of ``--repeat`` runs of the fault p50/p99 (as the
vCPUs timed them) and of the postcopy phase's duration, and the ratio netns / model.  A link that
needs netem (latency, jitter, loss) is skipped in netns mode on a kernel without sch_netem (said so).

Reproduce:  python bench/link_modes.py --links 100mbit,20mbit --vcpus 4 --ram 32M --repeat 3
            python bench/link_modes.py --links 100mbit,5ms 1gbit,1ms,jitter=500us --no-background
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

from rich.table import Table

from harness.config import ConfigError, RunConfig, parse_size
from harness.netns import needs_netem, probe_support
from harness.report import output_console
from postcopy_core.link import parse_link


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="link_modes.py", description=__doc__.split("\n\n")[0],
                                 epilog="Needs root, iproute2 and userfaultfd.")
    ap.add_argument("--links", nargs="+", default=["100mbit", "20mbit"], metavar="LINK",
                    help="--link specs to compare (default 100mbit 20mbit)")
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--ram", default="32M")
    ap.add_argument("--workload", default="random")
    ap.add_argument("--no-background", action="store_true", help="demand paging only")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per mode; medians (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians here")
    return ap.parse_args(argv)


def one(link: str, mode: str, args: argparse.Namespace) -> dict:
    from postcopy_harness import run_config

    cfg = RunConfig(vcpus=args.vcpus, ram=parse_size(args.ram), workload=args.workload, link=link, link_mode=mode,
                    background=not args.no_background).validate()
    rep = run_config(cfg, write=False)
    if rep["status"] != "completed":
        raise SystemExit(f"link_modes: {mode} {link}: {rep['error']}")
    return {"p50-us": rep["latency-us"]["p50"], "p99-us": rep["latency-us"]["p99"],
            "postcopy-s": rep["duration-s"]["postcopy"], "bytes-sent": rep["source"]["bytes-sent"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for link in args.links:
            parse_link(link)
        RunConfig(vcpus=args.vcpus, ram=parse_size(args.ram), workload=args.workload).validate()
    except (ConfigError, ValueError) as e:
        print(f"link_modes: {e}", file=sys.stderr)
        return 2
    support = probe_support()
    if not support["netns"]:
        print(f"link_modes: --link-mode netns is not possible here: {support['detail']}", file=sys.stderr)
        return 1
    results: dict = {}
    for link in args.links:
        modes = ["model", "netns"] if support["netem"] or not needs_netem(parse_link(link)) else ["model"]
        runs: dict = {m: [] for m in modes}
        for i in range(args.repeat):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                runs[mode].append(one(link, mode, args))
        results[link] = {m: {"runs": r, "median": {k: statistics.median(x[k] for x in r) for k in r[0]}}
                         for m, r in runs.items()}
    t = Table(title=f"link model vs netns ({args.vcpus} vCPUs, {args.ram}, {args.workload}"
                    f"{', demand only' if args.no_background else ''}; medians of {args.repeat})")
    for col in ("link", "fault p50 µs model → netns", "p99 µs model → netns", "postcopy s model → netns",
                "ratio (s)"):
        t.add_column(col)
    for link, by in results.items():
        m, n = by["model"]["median"], by.get("netns", {}).get("median")
        if n is None:
            t.add_row(link, f"{m['p50-us']:,.0f} → (no sch_netem)", f"{m['p99-us']:,.0f} → -",
                      f"{m['postcopy-s']:.2f} → -", "-")
            continue
        t.add_row(link, f"{m['p50-us']:,.0f} → {n['p50-us']:,.0f}", f"{m['p99-us']:,.0f} → {n['p99-us']:,.0f}",
                  f"{m['postcopy-s']:.2f} → {n['postcopy-s']:.2f}", f"{n['postcopy-s'] / m['postcopy-s']:.2f}x")
    out = output_console()
    out.print(t)
    out.print("reproduce: python bench/link_modes.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
