"""The harness against the project's C reference (bench/uffd_ref.c), same parameters, same run.

Builds the reference into a temporary directory, then for every vCPU count runs the reference
(``-m mp``, WARM line = rounds 2..R) and the harness (``--no-background``: pure demand paging, as
the reference measures) on the same RAM size, workload and pinning, alternating which goes first
so both see the same machine state, and prints the medians of ``--repeat`` runs with ratios.

faults/s is pages resolved on demand per second of the workload on both sides (the reference's
``faults_per_s`` = installs / wall; the harness's requested pages / workload seconds), so the
``shared`` workload, where several vCPUs fault on one page, counts each page once on both sides.

Reproduce:  python bench/compare_ref.py --vcpus 1,8,32 --ram 256M --repeat 3          (a few minutes)
            python bench/compare_ref.py --vcpus 1,8,32 --ram 256M --repeat 3 --pin    (handler CPU 0,
                                                                                       vCPUs CPU 1)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # the installed package (plain or editable), not this checkout's files by path
    from rich.console import Console
    from rich.table import Table

    from harness import reference
    from harness.config import ConfigError, RunConfig, parse_size
    from harness.report import output_console
    from postcopy_core.probe import free_huge_pages
except ImportError as e:
    sys.exit(f"bench/compare_ref.py needs postcopy-harness installed (pip install . or pip install -e .): {e}")

REPO = Path(__file__).resolve().parent.parent

PROG = "compare_ref"
PATTERN = reference.PATTERN  # harness workload -> reference -p
HUGEPAGES = "/proc/sys/vm/nr_hugepages"
CPU_PARTS = ("vcpus", "handler", "handler-spin", "source", "destination")  # destination = vCPUs + handler
SERVICE_CPU, VCPU_CPU = 0, 1  # what the reference's -A pins: handler to CPU 0, workers to CPU 1


class BenchError(RuntimeError):
    """Bad input or an unusable machine; printed as one line, exit code 2."""


# ------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    ap = argparse.ArgumentParser(
        prog="compare_ref.py", description=__doc__.split("\n\n")[0],
        epilog="Needs a C compiler (cc, gcc or $CC) and userfaultfd (root or vm.unprivileged_userfaultfd=1).")
    ap.add_argument("--vcpus", default="1,8,32", metavar="LIST", help="comma list of vCPU counts (default 1,8,32)")
    ap.add_argument("--ram", default="256M", help="RAM size, a whole number of MiB (default 256M)")
    ap.add_argument("--workload", default="sequential", choices=sorted(PATTERN),
                    help="sequential = reference -p seq, shared = -p same (default sequential)")
    ap.add_argument("--backing", default="shmem", choices=("shmem", "hugetlb"),
                    help="hugetlb = reference -H; needs free huge pages (default shmem)")
    ap.add_argument("--reserve-hugepages", action="store_true",
                    help="as root: raise vm.nr_hugepages for the run, restore the original value after")
    ap.add_argument("--pin", action="store_true",
                    help="reference -A; the harness runs with its --pin, the same placement (fault handler "
                         f"and source on CPU {SERVICE_CPU}, vCPU workers on CPU {VCPU_CPU})")
    ap.add_argument("--place", default="copy", metavar="LIST",
                    help="the harness's run --place, a comma list (copy,continue): each is one more side, "
                         "alternated with the others in the same run (default copy)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per side and size; medians (default 3)")
    ap.add_argument("--rounds", type=int, default=3, metavar="R",
                    help="reference rounds; its WARM line (rounds 2..R) is used (default 3, at least 2)")
    ap.add_argument("--seed", type=int, default=1, help="harness RAM content and access order seed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)")
    ap.add_argument("--reference-source", metavar="FILE",
                    help="another C file with the reference's command line and output (default: the project's, "
                         "shipped with the package)")
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians here")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[int], int, Path]:
    """vCPU counts, RAM bytes, the reference's source file; BenchError for anything unusable."""
    try:
        vcpus = [int(x) for x in args.vcpus.split(",")]
    except ValueError:
        raise BenchError(f"--vcpus {args.vcpus!r}: give a comma list of integers, e.g. 1,8,32") from None
    try:
        ram = parse_size(args.ram)
    except ConfigError as e:
        raise BenchError(f"--ram: {e}") from None
    if ram <= 0 or ram % (1 << 20):
        raise BenchError(f"--ram {args.ram}: the reference takes whole MiB")
    if args.rounds < 2:
        raise BenchError(f"--rounds {args.rounds}: at least 2 (round 1 is the cold one, left out)")
    if args.repeat < 1:
        raise BenchError(f"--repeat {args.repeat}: at least 1")
    places = args.place.split(",")
    if not places or len(set(places)) != len(places) or not set(places) <= {"copy", "continue"}:
        raise BenchError(f"--place {args.place!r}: a comma list of copy and continue, each once")
    for n in vcpus:
        try:
            cfg = harness_config(args, n, ram).validate()
        except ConfigError as e:
            raise BenchError(f"{n} vCPUs: {e}") from None
        if args.workload == "sequential" and cfg.npages % n:
            raise BenchError(f"--vcpus {n}: the reference needs the {cfg.npages} pages to split evenly")
    if args.pin:
        have = os.sched_getaffinity(0)
        if not {SERVICE_CPU, VCPU_CPU} <= have:
            raise BenchError(f"--pin needs CPUs {SERVICE_CPU} and {VCPU_CPU}; this process may use {sorted(have)}")
    if args.reserve_hugepages and args.backing != "hugetlb":
        raise BenchError("--reserve-hugepages is for --backing hugetlb")
    src = reference_source(args)
    limits = reference_limits(src)
    if max(vcpus) > limits.get("MAXN", max(vcpus)):
        raise BenchError(f"--vcpus {max(vcpus)}: the reference takes at most {limits['MAXN']} workers")
    if args.rounds > limits.get("MAXR", args.rounds):
        raise BenchError(f"--rounds {args.rounds}: the reference takes at most {limits['MAXR']}")
    return vcpus, ram, src


