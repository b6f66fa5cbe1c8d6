"""The run report: a JSON document (field names other tools rely on) and a summary table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.accounting import accuracy
from harness.config import RunConfig
from harness.cpu_time import cpu_section
from vcpu_workers.stores import KINDS, Finding, RamVerdict

# Units of the report's fields whose names cannot carry one (QEMU's query-migrate names) or do not.
# Every other number is a count, or says its unit in its name (-bytes, -s, -ms, -us, -ns, per-second).
UNITS = {
    "postcopy-blocktime": "ms", "postcopy-vcpu-blocktime": "ms", "postcopy-latency": "ns",
    "postcopy-vcpu-latency": "ns", "postcopy-non-vcpu-latency": "ns",
    "postcopy-latency-dist": "faults per power-of-two bucket of us", "latency-us": "us", "duration-s": "s",
    "faults.per-second": "faults resolved per second of the workload", "share": "fraction of the stall",
    "config.ram": "bytes", "config.timeout": "s", "started-at": "UTC, ISO 8601",
}


def kebab(obj: object) -> object:
    """``obj`` with every dict key's underscores turned into hyphens (the report's one key style)."""
    if isinstance(obj, dict):
        return {str(k).replace("_", "-"): kebab(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [kebab(v) for v in obj]
    return obj


def host_info() -> dict:
    """What the numbers depend on: host name, CPUs, kernel, Python."""
    return {
        "name": platform.node(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def provenance(started_at: float | None = None, argv: list[str] | None = None) -> dict:
    """The keys every report starts with: which tool, when (wall clock, UTC), where, how invoked."""
    from harness import tool_version

    started = time.time() if started_at is None else started_at
    return {
        "tool-version": tool_version(),
        "started-at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)) + f".{int(started % 1 * 1000):03d}Z",
        "host": host_info(),
        "argv": list(sys.argv if argv is None else argv),
        "units": UNITS,
    }


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def build_report(cfg: RunConfig, raw: dict | None, error: str | None = None,
                 started_at: float | None = None, argv: list[str] | None = None,
                 recovery: dict | None = None) -> dict:
    """Assemble the JSON report from what :func:`harness.run.execute` returned (or the error);
    ``started_at`` (wall clock) defaults to when the run said it started, else now."""
    if started_at is None and raw:
        started_at = raw.get("started_at")
    rep: dict = {
        **provenance(started_at, argv),
        "status": "failed" if error or raw is None else "completed",
        "error": error,
        "config": kebab(cfg.as_dict()),
        "link": cfg.link_model.describe(),
        "strategy": cfg.strategy,
        "vcpus": cfg.vcpus,
        "ram-bytes": cfg.ram,
        "page-size": cfg.page_size,
    }
    if raw is None:
        if recovery is not None:  # a failed run with --inject: what was injected and what happened
            rep["recovery"] = recovery
        if cfg.plant_bug:
            rep["plant-bug"] = planted_verdict(cfg.plant_bug, rep, None)
        return rep
    summ, hs, ss = raw["summary"], raw["handler"], raw["source"]
    lat = np.concatenate(raw["latencies"]) if raw["latencies"] else np.zeros(0)
    ran = summ[summ["t_end"] > 0]  # a lost worker (killed mid-run) never wrote its times
    ran = ran if len(ran) else summ
    t0 = int(ran["t_start"].min())
    t1 = int(ran["t_end"].max())
    workload_s = max((t1 - t0) / 1e9, 1e-9)
    nv = raw.get("non_vcpu")  # the non-vCPU processes' records (run --non-vcpu N); their reads count too
    checked = summ if nv is None or not len(nv) else np.concatenate([summ, nv])
    mismatches = int(checked["mismatches"].sum())
    # the postcopy phase: from "go" until the last page is in (not the shutdown and final checks)
    postcopy_s = max((hs["t_last_place"] - raw["t_go"]) / 1e9, 1e-9)
    rep["pages"] = {
        "total": cfg.npages,
        "placed": hs["placed"],
        # one word, one number: "requested" is every page the destination asked for after a fault,
        # the same count as faults.pages-requested, the summary and placements.png
        "requested": hs["pages_requested"],
        "urgent": hs["placed_urgent"],  # placed from an answer to a request (urgent path)
        "background": hs["placed_background"],  # placed from the stream (a requested page may come so too)
        "zero": hs["placed_zero"],
        "prepaged": ss.get("pages_prepaged", 0),  # pushed by the strategy next to a faulting page (in background)
        "duplicates-dropped": hs["duplicates"],
        "per-second": round(hs["placed"] / postcopy_s, 1),
    }
    pre = raw.get("precopy")
    if pre is not None:  # run --precopy: pages kept from precopy, and those dropped at the switchover
        rep["pages"]["precopy"] = hs["placed_precopy"]
        rep["pages"]["discarded"] = hs["discarded"]
    rep["verification"] = verification(checked, raw["ram_check"])
    rep["faults"] = {
        "total": hs["faults"],
        "per-second": round(hs["faults"] / workload_s, 1),
        "vcpu": hs["faults_vcpu"],
        "non-vcpu": hs["faults_non_vcpu"],
        "already-received": hs["faults_already_received"],
        "requests-sent": hs["requests"],
        "pages-requested": hs["pages_requested"],
        "wakes": hs["wakes"],
        "board-wakes": hs["board_wakes"],
        "faulting-accesses": int(lat.size),
    }
    if pre is not None:
        rep["faults"]["on-discarded"] = hs["faults_discarded"]  # discarded pages fault again
        rep["faults"]["requests-discarded"] = hs["requests_discarded"]
        rep["precopy"] = {"seconds": pre["seconds"], "dirty-rate": cfg.dirty_rate, "rounds": pre["rounds"],
                          "pages-sent": pre["pages_sent"], "pages-dirtied": pre["pages_dirtied"],
                          "pages-rewritten": hs["precopy_rewrites"], "discard-ranges": pre["discard_ranges"],
                          "discard-commands": pre["discard_commands"]}
    rep["latency-us"] = latency_section(lat)
    rep["workers"] = workers_section(summ, raw)
    if nv is not None and len(nv):
        rep["non-vcpu-processes"] = {
            "count": len(nv),
            "stall-ms": [round(int(s) / 1e6, 3) for s in nv["stall_ns"]],
            "faulting-accesses": [int(x) for x in nv["faulting"]],
            "accesses": [int(x) for x in nv["accesses"]],
            "pages-checked": [int(x) for x in nv["pages_checked"]],
        }
    if "recovery" in raw:
        rep["recovery"] = raw["recovery"]  # --inject: what was injected, pauses, resumes, paused time
    rep["engines"] = raw["engines"]
    rep["accuracy"] = accuracy(rep["workers"]["vcpu-stall-ms"], raw["engines"])
    rep["accounting"] = {"events": raw["events"], "cpu-s": round(raw["engines_cpu_s"], 3),
                         "mode": "live" if raw["engines_live"] else "after-workload"}
    rep["duration-s"] = {
        "workload": round(workload_s, 4),
        "postcopy": round(postcopy_s, 4),
        "total": round(raw["wall_s"], 3),
    }
    if pre is not None:
        rep["duration-s"]["precopy"] = round(pre["duration_s"], 4)
    rep["cpu"] = cpu_section(raw.get("cpu"), int(summ["cpu_ns"].sum()), hs["pages_requested"], hs["spin_ns"])
    rep["handler"] = {"kind": "built-in",  # run --handler: "external" (external_report.py)
                      "cpu-s": hs["cpu_s"], "copy-eexist": hs["copy_eexist"], "dead-ports": hs["dead_ports"],
                      "direct-skipped": hs["direct_skipped"], "return-path-full": hs["rp_full"],
                      "spin-s": round(hs["spin_ns"] / 1e9, 4),
                      "wake-policy": cfg.wake_policy}
    rep["source"] = {"cpu-s": ss["cpu_s"], "bytes-sent": ss["bytes_sent"], "requests": ss["requests"],
                     "requested-already-sent": ss["requested_already_sent"], "link": cfg.link_model.describe()}
    if raw.get("netns"):  # run --link-mode netns: where the source ran and what shaped its link
        rep["netns"] = raw["netns"]
    if rep["workers"]["lost"]:
        rep["status"] = "completed-degraded"  # error stays None: the run did complete, without them
        if sum(w.get("vcpu") is not None for w in rep["workers"]["lost"]) >= cfg.vcpus:
            # no vCPU left to have finished anything: not a degraded run but a failed one
            rep["status"] = "failed"
            rep["error"] = f"every vCPU was lost, none finished its workload: {lost_words(rep)}"
    v = rep["verification"]
    if mismatches or v["ram-bad-pages"] or v["lost-writes"] or hs["placed"] != cfg.npages:
        rep["status"] = "failed"
        kinds = ", ".join(f"{k} {n}" for k, n in v["by-kind"].items() if n)
        first = first_bad(checked, raw["ram_check"])
        rep["error"] = (f"verification failed: {v['lost-writes']} lost writes, {mismatches} wrong words read by vCPUs, "
                        f"{v['ram-bad-pages']} bad pages in RAM ({kinds or 'none'}), "
                        f"{hs['placed']}/{cfg.npages} pages placed" + (f"; first: {first.words()}" if first else ""))
    if cfg.plant_bug:
        rep["plant-bug"] = planted_verdict(cfg.plant_bug, rep, hs["planted"])
    return rep


def planted_verdict(kind: str, rep: dict, acted: int | None) -> dict:
    """The report's plant-bug section: did the checks catch the bug planted on purpose, as what."""
    from postcopy_core.plant import PLANTED_BUGS

    bug = PLANTED_BUGS[kind]
    by_kind = rep.get("verification", {}).get("by-kind", {})
    if bug.caught_as == "hung":  # the stall watch names a vCPU that waits on a page already placed
        caught = "lost wake-up" in (rep["error"] or "")
        seen = ["hung"] if caught else []
    else:
        seen = [k for k, n in by_kind.items() if n]
        caught = bug.caught_as in seen
    return {"kind": kind, "where": bug.where, "does": bug.does, "acted": acted, "caught-as": bug.caught_as,
            "caught": caught, "classes-seen": seen}


