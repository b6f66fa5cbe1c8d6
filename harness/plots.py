"""The report's PNG plots (matplotlib, headless Agg): stall timeline, latency histogram, placements,
and the load-test curves.  Every figure has a title, axis units and, at its foot, the command that
made it.  Small files (a modest size and dpi): the README and docs/pictures.md commit some of them.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, ever: reports are written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness.timeline import PLACE_KINDS, Timeline  # noqa: E402

DPI = 80
MAX_ROWS = 32  # vCPU rows drawn in a timeline; the rest are left out (said in the figure)
MAX_SPANS = 4000  # all-stalled spans shaded; beyond that, the longest ones
COLORS = {"truth": "#1f77b4", "exact": "#ff7f0e", "seed": "#d62728", "modern": "#2ca02c"}
PLACE_COLORS = {"requested": "#d62728", "sent ahead": "#1f77b4", "zero": "#555555", "all": "#c7c7c7"}
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


def _above(ax, top: float, room: float) -> float:
    """The axis limit that leaves ``room`` (a share of the axis, in its own scale: linear, log,
    symlog) above ``top``."""
    scale = ax.yaxis.get_transform()  # one dimension: values in, scaled values out
    lo, hi = np.ravel(scale.transform(np.array([[0.0], [float(top)]])))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # a log axis has no 0
        return float(top) * 2
    return float(np.ravel(scale.inverted().transform(np.array([[lo + (hi - lo) / (1 - room)]])))[0])


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
    tallest = max((max(d) for d in series.values()), default=0)
    if tallest >= 20:  # a log scale only where counts spread
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylabel("faults (count, log scale)")
    if tallest:
        ax.set_ylim(0, _above(ax, tallest, 0.18))  # the tallest bar clear of the frame and the legend
    if tallest and ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # fault counts
    ax.set_title(f"{title}\npostcopy-latency-dist of each engine", fontsize=10)
    if series:
        ax.legend(fontsize=8, title="seed keeps no histogram" if "seed" in engines else None, title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no engine gives a latency histogram here", transform=ax.transAxes, ha="center")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


def placement_groups(tl: Timeline) -> dict[str, np.ndarray]:
    """The placements' times by group: ``requested`` (the report's ``pages.requested``, the same as
    ``faults.pages-requested``), ``sent ahead`` (the rest), ``zero`` (zero pages of either) and ``all``."""
    kinds = np.asarray(PLACE_KINDS)[tl.place_kind] if tl.place_kind.size else np.zeros(0, str)
    requested = np.char.startswith(kinds, "requested") if kinds.size else np.zeros(0, bool)
    zero = np.char.endswith(kinds, "zero") if kinds.size else np.zeros(0, bool)
    # "all" first: drawn underneath (wide, light), so a group that is every page still shows on it
    return {"all": tl.place_t, "requested": tl.place_t[requested], "sent ahead": tl.place_t[~requested],
            "zero": tl.place_t[zero]}


def plot_placements(tl: Timeline, path: str, argv: Sequence[str] | None, title: str) -> str:
    """Pages placed over time, cumulative: requested vs sent ahead (they add up to all), zero pages."""
    fig, ax = plt.subplots(figsize=(10, 4.6))
    labels = {
        "all": "all pages placed",
        "requested": "requested (a fault came first; in a run = faults.pages-requested)",
        "sent ahead": "sent ahead (placed before any fault on it)",
        "zero": "zero pages (requested or sent ahead)",
    }
    styles = {"all": "-", "requested": "-", "sent ahead": "-", "zero": ":"}
    for name, t in placement_groups(tl).items():
        t = np.sort(t)
        if t.size:
            ax.step(np.r_[0, t / 1e6], np.arange(t.size + 1), where="post", label=f"{labels[name]}: {t.size:,}",
                    color=PLACE_COLORS[name], ls=styles[name], lw=4.0 if name == "all" else 1.6)
    ax.set_xlabel("time since postcopy start (ms)")
    ax.set_ylabel("pages placed (cumulative count)")
    ax.set_title(f"{title}\npages placed over time, by how they came", fontsize=10)
    ax.set_ylim(0, max(tl.place_t.size, 1) * 1.05)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # page counts
    if tl.place_t.size:  # below the axes: the curves fill the upper left corner of a sweep
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(fig, path, argv)


# Google's published figures for one userfaultfd shared by every vCPU thread, as issue #12 quotes
# them (about 150k pages/s at 1 vCPU, 36k at 256): drawn for context, never measured here.
PUBLISHED_SHARED_UFFD = ((1, 150_000), (256, 36_000))
PUBLISHED_LABEL = "one uffd shared by all vCPUs:\nGoogle's published figures\n(quoted in #12, not measured here)"


# the load test's groups (backing, workload, wake policy) get colours no engine uses, so a colour
# names one thing in the whole figure: an engine in the blocktime panel, a group elsewhere
GROUP_COLORS = ("#000000", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
GROUP_STYLES = ("-", "--", ":", "-.")
# each engine's (marker, size, line width), so two engines with the same values are both seen, never
# one hidden under the other: drawn widest first, a thin line on a wide one, a dot inside a ring
ENGINE_MARKS = {"truth": ("D", 9, 2.0), "modern": ("o", 11, 3.2), "seed": ("v", 8, 1.8), "exact": ("o", 4.5, 1.0)}


def _engine_style(engine: str) -> dict:
    marker, size, width = ENGINE_MARKS.get(engine, ("o", 6, 1.5))
    colour = COLORS.get(engine)
    return {"color": colour, "marker": marker, "ms": size, "lw": width, "mew": 1.5,
            "mfc": "none" if size >= 8 else colour}  # big marks are rings: what is under them shows


def _vcpu_axis(ax, counts: list[int]) -> None:
    """The swept vCPU counts as the ticks, as integers; a log axis where the sweep spans 4x or more."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    ticks = sorted(set(counts))
    if ticks and ticks[0] > 0 and ticks[-1] >= 4 * ticks[0]:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("vCPUs (count)")


