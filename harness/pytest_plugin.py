"""The pytest plugin (entry point ``pytest11``: ``postcopy_harness``), for users' own blocktime tests.

Installed with the package, it offers two fixtures and re-exports one assertion:

* ``postcopy_run(**options)`` -- one live run (the ``run`` command's options as keyword arguments);
  returns the report dict; a run that does not complete fails the test with its one-line error; after
  each run the fixture checks that no process, shared-memory segment or socket of it is left.
* ``postcopy_replay(path, format="auto", vcpus=None, engines=None)`` -- replays a trace or a QEMU
  trace log; returns the ``engines`` dict.
* ``assert_blocktime(report, engine, expected, tolerance_ms)`` -- ``from postcopy_harness import
  assert_blocktime`` (also available here); prints a per-vCPU table when it fails.

All three are the Python API's functions (``postcopy_harness.run``, ``.replay``,
``.assert_blocktime``); this module only adds pytest's failure reporting and the leftover check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil
import pytest

__all__ = ["leftovers_of_this_process", "postcopy_replay", "postcopy_run"]

LEFTOVER_WAIT_S = 5.0


def __getattr__(name: str):
    # pytest loads this plugin in every session of the environment: the API (numpy, the cffi
    # extension) is imported only when a test uses it
    if name == "assert_blocktime":
        from postcopy_harness import assert_blocktime

        return assert_blocktime
    raise AttributeError(name)


def leftovers_of_this_process() -> list[str]:
    """What runs started by this process left: pch-* descendants, /dev/shm/pch-<pid>-*, @pch-<pid>- sockets.

    Only this process's own (other people's runs on the same machine are not our business).  Zombie
    children named pch-* are reaped on the way (a run makes this process a subreaper).
    """
    found = []
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            name, status = child.name(), child.status()
        except psutil.Error:
            continue
        if not name.startswith("pch-"):
            continue
        if status == psutil.STATUS_ZOMBIE and child.ppid() == me.pid:
            try:
                os.waitpid(child.pid, os.WNOHANG)
                continue
            except ChildProcessError:
                continue
        found.append(f"process {name} pid {child.pid}")
    prefix = f"pch-{os.getpid()}-"
    try:
        found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        pass
    try:
        with open("/proc/net/unix") as f:
            found += [f"socket {line.split()[-1]}" for line in f if f"@{prefix}" in line]
    except OSError:
        pass
    return found


def _wait_clean(timeout: float = LEFTOVER_WAIT_S) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers_of_this_process()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def postcopy_run() -> Callable[..., dict]:
    """A callable: ``postcopy_run(vcpus=3, ram="8M", workload="shared", background=False, ...)`` runs
    one migration and returns its report.  A failed run or a leftover fails the test."""

    import postcopy_harness

    def _run(**options: object) -> dict:
        problem = None  # failed outside the except blocks: one line, no exception chain
        try:
            report = postcopy_harness.run(**options)
        except postcopy_harness.ConfigError as e:
            problem = f"postcopy_run: {e}"
        except postcopy_harness.RunError as e:
            problem = f"postcopy_run: the run failed: {e}"
        left = _wait_clean()
        if left:
            problem = f"postcopy_run: the run left behind: {', '.join(left)}" + (f"; {problem}" if problem else "")
        if problem:
            pytest.fail(problem, pytrace=False)
        return report

    return _run


@pytest.fixture
def postcopy_replay() -> Callable[..., dict[str, dict]]:
    """A callable: ``postcopy_replay(path, format="auto", vcpus=None, engines=None)`` returns the
    ``engines`` dict of a trace or QEMU log (bad input fails the test with the reader's message)."""

    import postcopy_harness

    def _replay(path: str | os.PathLike, *, format: str = "auto", vcpus: int | None = None,
                engines: list[str] | tuple[str, ...] | str | None = None) -> dict[str, dict]:
        try:
            return postcopy_harness.replay(path, format=format, vcpus=vcpus, engines=engines)
        except postcopy_harness.BlocktimeError as e:
            problem = f"postcopy_replay: {e}"
        pytest.fail(problem, pytrace=False)

    return _replay