def latency_section(lat: np.ndarray) -> dict:
    """The report's latency-us: percentiles of the faulting accesses as the workers timed them."""
    return {
        "p50": round(_pct(lat, 50) / 1e3, 2),
        "p99": round(_pct(lat, 99) / 1e3, 2),
        "max": round(float(lat.max()) / 1e3 if lat.size else 0.0, 2),
        "mean": round(float(lat.mean()) / 1e3 if lat.size else 0.0, 2),
        "count": int(lat.size),
    }


def workers_section(summ: np.ndarray, raw: dict) -> dict:
    """The report's workers: each vCPU's stall clock and accesses, start-up, memory, the lost ones."""
    return {
        "vcpu-stall-ms": [round(int(s) / 1e6, 3) for s in summ["stall_ns"]],
        "faulting-accesses": [int(x) for x in summ["faulting"]],
        "accesses": [int(x) for x in summ["accesses"]],
        "startup-s": round(raw["startup_s"], 3),
        "uss-bytes": raw["worker_mem"],
        "uss-mean-mib": round(float(np.mean(raw["worker_mem"])) / 2**20, 2) if raw["worker_mem"] else 0.0,
        "lost": kebab(raw.get("lost", [])),  # workers killed mid-run: the run went on without them
    }


def verification(checked: np.ndarray, ram: RamVerdict) -> dict:
    """The report's verification section: what the vCPUs checked as they ran and after, and the
    orchestrator's final check of all RAM (vcpu_workers/stores.py); wrong pages by kind, from the
    final check where it found any, else from the vCPUs' own checks."""
    live_kinds = checked["by_kind"].sum(axis=0) if len(checked) else np.zeros(len(KINDS), np.uint64)
    by_kind = ram.by_kind if ram.bad_pages else {k: int(n) for k, n in zip(KINDS, live_kinds, strict=True)}
    first = first_bad(checked, ram)
    return {
        "pages-checked": int(checked["pages_checked"].sum()),
        "words-checked": int(checked["words_checked"].sum()),
        "mismatches": int(checked["mismatches"].sum()),
        "ram-pages-verified": ram.pages_checked,
        "ram-bad-pages": ram.bad_pages,
        "writes": int(checked["stores"].sum()),
        "writes-checked": int(checked["writes_checked"].sum()) + ram.writes_checked,
        "lost-writes": ram.lost_writes or int(checked["lost_writes"].sum()),
        "by-kind": by_kind,
        "first-bad": first.as_dict() if first else None,
    }