def reference_source(args: argparse.Namespace) -> Path:
    """The reference's C file: --reference-source, else the one shipped with the package."""
    src = Path(args.reference_source) if args.reference_source else reference.default_source()
    if not src.is_file():
        raise BenchError(f"--reference-source {src}: no such file")
    return src


def reference_limits(src: Path) -> dict[str, int]:
    """``#define MAXN 1024``-style limits of the reference, read from its source (it may change)."""
    limits = {}
    for m in re.finditer(r"^#define\s+(MAX[NR])\s+(\d+)\s*$", src.read_text(errors="replace"), re.MULTILINE):
        limits[m.group(1)] = int(m.group(2))
    return limits


def harness_config(args: argparse.Namespace, vcpus: int, ram: int, place: str = "copy") -> RunConfig:
    """The harness side of one point: demand paging only and read-only (write_ratio 0), like the
    reference, pinned like it if asked."""
    pin = {"pin": True} if args.pin else {}
    if pin and "pin" not in {f.name for f in dataclasses.fields(RunConfig)}:
        raise BenchError("--pin: this harness has no pin option (RunConfig.pin); run without --pin")
    if place != "copy":
        pin["place"] = place
    return RunConfig(vcpus=vcpus, ram=ram, workload=args.workload, backing=args.backing,
                     background=False, seed=args.seed, timeout=args.timeout, write_ratio=0.0, **pin)


# ------------------------------------------------------------------ the reference


def build_reference(src: Path, out_dir: str) -> Path:
    """``cc -o <tmp>/uffd_ref <src>``: the source's folder may be read-only, the binary goes to tmp."""
    try:
        return reference.build(src, out_dir)
    except reference.ReferenceError as e:
        raise BenchError(str(e)) from None


def reference_argv(binary: str, args: argparse.Namespace, n: int | str, ram: int) -> list[str]:
    """The reference's command line for ``n`` workers (the same options as the harness side)."""
    argv = [binary, "-m", "mp", "-n", str(n), "-s", str(ram >> 20), "-r", str(args.rounds),
            "-p", PATTERN[args.workload]]
    if args.backing == "hugetlb":
        argv.append("-H")
    if args.pin:
        argv.append("-A")
    return argv


def parse_reference(text: str) -> dict[str, Any]:
    """The WARM line's ``key=value`` fields (numbers as floats) plus the totals line's verify_err."""
    try:
        return reference.parse_warm(text)
    except reference.ReferenceError as e:
        raise BenchError(f"{e} (rounds < 2, or it failed)") from None


