"""Every write survives, in numbers: lost writes over many runs, planted bugs caught, and what the
write check costs.  All runs store (``--write-ratio``), on the real kernel path.

Table 1 (lost writes): ``--runs`` runs of each configuration of the matrix vCPUs x placement x
backing x scenario (the background stream; ``--inject source-crash`` and ``link-drop``, survived by
postcopy recovery; ``--precopy`` with dirtying, copy placement only) with ``--write-ratio``; per
configuration the runs that completed verified and the lost writes and bad pages found.  The goal is
0 lost writes in every run.

Table 2 (planted bugs): ``--plant-runs`` runs of every ``--plant-bug`` kind on each placement where
it can act; how many of them failed with the kind's class named.  The goal is every run.

Table 3 (cost): faults/s of the same run with ``--write-ratio`` and with 0 (read-only), alternating
which goes first, medians of ``--repeat``: what making every store checkable costs.

Reproduce:  python bench/write_check.py                                    (shmem; 1, 8, 128 vCPUs)
            python bench/write_check.py --hugetlb --reserve-hugepages      (hugetlbfs too, as root)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_ref as cr  # noqa: E402  (huge page reservation, restored after)
from rich.table import Table  # noqa: E402

from harness.config import ConfigError, RunConfig, parse_size  # noqa: E402
from harness.report import build_report, output_console  # noqa: E402
from harness.run import execute  # noqa: E402
from harness.supervise import RunFailed  # noqa: E402
from postcopy_core.plant import PLANTED_BUGS  # noqa: E402

PROG = "write_check"
SCENARIOS = {  # name -> RunConfig fields
    "stream": {},
    # a link slow enough that the migration is still under way when the source or the link goes
    "source-crash": {"inject": ["source-crash@0.1"], "link": "200mbit"},
    "link-drop": {"inject": ["link-drop@0.1"], "link": "200mbit"},
    "precopy": {"precopy": 0.3, "dirty_rate": 3000},
}
PLANT_EXTRA = {  # what each kind needs to act (postcopy_core/plant.py)
    "stale-generation": {"precopy": 0.3, "dirty_rate": 4000},
    "lost-wake": {"stall_timeout": 1.5},
    "resend-overwrite": {"inject": ["source-crash@0.1"], "link": "200mbit"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--vcpus", default="1,8,128", help="vCPU counts of the matrix (default %(default)s)")
    ap.add_argument("--place", default="copy,continue", help="placements (default %(default)s)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="(default %(default)s)")
    ap.add_argument("--ram", default="32M", help="guest RAM per run (default %(default)s)")
    ap.add_argument("--write-ratio", type=float, default=0.5, help="(default %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="runs per configuration of table 1 (default %(default)s)")
    ap.add_argument("--plant-runs", type=int, default=20,
                    help="runs per planted bug and placement (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="pairs of runs for table 3 (default %(default)s)")
    ap.add_argument("--hugetlb", action="store_true", help="hugetlbfs too (needs free huge pages)")
    ap.add_argument("--reserve-hugepages", action="store_true", help="as root: raise vm.nr_hugepages, restore after")
    ap.add_argument("--tables", default="1,2,3", help="which tables (default %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="every run's figures as JSON")
    args = ap.parse_args(argv)
    try:
        args.ram_bytes = parse_size(args.ram)
        args.vcpu_list = [int(v) for v in args.vcpus.split(",")]
    except ValueError as e:
        ap.error(str(e))
    return args


def one_run(**fields) -> dict:
    """One run's report (a run that failed early still gets one, with its error)."""
    cfg = RunConfig(**fields).validate()
    try:
        return build_report(cfg, execute(cfg))
    except RunFailed as e:
        return build_report(cfg, None, str(e))


