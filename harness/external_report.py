"""The report of a run against an external handler (``run --handler``, ``restore``).

The same keys as a migration run's report where the harness measured the thing itself (faults,
latency percentiles from the vCPUs' clocks, verification, the truth engine); the handler section
says which handler ran and how it ended; what only the handler could have reported is marked not
available, never filled in.
"""

from __future__ import annotations

import numpy as np

from harness.accounting import accuracy
from harness.external import engines_section
from harness.handler_process import HandlerSpec
from harness.report import first_bad, kebab, latency_section, lost_words, provenance, verification, workers_section


def handler_words(spec: HandlerSpec | None) -> dict:
    """The report's ``handler`` identity: which handler ran and through which hand-off."""
    if spec is None:
        return {"kind": "built-in", "command": None, "handoff": None}
    return {"kind": "external", "command": spec.describe(), "handoff": spec.handoff, "per-uffd": spec.per_uffd}


def build_external_report(cfg, spec: HandlerSpec, raw: dict | None, error: str | None = None,
                          argv: list[str] | None = None, mode: str = "run") -> dict:
    """The JSON report of an external-handler run (``raw`` from ExternalRun.execute, or None and ``error``)."""
    rep: dict = {
        **provenance(raw.get("started_at") if raw else None, argv),
        "status": "failed" if error or raw is None else "completed",
        "error": error,
        "mode": mode,
        "config": kebab(cfg.as_dict()),
        "vcpus": cfg.vcpus,
        "ram-bytes": cfg.ram,
        "page-size": cfg.page_size,
        "handler": handler_words(spec),
    }
    if raw is None:
        return rep
    summ = raw["summary"]
    lat = np.concatenate(raw["latencies"]) if raw["latencies"] else np.zeros(0)
    ran = summ[summ["t_end"] > 0]
    ran = ran if len(ran) else summ
    workload_s = max((int(ran["t_end"].max()) - int(ran["t_start"].min())) / 1e9, 1e-9)
    nv = raw.get("non_vcpu")
    checked = summ if nv is None or not len(nv) else np.concatenate([summ, nv])
    faults = int(checked["faulting"].sum())  # from the workers' own clocks: each access that waited
    rep["mem-file"] = raw["mem_file"]
    rep["remove-rate"] = raw["remove_rate"]
    rep["pages-removed"] = raw["removes"]  # given back by the vCPUs (MADV_REMOVE: UFFD_EVENT_REMOVE)
    rep["forks"] = raw["forks"]  # children the vCPUs forked mid-run (--fork-events: UFFD_EVENT_FORK)
    rep["pieces-unmapped"] = raw["unmaps"]  # unmapped and mapped back, or moved (--unmap-events: UNMAP, REMAP)
    rep["piece-faults"] = raw["piece_faults"]  # faults in those pieces after it: served at the new mapping
    rep["pages"] = {"total": cfg.npages, "placed": raw["placed"], "per-second": round(raw["placed"] / workload_s, 1)}
    rep["verification"] = verification(checked, raw["ram_check"])
    rep["faults"] = {"total": faults, "per-second": round(faults / workload_s, 1),
                     "vcpu": int(summ["faulting"].sum()), "faulting-accesses": int(lat.size),
                     "counted-by": "the vCPU workers (an access that found its page missing)"}
    rep["latency-us"] = latency_section(lat)
    rep["workers"] = workers_section(summ, raw)
    rep["engines"] = engines_section(raw["engines"])
    rep["accuracy"] = accuracy(rep["workers"]["vcpu-stall-ms"], raw["engines"])
    rep["duration-s"] = {"workload": round(workload_s, 4), "total": round(raw["wall_s"], 3)}
    rep["handler"].update({"pids": raw["handler_pids"], "cpu-s": round(raw["handler_cpu_s"], 3),
                           "ended": raw["handler_end"], "reported": raw.get("handler_said")})
    if rep["workers"]["lost"]:
        rep["status"] = "completed-degraded"
        if sum(w.get("vcpu") is not None for w in rep["workers"]["lost"]) >= cfg.vcpus:
            rep["status"] = "failed"
            rep["error"] = f"every vCPU was lost, none finished its workload: {lost_words(rep)}"
    v = rep["verification"]
    mismatches = int(checked["mismatches"].sum())
    if mismatches or v["ram-bad-pages"] or v["lost-writes"]:
        rep["status"] = "failed"
        kinds = ", ".join(f"{k} {n}" for k, n in v["by-kind"].items() if n)
        first = first_bad(checked, raw["ram_check"])
        rep["error"] = (f"verification failed: {v['lost-writes']} lost writes, {mismatches} wrong reads by vCPUs, "
                        f"{v['ram-bad-pages']} bad pages in RAM ({kinds or 'none'})"
                        + (f"; first: {first.words()}" if first else ""))
    return rep


