"""What a real guest lived through against what QEMU and the engines say: the ``qemu`` command's report.

From ``qemu_run.migrate``'s raw dict:

* ``guest``: the stalls the destination's guest logged between the switchover and completion
  (TSC cycles over the measured TSC rate), per vCPU, all vCPUs at once, and their count; its
  memory check; the noise floor (the same guest, same VM, before migrating) scaled to the window;
* ``qemu``: the destination's ``query-migrate`` as QEMU answered it;
* ``engines``: seed, modern, exact and bounds replayed on the destination's trace log;
* ``error``: QEMU's and each engine's numbers minus the guest's, per vCPU and total, ms and %;
* ``faults``: guest stalls matched to traced faults by page (guest-physical = host-virtual minus the
  RAM block base that ``postcopy_ram_fault_thread_request`` lines show).

Times in the guest's log are its TSC; nothing here assumes the TSC and the trace's wall clock
agree, so faults are matched by (vCPU, page), never by time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from postcopy_core.blocktime import ENGINE_NAMES, BlocktimeError, EventColumns, Fault, Placed, replay_columns
from postcopy_core.blocktime.bounds import blocktime_bounds
from postcopy_core.blocktime.exact import interval_measures
from postcopy_core.blocktime.qemu_log import import_qemu_migrations

PAGE = 4096
QEMU_KEYS = ("postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-latency", "postcopy-vcpu-latency",
             "postcopy-non-vcpu-latency", "postcopy-latency-dist")  # the last four: QEMU 10.1+
_REQUEST = re.compile(r"postcopy_ram_fault_thread_request Request for HVA=(0x[0-9a-f]+) rb=(\S+) offset=(0x[0-9a-f]+)")


def _ms(cycles: float, hz: float) -> float:
    return cycles / hz * 1e3


def guest_stalls(raw: dict) -> dict:
    """The guest's own view: stalls per vCPU in the postcopy window, overlap, noise floor, memory check."""
    cfg, g, noise = raw["config"], raw["guest"], raw["noise"]
    hz = noise["tsc-hz"]
    smp = cfg["smp"]
    thr = cfg["threshold_us"] * 1e-6 * hz
    after_done = (raw["timing-ns"]["stopped"] - raw["timing-ns"]["completed"]) / 1e9 * hz
    per = [0.0] * smp
    counts = [0] * smp
    windows = [0.0] * smp
    noise_ms = [0.0] * smp
    stalls: list[dict] = []
    switchover: list[float] = []
    lanes: list[tuple[int, int, int]] = []  # (cpu, start ns, end ns) on a common TSC axis
    t0 = min(b["last_tsc"] for b in g["at-switch"])
    for slot, entries in enumerate(g["entries"]):
        cpu = g["apic"][slot]  # APIC id == cpu-index with QEMU's default topology
        if not 0 <= cpu < smp:
            raise BlocktimeError(f"guest slot {slot} reports APIC id {cpu}, outside 0..{smp - 1}")
        begin = g["at-switch"][slot]["last_tsc"]
        end = g["at-end"][slot]["last_tsc"] - after_done
        windows[cpu] = max(0.0, (end - begin) / hz)
        for start, length, page, _pas in entries:
            if length < thr or start >= end:
                continue
            if start == begin:  # the gap across the switchover: downtime, not a postcopy stall
                switchover.append(round(_ms(length, hz), 3))
                continue
            per[cpu] += _ms(length, hz)
            counts[cpu] += 1
            stalls.append({"vcpu": cpu, "page": page, "start-tsc": start, "cycles": length,
                           "ms": round(_ms(length, hz), 4)})
            lanes.append((cpu, int((start - t0) / hz * 1e9), int((start + length - t0) / hz * 1e9)))
        nslot = [e for e in noise["entries"][slot] if e[1] >= thr]
        rate = sum(_ms(e[1], hz) for e in nslot) / noise["seconds"]  # ms of gaps per second, alone
        noise_ms[cpu] = rate * windows[cpu]
    if lanes and g["walkers"] == smp:
        arr = np.array(lanes, dtype=np.int64)
        _, all_ns = interval_measures(smp, arr[:, 0], arr[:, 1], arr[:, 2])
    else:
        all_ns = 0  # a vCPU that never walks memory is never stalled, so never are all of them
    mism = sum(b["mismatches"] for b in g["at-end"])
    # Every walker ran on the destination (its clock moved on), so its reads there were checked.
    ran = all(e["last_tsc"] > s["last_tsc"] for s, e in zip(g["at-switch"], g["at-end"], strict=True))
    return {
        "vcpu-stall-ms": [round(x, 3) for x in per],
        "all-stalled-ms": round(all_ns / 1e6, 3),
        "stalls": sum(counts),
        "vcpu-stalls": counts,
        "window-s": [round(w, 4) for w in windows],
        "switchover-gap-ms": switchover,
        "tsc-hz": round(hz),
        "threshold-us": cfg["threshold_us"],
        "noise-floor": {
            "measured-s": round(noise["seconds"], 3),
            "vcpu-ms-in-window": [round(x, 3) for x in noise_ms],
            "vcpu-stall-ms-less-noise": [round(max(0.0, a - b), 3) for a, b in zip(per, noise_ms, strict=True)],
            "note": "gaps the same guest logs with no migration, scaled to the postcopy window: the "
                    "stall postcopy caused lies between vcpu-stall-ms-less-noise and vcpu-stall-ms",
        },
        "memory-check": {
            "passed": mism == 0 and ran,
            "mismatching-pages": mism,
            "ran-on-destination": ran,
            "passes-on-destination": [e["passes"] - s["passes"] for s, e in zip(g["at-switch"], g["at-end"],
                                                                                strict=True)],
        },
        "list": stalls,
    }


