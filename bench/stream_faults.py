"""Pages that stream and pages that fault: fault latency with and without the background stream,
and the stream's speed against raw UFFDIO_COPY (the project's bench/uffd_ref.c ``-m raw``), one run.

Table 1, for every vCPU count: the same run (RAM, workload, seed) with the default background
stream and with ``--no-background`` (demand paging only), alternating which goes first; medians of
``--repeat`` runs of the fault p50 and p99 as the vCPUs timed them, and the ratio stream / demand.

Table 2: one vCPU walking RAM sequentially while the stream runs (the postcopy phase's
``pages.per-second``: go until the last page is placed) against ``uffd_ref -m raw`` of the same
size (its WARM pages/s: rounds 2..R, a UFFDIO_COPY loop with nobody faulting), alternating, medians;
on hugetlbfs too with ``--hugetlb`` (``uffd_ref -m raw -H``).

Reproduce:  python bench/stream_faults.py --vcpus 1,4,32 --ram 256M --stream-ram 512M --repeat 3
            python bench/stream_faults.py --vcpus 1 --stream-ram 512M --hugetlb --reserve-hugepages
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_ref as cr  # noqa: E402  (the reference's build, limits and huge page handling; it checks the install)
from rich.table import Table  # noqa: E402

from harness.config import ConfigError, RunConfig, parse_size  # noqa: E402
from harness.report import output_console  # noqa: E402

PROG = "stream_faults"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="stream_faults.py", description=__doc__.split("\n\n")[0],
                                 epilog="Needs a C compiler (cc, gcc or $CC) and userfaultfd (root or "
                                        "vm.unprivileged_userfaultfd=1).")
    ap.add_argument("--vcpus", default="1,4,32", metavar="LIST", help="vCPU counts for table 1 (default 1,4,32)")
    ap.add_argument("--ram", default="256M", help="RAM of the latency runs (default 256M)")
    ap.add_argument("--workload", default="random", help="workload of the latency runs (default random)")
    ap.add_argument("--stream-ram", default="512M", help="RAM of the stream-speed runs, whole MiB (default 512M)")
    ap.add_argument("--hugetlb", action="store_true", help="table 2 on hugetlbfs too (uffd_ref -m raw -H)")
    ap.add_argument("--reserve-hugepages", action="store_true",
                    help="as root: raise vm.nr_hugepages for the hugetlbfs runs, restore it after")
    ap.add_argument("--place", default="copy", metavar="LIST",
                    help="the harness's run --place, a comma list (copy,continue): one row per mode, the modes "
                         "alternated with the reference in the same run (default copy)")
    ap.add_argument("--no-latency", action="store_true", help="table 2 only (the stream's speed)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per side; medians (default 3)")
    ap.add_argument("--rounds", type=int, default=3, metavar="R", help="reference rounds (WARM = 2..R; default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)")
    ap.add_argument("--reference-source", metavar="FILE",
                    help="another C file with the reference's command line and output (default: the project's)")
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians here")
    return ap.parse_args(argv)


def harness(cfg: RunConfig) -> dict[str, Any]:
    """One harness run, in-process -> its report (BenchError unless completed)."""
    from harness.report import build_report
    from harness.run import execute
    from harness.supervise import RunFailed
    from postcopy_core.kernel import KernelError

    try:
        rep = build_report(cfg, execute(cfg))
    except (RunFailed, KernelError, OSError, ValueError) as e:
        raise cr.BenchError(f"harness, {cfg.vcpus} vCPUs: {' '.join(str(e).split())}") from None
    if rep["status"] != "completed":
        raise cr.BenchError(f"harness, {cfg.vcpus} vCPUs: {rep['error']}")
    return rep


def raw_reference(binary: Path, mib: int, rounds: int, hugetlb: bool, timeout: float) -> float:
    """``uffd_ref -m raw``: WARM pages/s of a UFFDIO_COPY loop."""
    argv = [str(binary), "-m", "raw", "-s", str(mib), "-r", str(rounds)] + (["-H"] if hugetlb else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("raw ")), None)
    if p.returncode or line is None:
        said = " | ".join(p.stderr.strip().splitlines()[:3]) or f"exit status {p.returncode}"
        raise cr.BenchError(f"reference {shlex.join(argv[1:])}: {said}")
    fields = dict(tok.partition("=")[::2] for tok in line.split() if "=" in tok)
    if float(fields.get("verify_err", 0)):
        raise cr.BenchError(f"reference {shlex.join(argv[1:])}: pages failed verification")
    return float(fields["pages_per_s_warm"])


def latency_table(args: argparse.Namespace, vcpus: list[int], ram: int, runs: list) -> list[dict]:
    rows = []
    places = args.place.split(",")
    for n in vcpus:
        got: dict[tuple[str, bool], list[dict]] = {(pl, bg): [] for pl in places for bg in (True, False)}
        keys = list(got)
        for i in range(args.repeat):
            k = i % len(keys)  # rotate who goes first
            for place, background in keys[k:] + keys[:k]:
                cfg = RunConfig(vcpus=n, ram=ram, workload=args.workload, background=background, seed=args.seed,
                                timeout=args.timeout, place=place)
                lat = harness(cfg)["latency-us"]
                got[place, background].append(lat)
                runs.append({"table": "latency", "vcpus": n, "place": place, "background": background, **lat})
        med = {key: {q: statistics.median(r[q] for r in got[key]) for q in ("p50", "p99")} for key in got}
        for place in places:
            rows.append({"vcpus": n, "place": place, "stream": med[place, True], "demand": med[place, False],
                         "p50-ratio": med[place, True]["p50"] / max(med[place, False]["p50"], 1e-9)})
    return rows


def stream_table(args: argparse.Namespace, binary: Path, mib: int, runs: list) -> list[dict]:
    rows = []
    places = args.place.split(",")
    for backing in ["shmem"] + (["hugetlb"] if args.hugetlb else []):
        cfgs = {pl: RunConfig(vcpus=1, ram=mib << 20, workload="sequential", backing=backing, seed=args.seed,
                              timeout=args.timeout, place=pl) for pl in places}
        hs: dict[str, list[float]] = {pl: [] for pl in places}
        ref: list[float] = []
        hp_args = argparse.Namespace(backing=backing, reserve_hugepages=args.reserve_hugepages)
        sides = ["ref"] + places
        with cr.huge_pages(hp_args, mib << 20):
            for i in range(args.repeat):
                k = i % len(sides)  # rotate who goes first
                for side in sides[k:] + sides[:k]:
                    if side != "ref":
                        rep = harness(cfgs[side])
                        hs[side].append(rep["pages"]["per-second"])
                        runs.append({"table": "stream", "backing": backing, "side": "harness", "place": side,
                                     "pages-per-s": hs[side][-1], "requested": rep["pages"]["requested"]})
                    else:
                        ref.append(raw_reference(binary, mib, args.rounds, backing == "hugetlb", args.timeout))
                        runs.append({"table": "stream", "backing": backing, "side": side, "pages-per-s": ref[-1]})
        r = statistics.median(ref)
        page = cfgs[places[0]].page_size
        for place in places:
            h = statistics.median(hs[place])
            rows.append({"backing": backing, "place": place, "harness-pages-per-s": h, "raw-pages-per-s": r,
                         "ratio": h / r, "harness-mib-per-s": h * page / 2**20, "raw-mib-per-s": r * page / 2**20})
    return rows


def render(lat_rows: list[dict], stream_rows: list[dict], args: argparse.Namespace) -> list[Table]:
    t1 = Table(title=f"fault latency (µs) with and without the stream: {args.ram} {args.workload}, "
                     f"median of {args.repeat}")
    many = "," in args.place  # a place column only when there is a choice to show
    for c in ("vCPUs", *(["place"] if many else []), "stream p50", "stream p99", "demand p50", "demand p99",
              "p50 stream/demand"):
        t1.add_column(c, justify="right")
    for r in lat_rows:
        t1.add_row(str(r["vcpus"]), *([r["place"]] if many else []), f"{r['stream']['p50']:.1f}",
                   f"{r['stream']['p99']:.1f}",
                   f"{r['demand']['p50']:.1f}", f"{r['demand']['p99']:.1f}", f"{r['p50-ratio']:.2f}x")
    t2 = Table(title=f"stream speed, 1 vCPU sequential, {args.stream_ram}: harness postcopy phase vs "
                     f"uffd_ref -m raw (WARM), median of {args.repeat}")
    for c in ("backing", *(["place"] if many else []), "harness pages/s", "MiB/s", "raw pages/s", "MiB/s ", "ratio"):
        t2.add_column(c, justify="right")
    for r in stream_rows:
        t2.add_row(r["backing"], *([r["place"]] if many else []), f"{r['harness-pages-per-s']:,.0f}",
                   f"{r['harness-mib-per-s']:,.0f}",
                   f"{r['raw-pages-per-s']:,.0f}", f"{r['raw-mib-per-s']:,.0f}", f"{r['ratio']:.2f}x")
    return ([t1] if lat_rows else []) + [t2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = output_console()  # no wrapped numbers when piped
    try:
        try:
            vcpus = [int(x) for x in args.vcpus.split(",") if x]
            ram, stream_ram = parse_size(args.ram), parse_size(args.stream_ram)
        except (ValueError, ConfigError) as e:
            raise cr.BenchError(f"bad option: {e}") from None
        if stream_ram % (1 << 20) or args.repeat < 1 or args.rounds < 2 or not vcpus:
            raise cr.BenchError("--stream-ram takes whole MiB, --repeat >= 1, --rounds >= 2, --vcpus a list")
        places = args.place.split(",")
        if len(set(places)) != len(places) or not set(places) <= {"copy", "continue"}:
            raise cr.BenchError(f"--place {args.place!r}: a comma list of copy and continue, each once")
        src = cr.reference_source(args)
        runs: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="pch-bench-") as tmp:
            binary = cr.build_reference(src, tmp)
            lat_rows = [] if args.no_latency else latency_table(args, vcpus, ram, runs)
            stream_rows = stream_table(args, binary, stream_ram >> 20, runs)
    except cr.BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    for t in render(lat_rows, stream_rows, args):
        console.print(t)
    cmd = "python bench/stream_faults.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    console.print(f"reproduce: {cmd}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "latency": lat_rows, "stream": stream_rows, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
