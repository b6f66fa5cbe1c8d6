"""``--report DIR``: one folder with everything a run, a replay or a load test has to show.

``report.json`` (the same document as ``--json``), ``summary.txt`` (the table the command prints,
without colours), PNG plots and, where there are events, ``trace.json`` for ui.perfetto.dev.  Any
command that has a report and (optionally) its events calls :func:`write_report_dir`; a load test
calls :func:`write_loadtest_dir`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

from rich.console import Console

from postcopy_core.blocktime import EventColumns, TraceMeta

FILES = ("report.json", "summary.txt", "timeline.png", "latency.png", "placements.png", "trace.json")


def wrote_line(folder: str, written: Sequence[str] | None = None) -> str:
    """The one line a command prints after ``--report``: where, and which files."""
    if written is None:
        written = [os.path.join(folder, n) for n in (*FILES, "loadtest.png") if os.path.exists(os.path.join(folder, n))]
    names = ", ".join(os.path.basename(p) for p in written)
    return f"report written to {os.path.abspath(folder)}: {names}"


def report_dir_problem(path: str | None) -> str | None:
    """Why ``path`` cannot become the report folder (None if it can); nothing is created."""
    from postcopy_core.outfile import pseudo_fs

    if path is None:
        return None
    if os.path.islink(path):
        return "is a symbolic link (refused: reports are never written through one)"
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a folder"
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is not a folder"
    kind = pseudo_fs(probe)
    if kind:
        return f"is on {kind}, a kernel filesystem, not a place for reports"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"permission denied in {probe}"
    from postcopy_core.outfile import output_problem

    for name in (*FILES, "loadtest.png"):  # a folder written before: its files must still take a write
        inside = os.path.join(path, name)
        problem = output_problem(inside) if os.path.lexists(inside) else None
        if problem:
            return f"{name} {problem}"
    return None


def _text(render: Callable[[Console], None]) -> str:
    buf = io.StringIO()
    render(Console(file=buf, width=140, color_system=None, force_terminal=False, soft_wrap=False))
    return buf.getvalue()


def _write(folder: str, name: str, text: str) -> str:
    from postcopy_core.outfile import open_output

    path = os.path.join(folder, name)
    with open_output(path) as f:  # no symbolic link followed
        f.write(text)
    return path


def write_report_dir(folder: str, rep: dict, summary: Callable[[Console], None],
                     material: tuple[TraceMeta, EventColumns] | None = None, title: str | None = None,
                     argv: Sequence[str] | None = None) -> list[str]:
    """Write ``rep`` and, from ``material`` (metadata, events with any stall intervals), the plots and
    the Perfetto trace into ``folder`` (created).  Returns the paths written.  Raises OSError."""
    import json

    os.makedirs(folder, exist_ok=True)
    argv = rep.get("argv") if argv is None else argv
    written = [_write(folder, "report.json", json.dumps(rep, indent=2) + "\n"),
               _write(folder, "summary.txt", _text(summary))]
    engines = rep.get("engines") or {}
    if material is None:
        return written
    from harness import plots
    from harness.perfetto import write_trace_json
    from harness.timeline import build_timeline

    meta, cols = material
    title = title or f"{meta.vcpus} vCPUs, {len(cols):,} events ({meta.source})"
    tl = build_timeline(meta, cols)
    written.append(plots.plot_timeline(tl, engines, os.path.join(folder, "timeline.png"), argv, title))
    written.append(plots.plot_latency_histogram(engines, os.path.join(folder, "latency.png"), argv, title))
    written.append(plots.plot_placements(tl, os.path.join(folder, "placements.png"), argv, title))
    written.append(write_trace_json(os.path.join(folder, "trace.json"), tl, engines, title, argv))
    return written


def write_loadtest_dir(folder: str, doc: dict, rows: list[dict], summary: Callable[[Console], None],
                       reference: bool = False) -> list[str]:
    """A load test's folder: ``report.json`` (its ``--json`` document), ``summary.txt`` and
    ``loadtest.png`` (faults/s, p50/p99 and blocktime against the vCPU count; with ``reference``
    the C reference's curves and the published one-shared-uffd figures too)."""
    import json

    from harness import plots
    from postcopy_core.blocktime import ALL_ENGINE_NAMES

    os.makedirs(folder, exist_ok=True)
    return [_write(folder, "report.json", json.dumps(doc, indent=1) + "\n"),
            _write(folder, "summary.txt", _text(summary)),
            plots.plot_loadtest(rows, ALL_ENGINE_NAMES, os.path.join(folder, "loadtest.png"), doc.get("argv"),
                                reference=reference)]


def write_run_report(folder: str, rep: dict, raw: dict | None) -> None:
    """The folder of one run (``run --report``); a write error becomes ``rep["report-error"]``."""
    from harness.report import print_summary

    try:
        write_report_dir(folder, rep, lambda console: print_summary(rep, console),
                         raw.get("material") if raw else None, title=run_title(rep))
    except OSError as e:
        rep["report-error"] = f"cannot write --report {folder}: {e.strerror or e}"


def run_title(rep: dict) -> str:
    """A run's one-line description for plot titles."""
    cfg = rep.get("config", {})
    return (f"run: {rep.get('vcpus')} vCPUs, {cfg.get('ram', 0) / 2**20:g} MiB {cfg.get('backing')}, "
            f"workload {cfg.get('workload')}, link {rep.get('link')}")
