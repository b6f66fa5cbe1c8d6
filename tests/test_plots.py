"""The pictures read at a glance: one number per word, integer vCPU ticks, legends off the data,
a colour per engine, every engine visible, bars clear of the frame.

Figures are inspected as matplotlib objects (``plots._finish`` is wrapped to keep them), and the one
live run checks that ``placements.png``'s "requested", the summary and ``faults.pages-requested`` agree.
"""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import numpy as np
import pytest

from harness import plots
from harness.cli import main
from harness.timeline import build_timeline
from postcopy_core.blocktime import ALL_ENGINE_NAMES
from postcopy_core.blocktime.trace import read_trace_columns
from tests.conftest import requires_uffd


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open (closed at the end)."""
    kept = []
    real = plots._finish

    def keep(fig, path, argv):
        kept.append(fig)
        fig.canvas.draw()  # lay out, so positions are final
        return path

    monkeypatch.setattr(plots, "_finish", keep)
    yield kept
    for fig in kept:
        plots.plt.close(fig)
    assert real is not None


def sweep_rows(counts=(1, 4, 16, 64, 256), groups=("sequential", "random")) -> list[dict]:
    rows = []
    for g, wl in enumerate(groups):
        for n in counts:
            bt = 500 // n + 10 * g
            rows.append({"status": "completed", "backing": "shmem", "workload": wl, "wake-policy": "waiters",
                         "vcpus": n, "faults-per-s": 20_000 + 100 * n, "p50-us": 20.0 * n, "p99-us": 90.0 * n,
                         # modern = exact, as in real sweeps: both must stay visible
                         "blocktime-seed-ms": bt, "blocktime-modern-ms": bt + 4, "blocktime-exact-ms": bt + 4,
                         "blocktime-truth-ms": bt + 200})
    return rows


@pytest.mark.parametrize("counts", [(1, 2), (1, 2, 3), (1, 4, 16, 64, 256, 1024, 4096)])
def test_loadtest_vcpu_ticks_are_the_swept_integers(figures, tmp_path, counts):
    plots.plot_loadtest(sweep_rows(counts), ALL_ENGINE_NAMES, str(tmp_path / "lt.png"), ["t"])
    data_axes = figures[0].axes[:3]
    for ax in data_axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(n) for n in counts]
        assert ax.get_xscale() == ("log" if counts[-1] >= 4 * counts[0] else "linear")
        assert not len(ax.xaxis.get_minor_locator().tick_values(*ax.get_xlim()))  # no unlabelled minor ticks


def test_loadtest_legends_are_outside_the_data(figures, tmp_path):
    plots.plot_loadtest(sweep_rows(), ALL_ENGINE_NAMES, str(tmp_path / "lt.png"), ["t"])
    fig = figures[0]
    data_axes, legend_axes = fig.axes[:3], fig.axes[3:]
    assert all(ax.get_legend() is None for ax in data_axes)
    renderer = fig.canvas.get_renderer()
    for ax, lax in zip(data_axes, legend_axes, strict=True):
        box = lax.get_legend().get_window_extent(renderer)
        assert box.y1 < ax.get_window_extent(renderer).y0  # below the panel, not over its data
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1  # and inside the picture


def test_loadtest_every_engine_has_its_colour_and_stays_visible(figures, tmp_path):
    plots.plot_loadtest(sweep_rows(), ALL_ENGINE_NAMES, str(tmp_path / "lt.png"), ["t"])
    fig = figures[0]
    legend = fig.axes[5].get_legend()
    by_label = dict(zip([t.get_text().replace("\n", " ") for t in legend.get_texts()], legend.legend_handles,
                        strict=True))
    engines = {e: next(h for label, h in by_label.items() if label.split()[0] == e) for e in ALL_ENGINE_NAMES}
    colours = {e: mcolors.to_hex(h.get_color()) for e, h in engines.items()}
    assert len(set(colours.values())) == len(ALL_ENGINE_NAMES)  # one colour per engine
    groups = {mcolors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert not groups & set(colours.values())  # and no group wears an engine's colour
    # modern and exact have the same values: modern is a wide ring, exact a small dot inside it
    m, x = engines["modern"], engines["exact"]
    assert m.get_markersize() > 1.5 * x.get_markersize() and m.get_markerfacecolor() == "none"
    assert any("the same values as exact" in label for label in by_label)
    # the data lines themselves carry those marks
    drawn = {mcolors.to_hex(line.get_color()): line for line in fig.axes[2].get_lines()}
    assert drawn[colours["modern"]].get_markersize() > drawn[colours["exact"]].get_markersize()


@pytest.mark.parametrize("tallest", [3, 40, 5000])
def test_latency_bars_stay_clear_of_the_frame(figures, tmp_path, tallest):
    dist = [0] * 24
    dist[5], dist[6] = tallest, max(tallest // 2, 1)
    engines = {"modern": {"postcopy-latency-dist": dist}, "exact": {"postcopy-latency-dist": list(dist)}}
    plots.plot_latency_histogram(engines, str(tmp_path / "l.png"), ["t"], "t")
    ax = figures[0].axes[0]
    top = max(p.get_height() for p in ax.patches)
    assert top == tallest
    lo, hi = ax.get_ylim()
    to_axes = ax.transScale.transform  # in the axis's own scale (symlog for spread counts)
    assert to_axes((0, hi))[1] - to_axes((0, top))[1] > 0.1 * (to_axes((0, hi))[1] - to_axes((0, lo))[1])
    ticks = ax.get_yticks()
    if ax.get_yscale() == "linear":
        assert np.allclose(ticks, np.round(ticks))  # counts: integer ticks


@pytest.mark.kernel
@requires_uffd
def test_requested_is_one_number_in_summary_json_and_placements(tmp_path, clean_machine, capsys):
    out, js, trace = tmp_path / "r", tmp_path / "r.json", tmp_path / "t.trace"
    assert main(["run", "--vcpus", "3", "--ram", "8M", "--link", "1gbit,1ms", "--report", str(out), "--json", str(js),
                 "--trace", str(trace), "--quiet"]) == 0
    rep = json.loads(js.read_text())
    requested = rep["pages"]["requested"]
    assert requested == rep["faults"]["pages-requested"] > 0
    meta, cols = read_trace_columns(str(trace))
    groups = plots.placement_groups(build_timeline(meta, cols))
    assert groups["requested"].size == requested  # the number placements.png shows for "requested"
    assert groups["requested"].size + groups["sent ahead"].size == groups["all"].size == rep["pages"]["placed"]
    assert groups["zero"].size == rep["pages"]["zero"]
    summary = (out / "summary.txt").read_text()
    row = next(line for line in summary.splitlines() if "requested" in line)
    assert f" / {requested:,} / " in row