def _legend_below(lax, handles: list, labels: list[str]) -> None:
    """A panel's legend in the empty axes ``lax`` under it: outside the data, as wide as the panel."""
    import textwrap

    lax.axis("off")
    if handles:
        ncol = 1 if len(handles) <= 8 else 2
        lax.legend(handles, [textwrap.fill(t, 70 // ncol) for t in labels], loc="upper center", fontsize=7,
                   frameon=False, ncol=ncol)


def _blocktime_legend(engines: Sequence[str], shown: dict[str, list], groups: list[str], add) -> None:
    """The blocktime panel's legend: each engine drawn (saying which have the same values), then the
    line style of each group when there are several."""
    from matplotlib.lines import Line2D

    for e in [e for e in engines if e in shown]:
        twins = [o for o, other in shown.items() if o != e and other == shown[e]]
        add(Line2D([], [], **_engine_style(e)), e + (f" (the same values as {', '.join(twins)})" if twins else ""))
    if len(groups) > 1:
        for g, label in enumerate(groups):
            add(Line2D([], [], color="#555555", ls=GROUP_STYLES[g % len(GROUP_STYLES)]), f"line: {label}")


def _plot_published(ax, add) -> None:
    """The published one-shared-uffd figures (grey, drawn, not measured here), each annotated."""
    px, py = zip(*PUBLISHED_SHARED_UFFD, strict=True)
    add(ax.plot(px, py, "D--", color="#7f7f7f")[0], PUBLISHED_LABEL.replace("\n", " "))
    for x, y in PUBLISHED_SHARED_UFFD:
        ax.annotate(f"{y / 1000:.0f}k (published)", (x, y), fontsize=6, color="#7f7f7f",
                    textcoords="offset points", xytext=(4, 4))


def plot_loadtest(rows: list[dict], engines: Sequence[str], path: str, argv: Sequence[str] | None,
                  reference: bool = False) -> str:
    """faults/s, p50/p99 latency and blocktime per engine against the vCPU count, one line per group;
    with ``reference`` the C reference's faults/s and p50 per group (dotted) and the published
    one-shared-uffd figures.  Integer vCPU ticks, legends under the panels, a colour per engine."""

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "completed":
            groups.setdefault(f"{r['backing']} {r['workload']} wake={r['wake-policy']}", []).append(r)
    entries = max([len(groups) * (3 if reference else 2) + (3 if reference else 0), len(engines) + len(groups), 1])
    legend_in = 0.35 + 0.17 * min(entries, 9) + (0.25 if reference else 0)  # wrapped lines make some taller
    fig = plt.figure(figsize=(15, 4.4 + legend_in))
    grid = fig.add_gridspec(2, 3, height_ratios=(4.4 - 0.9, legend_in), left=0.06, right=0.98,
                            top=1 - 0.8 / (4.4 + legend_in), bottom=0.2 / (4.4 + legend_in), wspace=0.25, hspace=0.3)
    axes = [fig.add_subplot(grid[0, k]) for k in range(3)]
    leg: list[tuple[list, list[str]]] = [([], []) for _ in axes]
    lat = [r[k] for r in rows for k in ("p50-us", "p99-us", "ref-p50-us") if r.get(k)]
    if lat and min(lat) > 0 and max(lat) / min(lat) > 100:  # latency over orders of magnitude: log axis
        axes[1].set_yscale("log")

    def add(k: int, handle, label: str) -> None:
        leg[k][0].append(handle)
        leg[k][1].append(label)

    shown: dict[str, list] = {}  # engine -> its values per group, to say when two are the same
    for g, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["vcpus"])
        v = [r["vcpus"] for r in rs]
        colour, style = GROUP_COLORS[g % len(GROUP_COLORS)], GROUP_STYLES[g % len(GROUP_STYLES)]
        add(0, axes[0].plot(v, [r["faults-per-s"] for r in rs], "o-", color=colour)[0], label)
        add(1, axes[1].plot(v, [r["p50-us"] for r in rs], "o-", color=colour)[0], f"{label} p50")
        add(1, axes[1].plot(v, [r["p99-us"] for r in rs], "s--", color=colour)[0], f"{label} p99")
        ref = [r for r in rs if r.get("ref-faults-per-s")]
        if reference and ref:
            rv = [r["vcpus"] for r in ref]
            add(0, axes[0].plot(rv, [r["ref-faults-per-s"] for r in ref], "^:", color=colour)[0],
                f"C reference uffd_ref -m mp ({label})")
            add(1, axes[1].plot(rv, [r["ref-p50-us"] for r in ref], "^:", color=colour)[0],
                f"C reference p50 ({label})")
        for e in sorted(engines, key=lambda e: -ENGINE_MARKS.get(e, ("o", 6, 1.5))[2]):
            ys = [r.get(f"blocktime-{e}-ms") for r in rs]
            if any(y is not None for y in ys):
                axes[2].plot(v, [np.nan if y is None else y for y in ys], ls=style, **_engine_style(e))
                shown.setdefault(e, []).append(ys)
    _blocktime_legend(engines, shown, list(groups), lambda handle, label: add(2, handle, label))
    if reference:
        _plot_published(axes[0], lambda handle, label: add(0, handle, label))
    counts = [r["vcpus"] for r in rows] + ([x for x, _ in PUBLISHED_SHARED_UFFD] if reference else [])
    group_words = "" if len(groups) < 2 else ", line = group"
    for k, (ax, (ylabel, name)) in enumerate(zip(axes, (
            ("faults resolved per second", "faults/s"),
            ("fault latency (us)", "p50 (solid) / p99 (dashed)"),
            ("postcopy-blocktime (ms)", f"blocktime: colour and mark = engine{group_words}")), strict=True)):
        _vcpu_axis(ax, counts if k == 0 else [r["vcpus"] for r in rows])
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.margins(y=0.08)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        _legend_below(fig.add_subplot(grid[1, k]), *leg[k])
    bts = [r[f"blocktime-{e}-ms"] for r in rows for e in engines if r.get(f"blocktime-{e}-ms") is not None]
    if bts and max(bts) > 100 * max(min([b for b in bts if b > 0], default=1), 1):  # orders of magnitude
        axes[2].set_yscale("symlog", linthresh=1)  # symlog: a blocktime of 0 still shows
        axes[2].set_ylim(0, _above(axes[2], max(bts), 0.12))  # the highest point clear of the frame
        axes[2].set_ylabel("postcopy-blocktime (ms, log scale)")
    fig.suptitle("loadtest: against the vCPU count", fontsize=11)
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
        ax.set_ylim(0, max(max(vals), 1e-9) * 1.18)  # the tallest bar and its number clear of the frame
        ax.set_title(m, fontsize=9)
        ax.set_ylabel(m)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _finish(fig, path, argv)