def run_reference(binary: Path, args: argparse.Namespace, n: int, ram: int) -> dict[str, Any]:
    """One reference run -> faults/s, p50, p99 (µs) and its whole WARM line."""
    argv = reference_argv(str(binary), args, n, ram)
    # its own session: on a timeout or Ctrl-C its handler and workers go down with it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _killpg_quietly(proc.pid)
        proc.wait()
        raise BenchError(f"reference {shlex.join(argv[1:])}: no result within --timeout {args.timeout:g} s") from None
    except BaseException:
        _killpg_quietly(proc.pid)
        proc.wait()
        raise
    if proc.returncode:
        _killpg_quietly(proc.pid)  # a dead main may leave its handler behind
        # the first lines hold the cause (its processes die one after the other); keep it one line
        said = " | ".join(err.strip().splitlines()[:3]) or f"exit status {proc.returncode}"
        raise BenchError(f"reference {shlex.join(argv[1:])}: {' '.join(said.split())}")
    row = parse_reference(out)
    if row["verify_err"]:
        raise BenchError(f"reference {shlex.join(argv[1:])}: {row['verify_err']:.0f} pages failed verification")
    cpu = {"vcpus": row.get("vcpus_cpu_us"), "handler": row.get("handler_cpu_us"), "handler-spin": None, "source": None}
    cpu["destination"] = None if None in (cpu["vcpus"], cpu["handler"]) else cpu["vcpus"] + cpu["handler"]
    installs = row.get("installs") or 0
    ipis = None if "resched_ipis" not in row or not installs else (
        (row["resched_ipis"] + row.get("call_ipis", 0)) / installs)
    return {"faults-per-s": row["faults_per_s"], "p50-us": row["flt_p50_us"], "p99-us": row["flt_p99_us"],
            "cpu-us": cpu, "ipis-per-fault": ipis, "warm": row}


def _killpg_quietly(pgid: int) -> None:
    """Whatever of the reference's session is left (its handler, if a worker died)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ the harness


def run_harness(args: argparse.Namespace, n: int, ram: int, place: str = "copy") -> dict[str, Any]:
    """One harness run -> faults/s (pages resolved on demand / workload s), p50, p99 (µs)."""
    from harness.report import build_report
    from harness.run import execute
    from harness.supervise import RunFailed
    from postcopy_core.kernel import KernelError

    cfg = harness_config(args, n, ram, place)
    try:
        raw = execute(cfg)
    except (RunFailed, KernelError, OSError, ValueError) as e:
        raise BenchError(f"harness, {n} vCPUs: {' '.join(str(e).split())}") from None
    rep = build_report(cfg, raw)
    if rep["status"] != "completed":
        raise BenchError(f"harness, {n} vCPUs: {rep['error']}")
    cpu = rep["cpu"]
    per = cpu["per-fault-us"]
    ipis = cpu["ipis-per-fault"]
    return {"faults-per-s": rep["pages"]["requested"] / rep["duration-s"]["workload"],
            "p50-us": rep["latency-us"]["p50"], "p99-us": rep["latency-us"]["p99"],
            "uffd-events-per-s": rep["faults"]["per-second"], "handler-cpu-s": rep["handler"]["cpu-s"],
            "workload-s": rep["duration-s"]["workload"],
            "cpu-us": {k: per[k] for k in CPU_PARTS},
            "ipis-per-fault": (ipis["reschedule"] + ipis.get("function-call", 0)) if "reschedule" in ipis else None,
            "host-idle-share": (cpu["host-idle-s"] / (cpu["window-s"] * (os.cpu_count() or 1))
                                if cpu["window-s"] else None)}


# ------------------------------------------------------------------ huge pages


hugepages_available = free_huge_pages  # the harness's own count (postcopy_core.probe)


@contextmanager
def huge_pages(args: argparse.Namespace, ram: int) -> Iterator[None]:
    """Make sure ``ram`` of huge pages is free; with --reserve-hugepages raise the pool and always restore it.

    The two sides run one after the other, so one RAM's worth is enough.
    """
    if args.backing != "hugetlb":
        yield
        return
    from postcopy_core.kernel import HUGE_PAGE_SIZE

    need = ram // HUGE_PAGE_SIZE
    short = need - hugepages_available()
    if short <= 0:
        yield
        return
    if not args.reserve_hugepages:
        raise BenchError(f"--backing hugetlb needs {need} free huge pages, {need - short} available: "
                         f"raise /proc/sys/vm/nr_hugepages or pass --reserve-hugepages (as root)")
    with open(HUGEPAGES, encoding="ascii") as f:
        original = f.read().strip()
    try:
        try:
            with open(HUGEPAGES, "w", encoding="ascii") as f:
                f.write(str(int(original) + short))
        except OSError as e:
            raise BenchError(f"--reserve-hugepages: cannot write {HUGEPAGES} ({e.strerror}): needs root") from None
        if hugepages_available() < need:
            raise BenchError(f"--reserve-hugepages: the kernel gave only {hugepages_available()} of {need} "
                             "free huge pages (memory fragmented?)")
        yield
    finally:
        with open(HUGEPAGES, "w", encoding="ascii") as f:
            f.write(original)


# ------------------------------------------------------------------ the comparison


def _median(values: list[float | None]) -> float | None:
    """The median of the values measured (None where a side has no such figure)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of one side: faults/s, p50, p99, the CPU per fault of each part, IPIs per fault."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in ("faults-per-s", "p50-us", "p99-us")}
    out["cpu-us"] = {k: _median([r["cpu-us"][k] for r in runs]) for k in CPU_PARTS}
    out["ipis-per-fault"] = _median([r["ipis-per-fault"] for r in runs])
    return out