def _trace_faults(meta, events) -> list[dict]:
    """Each traced vCPU fault that waited (not already received) with the placement that ended it."""
    placed: dict[int, list[int]] = {}
    for ev in events:
        if type(ev) is Placed:
            placed.setdefault(ev.addr // meta.page_size, []).append(ev.t_ns)
    out = []
    for ev in events:
        if type(ev) is not Fault or ev.vcpu < 0 or ev.already_received or ev.received_late:
            continue
        ends = [t for t in placed.get(ev.addr // meta.page_size, []) if t >= ev.t_ns]
        out.append({"vcpu": ev.vcpu, "addr": ev.addr, "t-ns": ev.t_ns,
                    "ms": round((min(ends) - ev.t_ns) / 1e6, 4) if ends else None})
    return out


RAM_BLOCKS = ("pc.ram", "ram0")  # QEMU's own RAM block, or the memory backend qemu_run names ram0


def ram_base(trace: str | Path) -> int | None:
    """The host-virtual base of the guest's RAM block (HVA - offset of a fault request line), or None."""
    with open(trace, errors="replace") as fh:
        for line in fh:
            m = _REQUEST.search(line)
            if m and m.group(2) in RAM_BLOCKS:
                return int(m.group(1), 16) - int(m.group(3), 16)
    return None


def match_faults(stalls: list[dict], traced: list[dict], base: int | None, page_size: int = PAGE,
                 hz: float = 0.0) -> dict:
    """Guest stalls against traced faults, by (vCPU, guest page of the trace's page size): the share
    QEMU saw, ratios, misses.  QEMU traces one begin per waiting vCPU, shared pages included."""
    per = page_size // PAGE  # guest 4 KiB pages per traced page (512 on hugetlbfs)
    by_key: dict[tuple[int, int], dict] = {}
    for f in traced:
        if base is None:
            break
        page = (f["addr"] - base) // page_size
        by_key.setdefault((f["vcpu"], page), f)
    first: dict[tuple[int, int], dict] = {}
    for s in stalls:  # the first stall on a page is the one its fault caused
        first.setdefault((s["vcpu"], s["page"] // per), s)
    matched, untraced, ratios = [], [], []
    seen = set()
    for (vcpu, page), s in first.items():
        f = by_key.get((vcpu, page))
        if f is None or f["ms"] is None:
            untraced.append(s)
            continue
        seen.add(id(f))
        ratios.append(f["ms"] / s["ms"] if s["ms"] else float("inf"))
        matched.append((s, f))
    felt = {(s["vcpu"], s["page"] // per) for s in stalls}
    unfelt = [f for f in traced if base is not None and (f["vcpu"], (f["addr"] - base) // page_size) not in felt]
    # The trace's clock against the guest's TSC, from the matched pairs (for pictures only).
    offs = [f["t-ns"] - s["start-tsc"] / hz * 1e9 for s, f in matched if hz and "start-tsc" in s and "t-ns" in f]
    total = sum(s["ms"] for s in stalls)
    seen_ms = sum(min(f["ms"], s["ms"]) for s, f in matched)
    edges = [0, 0.25, 0.5, 0.75, 0.9, 1.1, 1.5, 2, 4, float("inf")]
    hist = np.histogram(np.clip(ratios, 0, 1e9), bins=edges)[0].tolist() if ratios else [0] * (len(edges) - 1)
    return {
        "ram-base": None if base is None else hex(base),
        "guest-stalls": len(stalls),
        "traced-faults": len(traced),
        "matched": len(matched),
        "share-of-guest-stall-traced": round(seen_ms / total, 4) if total else None,
        "ratio-histogram": {"edges": [str(e) for e in edges], "counts": hist,
                            "note": "traced wait / guest stall, per matched fault"},
        "untraced-stalls": sorted(untraced, key=lambda s: -s["ms"])[:20],
        "untraced-stall-count": len(untraced),
        "untraced-stall-ms": round(sum(s["ms"] for s in untraced), 3),
        "unfelt-faults": unfelt[:20],
        "unfelt-fault-count": len(unfelt),
        "trace-minus-guest-clock-ns": round(float(np.median(offs))) if offs else None,
        "traced": traced,
    }


def _error(mine: list[float], total: float, guest: dict) -> dict:
    gv, gt = guest["vcpu-stall-ms"], guest["all-stalled-ms"]

    def pct(d: float, ref: float) -> float | None:
        return round(100 * d / ref, 1) if ref else None

    dv = [round(m - g, 3) for m, g in zip(mine, gv, strict=True)]
    return {"vcpu-ms": dv, "vcpu-pct": [pct(d, g) for d, g in zip(dv, gv, strict=True)],
            "total-ms": round(total - gt, 3), "total-pct": pct(total - gt, gt),
            "sum-ms": round(sum(mine) - sum(gv), 3), "sum-pct": pct(sum(mine) - sum(gv), sum(gv))}


def compare(raw: dict) -> dict:
    """The whole report (see the module docstring)."""
    smp = raw["config"]["smp"]
    g = guest_stalls(raw)
    qm = raw["query-migrate"]
    qemu = {k: qm[k] for k in QEMU_KEYS if k in qm}
    qemu["status"] = qm.get("status")
    trace = raw["trace-file"]
    try:
        found = import_qemu_migrations(trace, smp)
    except BlocktimeError as exc:
        found = []
        trace_problem = str(exc)
    else:
        trace_problem = None
    engines: dict = {}
    faults = None
    if found:
        meta, events = found[-1]
        cols = EventColumns.from_events(events)
        engines = replay_columns(meta, cols, ENGINE_NAMES)
        engines["bounds"] = blocktime_bounds(meta, cols)
        faults = match_faults(g["list"], _trace_faults(meta, events), ram_base(trace), meta.page_size,
                              g["tsc-hz"])
    error = {}
    if "postcopy-vcpu-blocktime" in qemu:
        error["qemu"] = _error(qemu["postcopy-vcpu-blocktime"], qemu.get("postcopy-blocktime", 0), g)
    for name, r in engines.items():
        if name == "bounds":
            for side in ("lower", "upper"):
                b = r[side]
                error[f"bounds-{side}"] = _error([v / 1e6 for v in b["vcpu-blocktime-ns"]], b["blocktime-ns"] / 1e6, g)
        else:
            error[name] = _error([v / 1e6 for v in r["vcpu-blocktime-ns"]] if "vcpu-blocktime-ns" in r
                                 else r["postcopy-vcpu-blocktime"],
                                 r.get("blocktime-ns", r["postcopy-blocktime"] * 1e6) / 1e6, g)
    # QEMU 10.1+ answers latencies too: held against the modern engine's replay of its own trace.
    latency = {k: {"qemu": qemu[k], "modern": engines["modern"].get(k)}
               for k in QEMU_KEYS[2:] if k in qemu and "modern" in engines}
    return {
        "qemu-version": raw["qemu-version"],
        "qemu-vs-modern-latency": latency or None,
        "config": raw["config"],
        "qemu": qemu,
        "engines": engines,
        "guest": g,
        "error": error,
        "faults": faults,
        "trace": {"file": trace, "problem": trace_problem,
                  "migrations": len(found), "meta": found[-1][0].extra.get("qemu") if found else None},
        "command-lines": raw["command-lines"],
    }