def lost_writes_table(args, runs: list) -> Table:
    t = Table(title=f"Table 1: lost writes, --write-ratio {args.write_ratio}, {args.runs} runs each")
    for col in ("vCPUs", "place", "backing", "scenario", "completed", "resumed", "stores", "lost writes",
                "bad pages"):
        t.add_column(col, justify="right" if col not in ("place", "backing", "scenario") else "left")
    backings = ["shmem"] + (["hugetlb"] if args.hugetlb else [])
    total = lost_total = 0
    for vcpus, place, backing, scen in itertools.product(args.vcpu_list, args.place.split(","), backings,
                                                         args.scenarios.split(",")):
        if scen == "precopy" and place != "copy":
            continue  # --place continue refuses --precopy
        ram = max(args.ram_bytes, vcpus * (2 << 20)) if backing == "hugetlb" else args.ram_bytes
        done = stores = lost = bad = resumed = 0
        with cr.huge_pages(argparse.Namespace(backing=backing, reserve_hugepages=args.reserve_hugepages), ram):
            for _ in range(args.runs):
                rep = one_run(vcpus=vcpus, place=place, backing=backing, ram=ram, write_ratio=args.write_ratio,
                              **SCENARIOS[scen])
                v = rep.get("verification", {})
                done += rep["status"] == "completed"
                stores += v.get("writes", 0)
                lost += v.get("lost-writes", 0)
                bad += v.get("ram-bad-pages", 0)
                resumed += rep.get("recovery", {}).get("resumes", 0) > 0  # the injection hit a running migration
                runs.append({"table": 1, "vcpus": vcpus, "place": place, "backing": backing, "scenario": scen,
                             "status": rep["status"], "error": rep["error"], "writes": v.get("writes"),
                             "lost-writes": v.get("lost-writes"), "by-kind": v.get("by-kind"),
                             "resumes": rep.get("recovery", {}).get("resumes", 0)})
        total += args.runs
        lost_total += lost
        t.add_row(str(vcpus), place, backing, scen, f"{done}/{args.runs}",
                  f"{resumed}/{args.runs}" if scen in ("source-crash", "link-drop") else "-", f"{stores:,}", str(lost),
                  str(bad))
    t.caption = f"{total} runs, {lost_total} lost writes"
    return t


def planted_table(args, runs: list) -> Table:
    t = Table(title=f"Table 2: planted bugs caught, {args.plant_runs} runs each")
    for col in ("--plant-bug", "place", "caught as", "caught", "acted (median)"):
        t.add_column(col)
    for kind, bug in PLANTED_BUGS.items():
        for place in args.place.split(","):
            if kind == "stale-generation" and place != "copy":
                continue
            caught, acted = 0, []
            for _ in range(args.plant_runs):
                rep = one_run(vcpus=4, place=place, ram=args.ram_bytes // 2, write_ratio=args.write_ratio,
                              plant_bug=kind, **PLANT_EXTRA.get(kind, {}))
                verdict = rep["plant-bug"]
                caught += verdict["caught"]
                if verdict["acted"] is not None:
                    acted.append(verdict["acted"])
                runs.append({"table": 2, "kind": kind, "place": place, "caught": verdict["caught"],
                             "classes-seen": verdict["classes-seen"], "acted": verdict["acted"]})
            t.add_row(kind, place, bug.caught_as, f"{caught}/{args.plant_runs}",
                      f"{statistics.median(acted):g}" if acted else "n/a (run stopped by the stall watch)")
    return t


def cost_table(args, runs: list) -> Table:
    t = Table(title=f"Table 3: what the write check costs (faults/s, medians of {args.repeat}, alternated)")
    for col in ("vCPUs", "place", "read-only", f"--write-ratio {args.write_ratio}", "ratio"):
        t.add_column(col, justify="right")
    for vcpus, place in itertools.product(args.vcpu_list, args.place.split(",")):
        fps: dict[float, list[float]] = {0.0: [], args.write_ratio: []}
        for i in range(args.repeat):
            for ratio in (list(fps) if i % 2 == 0 else list(fps)[::-1]):
                rep = one_run(vcpus=vcpus, place=place, ram=max(args.ram_bytes, 64 << 20), write_ratio=ratio,
                              background=False)
                fps[ratio].append(rep["faults"]["per-second"])
                runs.append({"table": 3, "vcpus": vcpus, "place": place, "write-ratio": ratio,
                             "faults-per-s": fps[ratio][-1]})
        ro, rw = statistics.median(fps[0.0]), statistics.median(fps[args.write_ratio])
        t.add_row(str(vcpus), place, f"{ro:,.0f}", f"{rw:,.0f}", f"{rw / ro:.2f}x")
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = output_console()
    runs: list = []
    t0 = time.monotonic()
    try:
        for n, table in (("1", lost_writes_table), ("2", planted_table), ("3", cost_table)):
            if n in args.tables.split(","):
                console.print(table(args, runs))
    except (ConfigError, cr.BenchError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    console.print(f"{len(runs)} runs in {time.monotonic() - t0:.0f} s; command: python bench/{PROG}.py "
                  + " ".join(sys.argv[1:] if argv is None else argv))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