def reproduce_command(args: argparse.Namespace) -> str:
    """Every option spelled out, so the line means the same thing whatever the defaults become."""
    argv = ["python", "bench/compare_ref.py", "--vcpus", args.vcpus, "--ram", args.ram,
            "--workload", args.workload, "--repeat", str(args.repeat), "--rounds", str(args.rounds),
            "--seed", str(args.seed)]
    if args.backing != "shmem":
        argv += ["--backing", args.backing]
    if args.reserve_hugepages:
        argv.append("--reserve-hugepages")
    if args.pin:
        argv.append("--pin")
    if args.place != "copy":
        argv += ["--place", args.place]
    if args.reference_source:
        argv += ["--reference-source", args.reference_source]
    return shlex.join(argv)


def render(points: list[dict[str, Any]], args: argparse.Namespace, ram: int) -> Table:
    """The comparison table: one row per vCPU count."""
    pin = "pinned" if args.pin else "unpinned"
    t = Table(title=f"harness vs C reference: {args.workload}, {ram >> 20} MiB {args.backing}, {pin}, "
                    f"median of {args.repeat}", header_style="bold",
              caption=f"pinned as the reference's -A: fault handler and source on CPU {SERVICE_CPU}, "
                      f"vCPUs on CPU {VCPU_CPU}" if args.pin else None)
    places = args.place.split(",")
    names = ["N"] + (["place"] if len(places) > 1 else []) + [
        "ref faults/s", "harness faults/s", "ratio", "ref p50/p99 µs", "harness p50/p99 µs", "p50 ratio"]
    for name in names:
        t.add_column(name, justify="right", no_wrap=True)
    for p in points:
        r = p["ref"]["median"]
        for place in places:
            side = p["by-place"][place]
            h = side["median"]
            t.add_row(str(p["vcpus"]), *([place] if len(places) > 1 else []), f"{r['faults-per-s']:,.0f}",
                      f"{h['faults-per-s']:,.0f}", f"{side['ratio']:.2f}x", f"{r['p50-us']:.1f} / {r['p99-us']:.1f}",
                      f"{h['p50-us']:.1f} / {h['p99-us']:.1f}", f"{side['p50-ratio']:.2f}x")
    return t


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def render_cpu(points: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    """CPU per fault of each part, both sides, medians: where the destination's time goes."""
    t = Table(title="CPU per fault (µs, medians): vCPUs + handler = destination; the harness's source besides",
              header_style="bold")
    places = args.place.split(",")
    names = ["N"] + (["place"] if len(places) > 1 else []) + [
        "ref vCPUs", "ref handler", "ref dest", "vCPUs", "handler", "of it spin", "source", "dest", "dest ratio",
        "IPIs/fault ref / harness"]
    for name in names:
        t.add_column(name, justify="right", no_wrap=True)
    for p in points:
        r = p["ref"]["median"]
        for place in places:
            h = p["by-place"][place]["median"]
            rc, hc = r["cpu-us"], h["cpu-us"]
            ratio = (f"{hc['destination'] / rc['destination']:.2f}x"
                     if hc["destination"] is not None and rc["destination"] else "–")
            ipis = (f"{r['ipis-per-fault']:.2f} / {h['ipis-per-fault']:.2f}"
                    if None not in (r["ipis-per-fault"], h["ipis-per-fault"]) else "–")
            t.add_row(str(p["vcpus"]), *([place] if len(places) > 1 else []), _us(rc["vcpus"]), _us(rc["handler"]),
                      _us(rc["destination"]), _us(hc["vcpus"]), _us(hc["handler"]), _us(hc["handler-spin"]),
                      _us(hc["source"]),
                      _us(hc["destination"]), ratio, ipis)
    return t


def compare(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Build the reference, run both sides ``--repeat`` times per size; every run and the medians."""
    from harness.report import provenance

    vcpus, ram, src = check_args(args)
    started = provenance()  # tool-version, started-at, host, argv, units, as in every report
    places = args.place.split(",")
    points = {n: {"vcpus": n, "ref": {"runs": []}, "by-place": {pl: {"runs": []} for pl in places}} for n in vcpus}
    with tempfile.TemporaryDirectory(prefix="pch-compare-") as tmp:
        binary = build_reference(src, tmp)
        with huge_pages(args, ram):
            total = args.repeat * len(vcpus)
            done = 0
            for i in range(args.repeat):
                for n in vcpus:
                    sides: list[tuple[dict, Callable[[], dict[str, Any]]]] = [
                        (points[n]["ref"], lambda n=n: run_reference(binary, args, n, ram))] + [
                        (points[n]["by-place"][pl], lambda n=n, pl=pl: run_harness(args, n, ram, pl))
                        for pl in places]
                    # rotate who goes first: no side always gets the warmer machine
                    k = i % len(sides)
                    for side, fn in sides[k:] + sides[:k]:
                        side["runs"].append(fn())
                    done += 1
                    console.print(f"[dim]run {done}/{total}: {n} vCPUs done[/]")
    for p in points.values():
        p["ref"]["median"] = r = median_of(p["ref"]["runs"])
        for side in p["by-place"].values():
            side["median"] = h = median_of(side["runs"])
            side["ratio"] = h["faults-per-s"] / r["faults-per-s"] if r["faults-per-s"] else float("nan")
            side["p50-ratio"] = h["p50-us"] / r["p50-us"] if r["p50-us"] else float("nan")
        first = p["by-place"][places[0]]  # "harness", "ratio": the first --place, as before --place existed
        p["harness"] = {"runs": first["runs"], "median": first["median"]}
        p["ratio"], p["p50-ratio"] = first["ratio"], first["p50-ratio"]
    return {
        **started,
        "params": {"vcpus": vcpus, "ram-bytes": ram, "workload": args.workload, "backing": args.backing,
                   "place": places,
                   "pin": args.pin, "repeat": args.repeat, "rounds": args.rounds, "seed": args.seed},
        "reference-command": shlex.join(reference_argv("uffd_ref", args, "N", ram)),
        "reproduce": reproduce_command(args),
        "points": list(points.values()),
    }


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Build, run both, print the table; 0 on success, 2 with one line for bad input or a failed run."""
    args = parse_args(argv)
    console = output_console()  # files and pipes: the table on whole lines, no wrapped numbers
    progress = Console(stderr=True, highlight=False)  # run-by-run lines stay out of the table on stdout
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so the huge page pool is restored on kill too
    try:
        doc = compare(args, progress)
    except BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    console.print(render(doc["points"], args, doc["params"]["ram-bytes"]))
    console.print("faults/s = pages resolved on demand per second of the workload; ratio = harness / reference "
                  "(faults/s: higher is better for the harness, p50: lower is)", style="dim", soft_wrap=True)
    console.print(render_cpu(doc["points"], args))
    console.print("CPU per fault = CPU time over the workload / pages resolved on demand: the reference's handler "
                  "from /proc/PID/schedstat, its workers' own CPU clocks; the harness's report section `cpu` "
                  "(harness/cpu_time.py); of it spin = the handler's wall time spent polling for the next event "
                  "before sleeping (DestPolicy.spin_ns), the most of its CPU that was polling; dest ratio = "
                  "harness / reference (lower is better for the harness). "
                  "IPIs = the host's rescheduling + function-call interrupts (/proc/interrupts) per fault, "
                  "anything else on the host included", style="dim", soft_wrap=True)
    pinned = " --pin" if args.pin else ""
    console.print(f"reference: {doc['reference-command']}   harness: postcopy-harness run --vcpus N "
                  f"--ram {args.ram} --workload {args.workload} --backing {args.backing} --no-background{pinned}"
                  f" --place {args.place.replace(',', '|')}",
                  style="dim", soft_wrap=True)
    console.print(f"Reproduce: {doc['reproduce']}", soft_wrap=True)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        except OSError as e:
            print(f"{PROG}: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
