"""The report's PNG plots (matplotlib, headless Agg): stall timeline, latency histogram, placements,
and the load-test curves.  Every figure has a title, axis units and, at its foot, the command that
made it.  Small files (a modest size and dpi): the README commits some of them.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, ever: reports are written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from harness.timeline import PLACE_KINDS, Timeline  # noqa: E402

DPI = 80
MAX_ROWS = 32  # vCPU rows drawn in a timeline; the rest are left out (said in the figure)
MAX_SPANS = 4000  # all-stalled spans shaded; beyond that, the longest ones
COLORS = {"truth": "#1f77b4", "exact": "#ff7f0e", "seed": "#d62728", "modern": "#2ca02c"}
PLACE_COLORS = {"requested": "#d62728", "streamed": "#1f77b4", "zero": "#7f7f7f"}
LANE_LABEL = {
    "truth": "truth: the vCPU's own clock (access began -> returned)",
    "exact": "exact: handler read the fault -> page placed",
    "seed": "seed: what the 2018 accounting counted (ms)",
}


def command_line(argv: Sequence[str] | None) -> str:
    """The command that made a figure, shortened to fit its foot."""
    text = shlex.join(argv) if argv else "(no command recorded)"
    return text if len(text) <= 140 else text[:137] + "..."


def _finish(fig, path: str, argv: Sequence[str] | None) -> str:
    fig.text(0.01, 0.005, f"made by: {command_line(argv)}", fontsize=7, color="#555555", ha="left", va="bottom")
    from postcopy_core.outfile import open_output

    try:
        with open_output(path, "wb") as f:  # no symbolic link followed
            fig.savefig(f, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _bars(ax, row: float, height: float, start_ns: np.ndarray, end_ns: np.ndarray, color: str, label: str | None):
    if start_ns.size == 0:
        return
    xs = [(s / 1e6, max((e - s) / 1e6, 0.0)) for s, e in zip(start_ns.tolist(), end_ns.tolist(), strict=True)]
    # an edge of the bar's own colour keeps a stall of a few microseconds visible as a hairline
    # (thinner with many bars, or the hairlines would cover the gaps between them)
    ax.broken_barh(xs, (row - height / 2, height), facecolors=color, edgecolors=color,
                   linewidth=0.6 if len(xs) < 500 else 0.15, label=label)


def plot_timeline(tl: Timeline, engines: dict, path: str, argv: Sequence[str] | None, title: str) -> str:
    """Per-vCPU stall timeline (one row per vCPU, one band per engine) under a row of the spans when
    every vCPU was stalled, which are also shaded across the rows."""
    n = tl.meta.vcpus
    rows = min(n, MAX_ROWS)
    height_in = 2.2 + 0.5 * rows
    fig, ax = plt.subplots(figsize=(10, height_in))
    lanes = [name for name in ("truth", "exact", "seed") if name in tl.lanes]
    height = 0.8 / max(len(lanes), 1)
    for k, name in enumerate(lanes):
        lane = tl.lanes[name]
        first = next((u for u in range(rows) if (lane.vcpu == u).any()), 0)
        for v in range(rows):
            sel = lane.vcpu == v
            _bars(ax, v + 1 - 0.4 + height * (k + 0.5), height * 0.9, lane.start[sel], lane.end[sel], COLORS[name],
                  LANE_LABEL[name] if v == first else None)
    spans = tl.all_stalled
    if len(spans) > MAX_SPANS:
        spans = sorted(spans, key=lambda s: s[0] - s[1])[:MAX_SPANS]
    for a, b in spans:
        ax.axvspan(a / 1e6, b / 1e6, color="#9467bd", alpha=0.18, lw=0)
    s = np.asarray([a for a, _ in spans], np.int64)
    e = np.asarray([b for _, b in spans], np.int64)
    measured = sum(b - a for a, b in tl.all_stalled) / 1e6
    _bars(ax, 0, 0.6, s, e, "#9467bd", f"all {n} vCPUs stalled at once ({tl.all_stalled_by}): {measured:,.1f} ms")
    ax.set_yticks(range(rows + 1))
    ax.set_yticklabels(["all stalled", *(f"vCPU {v}" for v in range(rows))])
    ax.set_ylim(rows + 0.5, -0.5)
    ax.set_xlim(0, max(tl.end_ns / 1e6, 1e-3) * 1.02)
    ax.set_xlabel("time since postcopy start (ms)")
    totals = ", ".join(f"{e} {r['postcopy-blocktime']}" for e, r in engines.items() if "postcopy-blocktime" in r)
    ax.set_title(f"{title}\nwhen each vCPU was stalled; postcopy-blocktime (ms) by engine: {totals}", fontsize=10)
    if rows < n:
        ax.text(1.0, 1.0, f"first {rows} of {n} vCPUs", transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    legend_in = 0.15 + 0.2 * ((len(handles) + 1) // 2)
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.18 / height_in), ncol=2, fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, (legend_in + 0.2) / height_in, 1, 1))
    return _finish(fig, path, argv)


def plot_latency_histogram(engines: dict, path: str, argv: Sequence[str] | None, title: str) -> str:
    """Fault latency on QEMU's 24 log2 buckets (bucket N = [2^N, 2^(N+1)) us), one series per engine."""
    series = {e: r["postcopy-latency-dist"] for e, r in engines.items() if r.get("postcopy-latency-dist")}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(series), 1)
    x = np.arange(24)
    for k, (name, dist) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (k + 0.5), dist, width, label=name, color=COLORS.get(name))
    ax.set_xticks(x)
    ax.set_xticklabels([f"2^{i}" for i in x], fontsize=7)
    ax.set_xlabel("fault latency bucket (us): bucket N holds [2^N, 2^(N+1)) us")
    ax.set_ylabel("faults (count)")
    if max((max(d) for d in series.values()), default=0) >= 20:  # a log scale only where counts spread
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylabel("faults (count, log scale)")
    ax.set_title(f"{title}\npostcopy-latency-dist of each engine", fontsize=10)
    if series:
        ax.legend(fontsize=8, title="seed keeps no histogram" if "seed" in engines else None, title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no engine gives a latency histogram here", transform=ax.transAxes, ha="center")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


def plot_placements(tl: Timeline, path: str, argv: Sequence[str] | None, title: str) -> str:
    """Pages placed over time, cumulative, by how they came."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    labels = {
        "requested": "requested (a fault on the page came first; derived from the events)",
        "streamed": "streamed (placed before anyone faulted on it)",
        "zero": "zero (placed as a zero page)",
    }
    for k, kind in enumerate(PLACE_KINDS):
        t = np.sort(tl.place_t[tl.place_kind == k])
        if t.size:
            ax.step(np.r_[0, t / 1e6], np.arange(t.size + 1), where="post", label=f"{labels[kind]}: {t.size:,}",
                    color=PLACE_COLORS[kind])
    ax.set_xlabel("time since postcopy start (ms)")
    ax.set_ylabel("pages placed (cumulative count)")
    ax.set_title(f"{title}\npages placed over time, by how they came", fontsize=10)
    if tl.place_t.size:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


# Google's published figures for one userfaultfd shared by every vCPU thread, as issue #12 quotes
# them (about 150k pages/s at 1 vCPU, 36k at 256): drawn for context, never measured here.
PUBLISHED_SHARED_UFFD = ((1, 150_000), (256, 36_000))
PUBLISHED_LABEL = "one uffd shared by all vCPUs:\nGoogle's published figures\n(quoted in #12, not measured here)"


def plot_loadtest(rows: list[dict], engines: Sequence[str], path: str, argv: Sequence[str] | None,
                  reference: bool = False) -> str:
    """faults/s, p50/p99 latency and blocktime per engine against the vCPU count, one line per group;
    with ``reference`` the C reference's faults/s and p50 per group (dotted) and the published
    one-shared-uffd figures."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "completed":
            groups.setdefault(f"{r['backing']} {r['workload']} wake={r['wake-policy']}", []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5) if reference else (12, 4.2))
    styles = ("-", "--", ":", "-.")
    for g, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["vcpus"])
        v = [r["vcpus"] for r in rs]
        axes[0].plot(v, [r["faults-per-s"] for r in rs], "o-", label=label)
        line = axes[1].plot(v, [r["p50-us"] for r in rs], "o-", label=f"{label} p50")[0]
        axes[1].plot(v, [r["p99-us"] for r in rs], "s--", color=line.get_color(), label=f"{label} p99")
        ref = [r for r in rs if r.get("ref-faults-per-s")]
        if reference and ref:
            rv = [r["vcpus"] for r in ref]
            axes[0].plot(rv, [r["ref-faults-per-s"] for r in ref], "^:", color=line.get_color(),
                         label=f"C reference uffd_ref -m mp ({r['backing']} {r['workload']})")
            axes[1].plot(rv, [r["ref-p50-us"] for r in ref], "^:", color=line.get_color(),
                         label=f"C reference p50 ({r['backing']} {r['workload']})")
        for e in engines:
            ys = [r.get(f"blocktime-{e}-ms") for r in rs]
            if any(y is not None for y in ys):
                axes[2].plot(v, [np.nan if y is None else y for y in ys], marker="o", ls=styles[g % len(styles)],
                             color=COLORS.get(e), label=f"{label} {e}")
    if reference:
        px, py = zip(*PUBLISHED_SHARED_UFFD, strict=True)
        axes[0].plot(px, py, "D--", color="#7f7f7f", label=PUBLISHED_LABEL)
        for x, y in PUBLISHED_SHARED_UFFD:
            axes[0].annotate(f"{y / 1000:.0f}k (published)", (x, y), fontsize=6, color="#7f7f7f",
                             textcoords="offset points", xytext=(4, 4))
    for ax, (ylabel, name) in zip(axes, (("faults resolved per second", "faults/s"),
                                         ("fault latency (us)", "p50 (solid) / p99 (dashed)"),
                                         ("postcopy-blocktime (ms)", "blocktime: colour = engine, line = group")),
                                        strict=True):
        ax.set_xlabel("vCPUs (count)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        if len({r["vcpus"] for r in rows}) > 2 and min(r["vcpus"] for r in rows) > 0:
            ax.set_xscale("log", base=2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6 if reference else 7)
    lat = [r[k] for r in rows for k in ("p50-us", "p99-us", "ref-p50-us") if r.get(k)]
    if lat and min(lat) > 0 and max(lat) / min(lat) > 100:  # latency over orders of magnitude: log axis
        axes[1].set_yscale("log")
    fig.suptitle("loadtest: against the vCPU count", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


def plot_series(series: dict[str, tuple[np.ndarray, np.ndarray]], path: str, argv: Sequence[str] | None,
                title: str, xlabel: str, ylabel: str, marks: list[tuple[float, str]] = ()) -> str:
    """Step lines (x, y) by name, with optional vertical marks (x, label): a demo's running totals."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for name, (x, y) in series.items():
        ax.step(x, y, where="post", label=name, color=COLORS.get(name.split()[0]))
    for x, label in marks:
        ax.axvline(x, color="#9467bd", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=7, color="#9467bd")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


def plot_bars(groups: dict[str, dict[str, float]], path: str, argv: Sequence[str] | None, title: str) -> str:
    """One panel per measure (its own unit in its name), one bar per group: a demo's comparison."""
    measures = list(next(iter(groups.values())))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.6))
    for ax, m in zip(np.atleast_1d(axes), measures, strict=True):
        names = list(groups)
        vals = [groups[g][m] for g in names]
        ax.bar(names, vals, color=["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][: len(names)])
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel(m)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _finish(fig, path, argv)
