"""The run report: a JSON document (field names other tools rely on) and a summary table."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console
from rich.table import Table

from harness.accounting import accuracy
from harness.config import RunConfig


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def build_report(cfg: RunConfig, raw: dict | None, error: str | None = None) -> dict:
    """Assemble the JSON report from what :func:`harness.run.execute` returned (or the error)."""
    rep: dict = {
        "status": "failed" if error or raw is None else "completed",
        "error": error,
        "config": cfg.as_dict(),
        "vcpus": cfg.vcpus,
        "ram-bytes": cfg.ram,
        "page-size": cfg.page_size,
    }
    if raw is None:
        return rep
    summ, hs, ss = raw["summary"], raw["handler"], raw["source"]
    lat = np.concatenate(raw["latencies"]) if raw["latencies"] else np.zeros(0)
    t0 = int(summ["t_start"].min())
    t1 = int(summ["t_end"].max())
    workload_s = max((t1 - t0) / 1e9, 1e-9)
    nv = raw.get("non_vcpu")  # the non-vCPU processes' records (run --non-vcpu N); their reads count too
    checked = summ if nv is None or not len(nv) else np.concatenate([summ, nv])
    mismatches = int(checked["mismatches"].sum())
    # the postcopy phase: from "go" until the last page is in (not the shutdown and final checks)
    postcopy_s = max((hs["t_last_place"] - raw["t_go"]) / 1e9, 1e-9)
    rep["pages"] = {
        "total": cfg.npages,
        "placed": hs["placed"],
        "requested": hs["placed_urgent"],
        "background": hs["placed_background"],
        "zero": hs["placed_zero"],
        "duplicates-dropped": hs["duplicates"],
        "per-second": round(hs["placed"] / postcopy_s, 1),
    }
    rep["verification"] = {
        "pages_checked": int(checked["pages_checked"].sum()),
        "words_checked": int(checked["words_checked"].sum()),
        "mismatches": mismatches,
        "ram_pages_verified": hs["ram_pages_verified"],
        "ram_bad_pages": hs["ram_bad_pages"],
    }
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
    rep["latency-us"] = {
        "p50": round(_pct(lat, 50) / 1e3, 2),
        "p99": round(_pct(lat, 99) / 1e3, 2),
        "max": round(float(lat.max()) / 1e3 if lat.size else 0.0, 2),
        "mean": round(float(lat.mean()) / 1e3 if lat.size else 0.0, 2),
        "count": int(lat.size),
    }
    rep["workers"] = {
        "vcpu-stall-ms": [round(int(s) / 1e6, 3) for s in summ["stall_ns"]],
        "faulting-accesses": [int(x) for x in summ["faulting"]],
        "accesses": [int(x) for x in summ["accesses"]],
        "startup-s": round(raw["startup_s"], 3),
        "uss-bytes": raw["worker_mem"],
        "uss-mean-mib": round(float(np.mean(raw["worker_mem"])) / 2**20, 2) if raw["worker_mem"] else 0.0,
    }
    if nv is not None and len(nv):
        rep["non-vcpu-processes"] = {
            "count": len(nv),
            "stall-ms": [round(int(s) / 1e6, 3) for s in nv["stall_ns"]],
            "faulting-accesses": [int(x) for x in nv["faulting"]],
            "accesses": [int(x) for x in nv["accesses"]],
            "pages-checked": [int(x) for x in nv["pages_checked"]],
        }
    rep["engines"] = raw["engines"]
    rep["accuracy"] = accuracy(rep["workers"]["vcpu-stall-ms"], raw["engines"])
    rep["accounting"] = {"events": raw["events"], "cpu-s": round(raw["engines_cpu_s"], 3),
                         "mode": "live" if raw["engines_live"] else "after-workload"}
    rep["duration-s"] = {
        "workload": round(workload_s, 4),
        "postcopy": round(postcopy_s, 4),
        "total": round(raw["wall_s"], 3),
    }
    rep["handler"] = {"cpu-s": hs["cpu_s"], "copy-eexist": hs["copy_eexist"], "dead-ports": hs["dead_ports"],
                      "wake-policy": cfg.wake_policy}
    rep["source"] = {"cpu-s": ss["cpu_s"], "bytes-sent": ss["bytes_sent"], "requests": ss["requests"],
                     "requested-already-sent": ss["requested_already_sent"], "link": cfg.link_model.describe()}
    if mismatches or hs["ram_bad_pages"] or hs["placed"] != cfg.npages:
        rep["status"] = "failed"
        rep["error"] = (f"verification failed: {mismatches} mismatching words read by vCPUs, "
                        f"{hs['ram_bad_pages']} bad pages in RAM, {hs['placed']}/{cfg.npages} pages placed")
    return rep


def write_json(rep: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")


def print_summary(rep: dict, console: Console | None = None) -> None:
    console = console or Console()
    cfg = rep["config"]
    title = (f"postcopy run: {rep['vcpus']} vCPUs, {cfg['ram'] >> 20} MiB {cfg['backing']}, "
             f"workload {cfg['workload']}, link {cfg['link']}")
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    status = rep["status"]
    t.add_row("status", f"[green]{status}[/]" if status == "completed" else f"[red]{status}[/]")
    if "faults" in rep:
        p, f, lat, v = rep["pages"], rep["faults"], rep["latency-us"], rep["verification"]
        t.add_row("pages total / requested / background / zero",
                  f"{p['total']} / {p['requested']} / {p['background']} / {p['zero']}")
        t.add_row("pages per second / MiB/s (postcopy phase)",
                  f"{p['per-second']:,.0f} / {p['per-second'] * rep['page-size'] / 2**20:,.1f}")
        t.add_row("uffd faults", f"{f['total']}")
        t.add_row("faults per second (workload phase)", f"{f['per-second']:,.0f}")
        t.add_row("fault latency p50 / p99 / max (µs)", f"{lat['p50']} / {lat['p99']} / {lat['max']}")
        stall = rep["workers"]["vcpu-stall-ms"]
        t.add_row("vCPU stall ms (min / mean / max)",
                  f"{min(stall):.1f} / {sum(stall) / len(stall):.1f} / {max(stall):.1f}")
        for name, eng in rep.get("engines", {}).items():
            t.add_row(f"blocktime \\[{name}] total ms", f"{eng.get('postcopy-blocktime')}")
        t.add_row("pages checked by vCPUs / mismatching words", f"{v['pages_checked']} / {v['mismatches']}")
        t.add_row("RAM pages verified at the end / bad", f"{v['ram_pages_verified']} / {v['ram_bad_pages']}")
        d = rep["duration-s"]
        t.add_row("workload / postcopy / total (s)", f"{d['workload']} / {d['postcopy']} / {d['total']}")
        t.add_row("worker start-up (s) / USS per worker (MiB)",
                  f"{rep['workers']['startup-s']} / {rep['workers']['uss-mean-mib']}")
        t.add_row("handler CPU (s) / source CPU (s)", f"{rep['handler']['cpu-s']} / {rep['source']['cpu-s']}")
    if rep.get("error"):
        t.add_row("error", f"[red]{rep['error']}[/]")
    console.print(t)