def print_external_summary(rep: dict, console=None) -> None:
    """The summary table of an external-handler run."""
    from rich.markup import escape
    from rich.table import Table

    from harness.report import _n, output_console

    console = console or output_console()
    h = rep["handler"]
    console.print(f"{rep['mode']}: {rep['vcpus']} vCPUs, {_n(rep['ram-bytes'] / 2**20, 0)} MiB, workload "
                  f"{rep['config']['workload']}, handler {h['command'] or 'built-in'}"
                  + (f" (hand-off {h['handoff']})" if h.get("handoff") else ""), style="italic", soft_wrap=True,
                  markup=False)
    t = Table(show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    color = {"completed": "green", "completed-degraded": "yellow"}.get(rep["status"], "red")
    t.add_row("status", f"[{color}]{rep['status']}[/]")
    if "faults" in rep:
        lat, v = rep["latency-us"], rep["verification"]
        t.add_row("pages in RAM / total", f"{_n(rep['pages']['placed'])} / {_n(rep['pages']['total'])}")
        t.add_row("faults (vCPU clocks) / per second", f"{_n(rep['faults']['total'])} / "
                  f"{_n(rep['faults']['per-second'], 0)}")
        t.add_row("fault latency p50 / p99 / max (µs)", " / ".join(_n(lat[k], 1) for k in ("p50", "p99", "max")))
        stall = rep["workers"]["vcpu-stall-ms"]
        t.add_row("vCPU stall ms (min / mean / max)",
                  f"{_n(min(stall), 1)} / {_n(sum(stall) / len(stall), 1)} / {_n(max(stall), 1)}")
        for name, eng in rep["engines"].items():
            t.add_row(f"blocktime \\[{name}] total ms",
                      _n(eng["postcopy-blocktime"]) if "postcopy-blocktime" in eng else "not available")
        t.add_row("pages checked by vCPUs / mismatching words", f"{_n(v['pages-checked'])} / {_n(v['mismatches'])}")
        t.add_row("RAM pages verified at the end / bad", f"{_n(v['ram-pages-verified'])} / {_n(v['ram-bad-pages'])}")
        t.add_row("handler CPU (s) / how it ended", f"{_n(h['cpu-s'], 3)} / {h['ended']}")
    if rep.get("error"):
        t.add_row("error", f"[red]{escape(rep['error'])}[/]")
    console.print(t)


def run_external(cfg, spec: HandlerSpec, argv: list[str] | None = None, mode: str = "run",
                 remove_rate: float = 0.0, fork_events: bool = False, unmap_events: bool = False) -> dict:
    """Run ``cfg`` against the external handler ``spec`` and return its report (never raises for a
    failed run; Ctrl-C gives error "interrupted", SIGTERM "terminated"); everything is torn down."""
    from harness.external import ExternalRun
    from harness.run import outcome

    run = ExternalRun(cfg, spec, remove_rate=remove_rate, fork_events=fork_events, unmap_events=unmap_events)
    raw, error, _ = outcome(cfg, run=run)
    rep = build_external_report(cfg, spec, raw, error, argv, mode)
    if cfg.json:
        from harness.report import write_json

        write_json(rep, cfg.json)
    return rep