def first_bad(checked: np.ndarray, ram: RamVerdict) -> Finding | None:
    """The first wrong thing found: the final check's, else the first a worker read."""
    if ram.first is not None:
        return ram.first
    return next((f for f in map(Finding.from_c, checked["bad"]) if f is not None), None)


def lost_words(rep: dict) -> str:
    """One line on the workers a completed-degraded run lost, e.g. "vCPU 3 (pid 812, killed by SIGKILL)"."""
    words = []
    for w in rep.get("workers", {}).get("lost", []):
        who = f"vCPU {w['vcpu']}" if w.get("vcpu") is not None else f"non-vCPU process {w['non-vcpu']}"
        words.append(f"{who} (pid {w['pid']}, {w['how']})")
    return ", ".join(words)


def write_json(rep: dict, path: str) -> None:
    """Write the report as JSON (no symbolic link followed; see postcopy_core.outfile)."""
    from postcopy_core.outfile import open_output

    with open_output(path) as f:
        json.dump(rep, f, indent=2)
        f.write("\n")


def output_console(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width on a terminal; piped, wide enough that no cell
    (a number, an error) is ever wrapped across lines."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=100_000)


def _n(x: float | int | None, decimals: int = 0) -> str:
    """The summary's one number format: thousands separators, a fixed number of decimals per unit."""
    if x is None:
        return "-"
    return f"{x:,.{decimals}f}" if decimals or isinstance(x, float) else f"{x:,}"


def print_summary(rep: dict, console: Console | None = None) -> None:
    console = console or output_console()
    cfg = rep["config"]
    title = (f"postcopy run: {rep['vcpus']} vCPUs, {_n(cfg['ram'] / 2**20, 0)} MiB {cfg['backing']}, "
             f"workload {cfg['workload']}, link {rep['link']}, strategy {rep.get('strategy')}")
    console.print(title, style="italic", soft_wrap=True, markup=False)  # above the table: never wrapped to its width
    t = Table(show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    status = rep["status"]
    color = {"completed": "green", "completed-degraded": "yellow"}.get(status, "red")
    t.add_row("status", f"[{color}]{status}[/]")
    if "faults" in rep:
        p, f, lat, v = rep["pages"], rep["faults"], rep["latency-us"], rep["verification"]
        t.add_row("pages total / requested (after a fault) / zero",
                  " / ".join(_n(p[k]) for k in ("total", "requested", "zero")))
        t.add_row("pages arrived as answers (urgent) / in the stream",
                  " / ".join(_n(p.get(k)) for k in ("urgent", "background")))
        if p.get("prepaged"):
            t.add_row("pages prepaged (of background)", _n(p["prepaged"]))
        if "discarded" in p:
            t.add_row("precopy: pages kept / discarded / seconds",
                      f"{_n(p['precopy'])} / {_n(p['discarded'])} / {_n(rep['duration-s']['precopy'], 3)}")
        t.add_row("pages per second / MiB/s (postcopy phase)",
                  f"{_n(p['per-second'], 0)} / {_n(p['per-second'] * rep['page-size'] / 2**20, 1)}")
        t.add_row("uffd faults", _n(f["total"]))
        t.add_row("faults per second (workload phase)", _n(f["per-second"], 0))
        t.add_row("fault latency p50 / p99 / max (µs)", " / ".join(_n(lat[k], 1) for k in ("p50", "p99", "max")))
        stall = rep["workers"]["vcpu-stall-ms"]
        t.add_row("vCPU stall ms (min / mean / max)",
                  f"{_n(min(stall), 1)} / {_n(sum(stall) / len(stall), 1)} / {_n(max(stall), 1)}")
        for name, eng in rep.get("engines", {}).items():
            t.add_row(f"blocktime \\[{name}] total ms", _n(eng.get("postcopy-blocktime")))
        t.add_row("pages checked by vCPUs / mismatching words", f"{_n(v['pages-checked'])} / {_n(v['mismatches'])}")
        t.add_row("RAM pages verified at the end / bad", f"{_n(v['ram-pages-verified'])} / {_n(v['ram-bad-pages'])}")
        d = rep["duration-s"]
        t.add_row("workload / postcopy / total (s)", " / ".join(_n(d[k], 3) for k in ("workload", "postcopy", "total")))
        t.add_row("worker start-up (s) / USS per worker (MiB)",
                  f"{_n(rep['workers']['startup-s'], 3)} / {_n(rep['workers']['uss-mean-mib'], 2)}")
        t.add_row("handler CPU (s) / source CPU (s)",
                  f"{_n(rep['handler']['cpu-s'], 3)} / {_n(rep['source']['cpu-s'], 3)}")
    if rep.get("error"):
        t.add_row("error", f"[red]{escape(rep['error'])}[/]")
    console.print(t)
