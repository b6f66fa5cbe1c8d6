"""Run one migration from a RunConfig or from keyword arguments, and return its report.

The run path every caller shares: the ``run`` command (harness/cli.py), ``compare``, the demos,
the handler sweep, ``restore`` and the Python API (``postcopy_harness.run``, which re-exports these).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields

from harness.config import ConfigError, RunConfig, parse_size


class RunError(RuntimeError):
    """A run that did not complete (a dead child, a timeout, wrong content...).

    ``str(err)`` is the run's one-line error; ``err.report`` is the whole report (``status`` "failed").
    """

    __module__ = "postcopy_harness"  # its public name: tracebacks say postcopy_harness.RunError

    def __init__(self, report: dict) -> None:
        super().__init__(report.get("error") or "the run failed")
        self.report = report


# run(handler=CMD, ...): someone else's fault handler (harness/restore.py, docs/handler-protocol.md)
HANDLER_OPTIONS = ("handler", "handoff", "handler_per_uffd", "remove_rate", "fork_events", "unmap_events")


def run_options() -> tuple[str, ...]:
    """The keyword arguments :func:`run` accepts (the ``run`` command's flags, with underscores)."""
    # parsed forms, and a test-only knob
    internal = ("link_model", "injections", "working_set_pages", "precopy_skip_discards")
    return (*(f.name for f in fields(RunConfig) if f.name not in internal), *HANDLER_OPTIONS)


def config_from_options(options: Mapping[str, object]) -> RunConfig:
    """``run()``'s keyword arguments -> a validated RunConfig; unknown or bad ones raise ConfigError."""

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
    from harness.run import outcome

    raw, error, failure = outcome(cfg, progress)
    recovery = getattr(failure, "recovery", None)  # run --inject: what was injected before it failed
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
    cfg = config_from_options(options)
    rep = run_handler(cfg, options) if any(k in options for k in HANDLER_OPTIONS) else run_config(cfg)
    if rep["error"] == "interrupted":
        raise KeyboardInterrupt
    if check and rep["status"] != "completed":
        raise RunError(rep)
    return rep


def run_handler(cfg, options: Mapping[str, object]) -> dict:
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
