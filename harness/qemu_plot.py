"""One picture of a ``qemu`` run: per vCPU, the stalls the guest lived (its TSC) above the faults QEMU's
trace saw (begin to placement), on one time axis aligned by the faults matched to stalls."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness.plots import command_line  # noqa: E402


def plot_guest_vs_trace(rep: dict, path: str, argv: Sequence[str] | None, title: str) -> str | None:
    """Write the picture to ``path``; None when there is no clock alignment (no fault matched)."""
    g, f = rep["guest"], rep.get("faults") or {}
    offset = f.get("trace-minus-guest-clock-ns")
    if offset is None:
        return None
    hz = g["tsc-hz"]
    smp = rep["config"]["smp"]
    stalls = [(s["vcpu"], s["start-tsc"] / hz * 1e9 + offset, s["ms"]) for s in g["list"]]
    traced = [(t["vcpu"], t["t-ns"], t["ms"]) for t in f["traced"] if t["ms"] is not None]
    t0 = min([t for _, t, _ in stalls] + [t for _, t, _ in traced])
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.9 * smp))
    for rows, color, dy, label in ((stalls, "#d62728", 0.18, "guest stall (its TSC)"),
                                   (traced, "#1f77b4", -0.18, "QEMU trace: begin to placement")):
        for k, (v, t, ms) in enumerate(rows):
            ax.broken_barh([((t - t0) / 1e6, ms)], (v + dy - 0.15, 0.3), color=color,
                           label=label if k == 0 else None)
    ax.set_yticks(range(smp), [f"vCPU {v}" for v in range(smp)])
    ax.set_xlabel("ms (the trace's clock; the guest's TSC aligned by the matched faults)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.text(0.01, 0.01, command_line(argv), fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
