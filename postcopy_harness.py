"""The Python API of postcopy-harness: run a migration, replay traces, check blocktime.

A thin, stable facade over the packages that do the work (``harness.runner`` runs a migration,
``harness.traces`` reads and replays traces, ``harness.blocktime_check`` checks blocktime;
``postcopy_core.blocktime`` holds the engines and the trace formats).  Those modules may move
things around; the names here stay.  This module only re-exports: it depends on ``harness``,
never the other way (tests/test_lint.py checks that no ``harness`` module imports it).  The
``postcopy-harness`` command line and the pytest plugin (``harness.pytest_plugin``) call these
same functions.

>>> import postcopy_harness as ph
>>> report = ph.run(vcpus=2, ram="8M", workload="shared", background=False)   # doctest: +SKIP
>>> ph.assert_blocktime(report, "seed", expected="exact", tolerance_ms=2)      # doctest: +SKIP
>>> engines = ph.replay("run.trace", engines=["seed", "modern"])               # doctest: +SKIP

Blocktime results everywhere are dicts of QEMU ``query-migrate`` fields per engine, e.g.
``{"seed": {"postcopy-blocktime": 12, "postcopy-vcpu-blocktime": [7, 12], ...}, "modern": {...}}``.
"""

from __future__ import annotations

from harness.blocktime_check import assert_blocktime, blocktime_table
from harness.config import ConfigError
from harness.runner import RunError, run, run_config, run_options
from harness.traces import engine_names, make_engine, read_trace, replay, replay_events, write_trace
from postcopy_core.blocktime import BlocktimeError, Engine, Event, EventColumns, Fault, Placed, TraceMeta

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
