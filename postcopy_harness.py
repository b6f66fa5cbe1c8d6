"""The Python API of postcopy-harness: run a migration, replay traces, check blocktime.

A thin, stable facade over the packages that do the work (``harness`` orchestrates runs,
``postcopy_core.blocktime`` holds the engines and the trace formats).  Those packages may move
things around; the names here stay.  The ``postcopy-harness`` command line and the pytest plugin
(``harness.pytest_plugin``) call these same functions.

>>> import postcopy_harness as ph
>>> report = ph.run(vcpus=2, ram="8M", workload="shared", background=False)   # doctest: +SKIP
>>> ph.assert_blocktime(report, "seed", expected="exact", tolerance_ms=2)      # doctest: +SKIP
>>> engines = ph.replay("run.trace", engines=["seed", "modern"])               # doctest: +SKIP

Blocktime results everywhere are dicts of QEMU ``query-migrate`` fields per engine, e.g.
``{"seed": {"postcopy-blocktime": 12, "postcopy-vcpu-blocktime": [7, 12], ...}, "modern": {...}}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields

from harness.config import ConfigError
from postcopy_core import blocktime as _bt
from postcopy_core.blocktime import BlocktimeError, Engine, Event, EventColumns, Fault, Placed, TraceMeta
from postcopy_core.blocktime import trace as _trace

__all__ = [
    "BlocktimeError",
    "ConfigError",
    "Engine",
    "Event",
    "EventColumns",
    "Fault",
    "Placed",
    "RunError",
    "TraceMeta",
    "assert_blocktime",
    "blocktime_table",
    "engine_names",
    "make_engine",
    "read_trace",
    "replay",
    "replay_events",
    "run",
    "run_config",
    "run_options",
    "write_trace",
]


class RunError(RuntimeError):
    """A run that did not complete (a dead child, a timeout, wrong content...).

    ``str(err)`` is the run's one-line error; ``err.report`` is the whole report (``status`` "failed").
    """

    def __init__(self, report: dict) -> None:
        super().__init__(report.get("error") or "the run failed")
        self.report = report


# ------------------------------------------------------------------ engines


def engine_names() -> tuple[str, ...]:
    """Names of every blocktime engine, in report order (read at call time: new engines appear)."""
    return tuple(_bt.ALL_ENGINE_NAMES)


def make_engine(name: str, meta: TraceMeta) -> Engine:
    """A fresh per-event engine: call ``.fault(Fault)`` / ``.placed(Placed)`` in order, then ``.result()``."""
    return _bt.make_engine(name, meta)


def _engines(engines: Sequence[str] | str | None) -> tuple[str, ...]:
    if engines is None or engines == "all":
        return engine_names()
    if isinstance(engines, str):
        return (engines,)
    return tuple(engines)


# ------------------------------------------------------------------ traces and replay


def read_trace(
    path: str | os.PathLike, format: str = "auto", vcpus: int | None = None
) -> tuple[TraceMeta, EventColumns]:
    """Read a native trace (``run --trace``) or a QEMU trace log, plain or gzip.

    ``format`` is "auto" (detect), "native" or "qemu-log"; ``vcpus`` overrides the vCPU count (needed
    for a QEMU log in which some vCPU never faults).  Returns the metadata and the events as columns
    (``cols.to_events()`` gives ``Fault``/``Placed`` objects).  Bad input raises BlocktimeError.
    """
    return _trace.read_trace_columns(os.fspath(path), format, vcpus)


def write_trace(path: str | os.PathLike, meta: TraceMeta, events: Iterable[Event] | EventColumns) -> int:
    """Write events (``Fault``/``Placed`` objects or columns) as a native trace; ``.gz`` compresses.

    Returns the number of events written.  The file replays to exactly the numbers of the same events.
    """
    if isinstance(events, EventColumns):
        events = events.to_events()
    count = 0
    with _trace.TraceWriter(os.fspath(path), meta) as w:
        for ev in events:
            w.write(ev)
            count += 1
    return count


def replay_events(
    meta: TraceMeta, events: Iterable[Event] | EventColumns, engines: Sequence[str] | str | None = None
) -> dict[str, dict]:
    """Run events through the named engines (default: all); ``{engine: query-migrate fields}``.

    Columns take the engines' vectorised path; event objects are converted to columns first (both
    paths give identical numbers).
    """
    cols = events if isinstance(events, EventColumns) else EventColumns.from_events(events)
    return _bt.replay_columns(meta, cols, _engines(engines))


def replay(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    vcpus: int | None = None,
    engines: Sequence[str] | str | None = None,
) -> dict[str, dict]:
    """Replay a trace file or QEMU trace log (what ``postcopy-harness replay FILE`` computes).

    Returns the ``engines`` dict: ``{engine name: query-migrate fields}``.  Raises BlocktimeError for
    unreadable or inconsistent input and for an unknown engine name.
    """
    meta, cols = read_trace(path, format, vcpus)
    return replay_events(meta, cols, engines)


# ------------------------------------------------------------------ live runs


# run(handler=CMD, ...): someone else's fault handler (harness/restore.py, docs/handler-protocol.md)
HANDLER_OPTIONS = ("handler", "handoff", "handler_per_uffd", "remove_rate", "fork_events", "unmap_events")


def run_options() -> tuple[str, ...]:
    """The keyword arguments :func:`run` accepts (the ``run`` command's flags, with underscores)."""
    from harness.config import RunConfig

    # parsed forms, and a test-only knob
    internal = ("link_model", "injections", "working_set_pages", "precopy_skip_discards")
    return (*(f.name for f in fields(RunConfig) if f.name not in internal), *HANDLER_OPTIONS)


def _config(options: Mapping[str, object]):
    from harness.config import RunConfig, parse_size

    known = run_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown run option {unknown[0]!r} (choose from {', '.join(known)})")
    opts = {k: v for k, v in options.items() if k not in HANDLER_OPTIONS}
    if "ram" in opts:
        opts["ram"] = parse_size(opts["ram"])  # "8M" like the command line
    for key in ("trace", "json", "image", "report"):
        if opts.get(key) is not None:
            opts[key] = os.fspath(opts[key])
    try:
        return RunConfig(**opts).validate()
    except TypeError as e:  # e.g. vcpus="3": a wrong type, said in one line
        raise ConfigError(f"bad run option value: {e}") from None


def run_config(cfg, progress=None, argv: list[str] | None = None, write: bool = True) -> dict:
    """Execute one validated ``harness.config.RunConfig`` and return its report (never raises for a
    failed run: ``status`` is "failed" and ``error`` says why; Ctrl-C gives error "interrupted",
    SIGTERM "terminated").

    Everything the run created (processes, shared memory, sockets) is gone when this returns.
    Writes the JSON report to ``cfg.json`` when set and ``write`` is true, and the report folder
    (``cfg.report``: report.json, summary.txt, plots, trace.json) when set; a folder that cannot be
    written gives the report a ``report-error`` line instead.  ``progress`` (the CLI's
    progress line) and ``argv`` (recorded in the report) are optional.
    """
    from harness.report import build_report, write_json
    from harness.run import Terminated, execute
    from harness.supervise import RunFailed
    from postcopy_core.kernel import KernelError

    raw, error, recovery = None, None, None
    try:
        raw = execute(cfg, progress)
    except Terminated:
        error = "terminated"
    except KeyboardInterrupt:
        error = "interrupted"
    except (RunFailed, KernelError, OSError, ValueError, RuntimeError) as e:
        error = str(e)
        recovery = getattr(e, "recovery", None)  # run --inject: what was injected before it failed
    rep = build_report(cfg, raw, error, argv=argv, recovery=recovery)
    if write and cfg.json:
        write_json(rep, cfg.json)
    if cfg.report:  # report.json, summary.txt, plots, trace.json (an unwritable folder: said in the report)
        from harness.report_dir import write_run_report

        write_run_report(cfg.report, rep, raw)
    return rep


def run(*, check: bool = True, **options: object) -> dict:
    """Run one postcopy migration end to end on the real userfaultfd; returns the run report.

    ``options`` are the ``run`` command's flags as keyword arguments (see :func:`run_options`), e.g.
    ``run(vcpus=3, ram="8M", workload="shared", background=False, link="1gbit,1ms", trace=path)``;
    ``ram`` takes an int or a size string.  ``handler="CMD"`` (with ``handoff``, ``handler_per_uffd``,
    ``remove_rate``, ``fork_events``, ``unmap_events``) tests someone else's fault handler instead of the built-in one,
    as ``run --handler`` does (docs/handler-protocol.md).  Bad options raise ConfigError (one line).  With
    ``check`` (the default) a run that did not complete raises RunError (its report attached);
    Ctrl-C raises KeyboardInterrupt after the teardown.  Nothing of the run is left behind.
    """
    cfg = _config(options)
    rep = _run_handler(cfg, options) if any(k in options for k in HANDLER_OPTIONS) else run_config(cfg)
    if rep["error"] == "interrupted":
        raise KeyboardInterrupt
    if check and rep["status"] != "completed":
        raise RunError(rep)
    return rep


def _run_handler(cfg, options: Mapping[str, object]) -> dict:
    """run(handler=CMD, ...): the run against an external handler (as ``run --handler``)."""
    import argparse

    from harness.external_report import run_external
    from harness.handler_process import HandlerError
    from harness.restore import USED_WITH_HANDLER, handler_problem, handler_spec

    args = argparse.Namespace(handler=None, handoff="pch", handler_per_uffd=False, remove_rate=0.0, fork_events=False,
                              unmap_events=False,
                              json=cfg.json)
    for k in HANDLER_OPTIONS:
        if k in options:
            setattr(args, k, options[k])
    try:
        spec = handler_spec(args)
    except HandlerError as e:
        raise ConfigError(str(e)) from None
    unused = sorted(k for k in options if k not in USED_WITH_HANDLER)
    problem = (f"{unused[0]} is not for handler= (no source, no migration link, no built-in handler)" if unused
               else handler_problem(args, cfg, spec))
    if problem:
        raise ConfigError(problem)
    if spec is None:  # handler=None: the built-in one
        return run_config(cfg)
    return run_external(cfg, spec, remove_rate=float(args.remove_rate), fork_events=bool(args.fork_events),
                        unmap_events=bool(args.unmap_events))


# ------------------------------------------------------------------ checking blocktime


def _engines_of(report: Mapping) -> Mapping:
    """A run report or a replay's engines dict -> the engines dict."""
    engines = report.get("engines", report)
    if not isinstance(engines, Mapping):
        raise TypeError("expected a run report (with 'engines') or a replay's engines dict")
    return engines


def _expected_of(engines: Mapping, expected: object) -> tuple[list[float], float | None, str]:
    """(per-vCPU ms, total ms or None, a label) from the forms assert_blocktime accepts."""
    if isinstance(expected, str):
        if expected not in engines:
            raise KeyError(f"no engine {expected!r} in the report (it has {', '.join(engines)})")
        res = engines[expected]
        return list(res["postcopy-vcpu-blocktime"]), res["postcopy-blocktime"], f"engine {expected}"
    if isinstance(expected, Mapping):
        return list(expected["postcopy-vcpu-blocktime"]), expected.get("postcopy-blocktime"), "expected"
    if isinstance(expected, Iterable):
        return list(expected), None, "expected"
    raise TypeError("expected: per-vCPU ms values, a dict of query-migrate fields, or an engine name")


def blocktime_table(expected: Sequence[float], got: Sequence[float], tolerance_ms: float,
                    total: tuple[float, float] | None = None) -> str:
    """The per-vCPU comparison table :func:`assert_blocktime` prints (``!`` marks a miss)."""
    rows = [("vCPU", "expected ms", "got ms", "difference", "")]
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        rows.append((str(i), f"{e:g}", f"{g:g}", f"{g - e:+g}", "!" if abs(g - e) > tolerance_ms else ""))
    if total is not None:
        e, g = total
        rows.append(("total", f"{e:g}", f"{g:g}", f"{g - e:+g}", "!" if abs(g - e) > tolerance_ms else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def assert_blocktime(report: Mapping, engine: str, expected: object, tolerance_ms: float = 1.0) -> None:
    """Assert that ``engine``'s blocktime is within ``tolerance_ms`` of ``expected``, per vCPU.

    ``report`` is a run report or a replay's engines dict.  ``expected`` is one of: a list of per-vCPU
    ms (checks ``postcopy-vcpu-blocktime``); a dict with ``postcopy-vcpu-blocktime`` and optionally
    ``postcopy-blocktime`` (e.g. QEMU's own query-migrate answer; the total is checked too); or the
    name of another engine in the same report (both fields).  On failure the AssertionError shows a
    per-vCPU table of expected, got and difference.
    """
    engines = _engines_of(report)
    if engine not in engines:
        raise AssertionError(f"no engine {engine!r} in the report (it has {', '.join(engines) or 'none'})")
    exp_per, exp_total, label = _expected_of(engines, expected)
    got = engines[engine]
    got_per = list(got["postcopy-vcpu-blocktime"])
    if len(exp_per) != len(got_per):
        raise AssertionError(f"{engine}: {len(got_per)} vCPUs in the report, {len(exp_per)} expected")
    total = None if exp_total is None else (exp_total, got["postcopy-blocktime"])
    misses = [i for i, (e, g) in enumerate(zip(exp_per, got_per, strict=True)) if abs(g - e) > tolerance_ms]
    total_miss = total is not None and abs(total[1] - total[0]) > tolerance_ms
    if misses or total_miss:
        what = f"{len(misses)} of {len(got_per)} vCPUs" + (" and the total" if total_miss else "")
        raise AssertionError(
            f"blocktime of engine {engine} vs {label}: {what} off by more than {tolerance_ms:g} ms\n"
            + blocktime_table(exp_per, got_per, tolerance_ms, total)
        )
