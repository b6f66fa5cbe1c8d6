"""``loadtest --handler CMD``: your fault handler and the built-in one, side by side, over vCPU counts.

Every point is a snapshot restore (harness/restore.py): the same seeded memory file, the same
workload, the vCPUs faulting on it; first the built-in handler (demand paging only, no background
stream, so that both serve exactly what the vCPUs fault on), then yours, alternating at each point
so that a busy host weighs on both alike. Rows: faults/s (counted by the vCPUs), p50/p99 of the
fault latency as the vCPUs waited it, truth blocktime, status. A failed point is a row with its
one-line error; the sweep goes on and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics

from rich.console import Console

from harness.config import ConfigError, RunConfig, parse_size
from harness.handler_process import HandlerError, HandlerSpec

PROG = "postcopy-harness loadtest"
COLUMNS = ("handler", "vcpus", "ram-bytes", "workload", "repeats", "status", "faults", "faults-per-s", "p50-us",
           "p99-us", "blocktime-truth-ms", "handler-cpu-s", "error")
BUILTIN = "built-in"


def configs(args: argparse.Namespace) -> list[RunConfig]:
    """One validated configuration per vCPU count; ConfigError (one line) on a bad flag."""
    from harness.loadtest import SweepError, parse_list

    try:
        vcpus = parse_list(args.vcpus, "--vcpus", int)
        workloads = parse_list(args.workload, "--workload")
    except SweepError as e:
        raise ConfigError(str(e)) from None
    if args.backing != "shmem":
        raise ConfigError("--handler runs on --backing shmem only")
    ram = parse_size(args.ram)
    out = []
    for w in workloads:
        for n in vcpus:
            cfg = RunConfig(vcpus=n, ram=ram, workload=w, seed=args.seed, background=False, timeout=args.timeout,
                            pin=args.pin)
            cfg.validate()
            out.append(cfg)
    return out


def _row(name: str, cfg: RunConfig, reps: list[dict]) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(handler=name, vcpus=cfg.vcpus, **{"ram-bytes": cfg.ram}, workload=cfg.workload, repeats=len(reps),
               error="")
    failed = [r for r in reps if r["status"] != "completed"]
    row["status"] = "failed" if failed else "completed"
    if failed:
        row["error"] = " ".join(str(failed[0].get("error")).split())
    done = [r for r in reps if "faults" in r]
    if done:
        def med(get):
            return statistics.median(get(r) for r in done)

        row["faults"] = med(lambda r: r["faults"]["total"])
        row["faults-per-s"] = med(lambda r: r["faults"]["per-second"])
        row["p50-us"] = med(lambda r: r["latency-us"]["p50"])
        row["p99-us"] = med(lambda r: r["latency-us"]["p99"])
        row["blocktime-truth-ms"] = med(lambda r: r["engines"]["truth"]["postcopy-blocktime"])
        row["handler-cpu-s"] = med(lambda r: r["handler"]["cpu-s"])
    return row


def _builtin(cfg: RunConfig) -> dict:
    from harness.runner import run_config

    rep = run_config(cfg, write=False)
    rep["handler"]["kind"] = BUILTIN
    return rep


def _line(row: dict) -> str:
    def f(v, spec=",.0f"):
        return "-" if v is None else format(v, spec)

    status = "ok" if row["status"] == "completed" else "FAILED"
    return (f"{row['handler'][-24:]:<24} {row['workload']:<10} {row['vcpus']:>5} {status:>6} "
            f"{f(row['faults-per-s']):>9} {f(row['p50-us'], ',.1f'):>8} {f(row['p99-us'], ',.1f'):>9} "
            f"{f(row['blocktime-truth-ms']):>8}"
            + (f"  {row['error']}" if row["error"] else ""))


HEADER = (f"{'handler':<24} {'workload':<10} {'vCPUs':>5} {'status':>6} {'faults/s':>9} {'p50 µs':>8} {'p99 µs':>9} "
          f"{'bt:truth':>8}")


def main(args: argparse.Namespace) -> int:
    """The sweep: 0 if every point completed, 1 if any failed, 2 for bad flags."""
    from harness.external_report import run_external
    from harness.loadtest import _check_writable
    from harness.report import output_console

    console = output_console()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        from harness.restore import refuse_with_handler

        problem = refuse_with_handler(args, None)
        if problem:
            raise ConfigError(problem)
        spec = HandlerSpec.parse(args.handler, args.handoff, args.handler_per_uffd)
        cfgs = configs(args)
        _check_writable(args.csv, "--csv")
        _check_writable(args.json, "--json")
    except (ConfigError, HandlerError, ValueError) as e:
        err.print(f"{getattr(args, 'prog', PROG)}: {e}")
        return 2
    rows, reports = [], []
    console.print(HEADER)
    for cfg in cfgs:
        runs: dict[str, list[dict]] = {BUILTIN: [], spec.describe(): []}
        for _ in range(args.repeat):
            runs[BUILTIN].append(_builtin(cfg))
            runs[spec.describe()].append(run_external(cfg, spec, mode="loadtest"))
        for name, reps in runs.items():
            row = _row(name, cfg, reps)
            rows.append(row)
            reports.append({"row": row, "reports": reps})
            console.print(_line(row), markup=False)
        _save(args, rows, reports)
    console.print("faults/s counted by the vCPUs; latency in µs as the vCPUs waited; bt:truth = blocktime (ms) "
                  "from the vCPUs' clocks; built-in = this harness's handler, demand paging only")
    return 1 if any(r["status"] != "completed" for r in rows) else 0


def _save(args, rows: list[dict], reports: list[dict]) -> None:
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "points": reports}, f, indent=1, default=str)
            f.write("\n")
