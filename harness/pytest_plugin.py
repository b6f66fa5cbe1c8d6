"""The pytest plugin (entry point ``pytest11``: ``postcopy_harness``), for users' own blocktime tests.

Installed with the package, it offers two fixtures and re-exports one assertion:

* ``postcopy_run(**options)`` -- one live run (the ``run`` command's options as keyword arguments);
  returns the report dict; raises what ``postcopy_harness.run`` raises (``ConfigError`` for bad
  options, ``RunError`` for a run that does not complete), so ``pytest.raises`` works the same; after
  each run the fixture checks that no process, shared-memory segment or socket of it is left.
* ``postcopy_replay(path, format="auto", vcpus=None, engines=None)`` -- replays a trace or a QEMU
  trace log; returns the ``engines`` dict; raises ``BlocktimeError`` for bad input, as the API does.
* ``assert_blocktime(report, engine, expected, tolerance_ms)`` -- ``from postcopy_harness import
  assert_blocktime`` (also available here); prints a per-vCPU table when it fails.

All three are the Python API's functions (``postcopy_harness.run``, ``.replay``,
``.assert_blocktime``), with the same arguments and the same exceptions; this module only adds the
leftover check (a leftover fails the test).
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
        from harness.blocktime_check import assert_blocktime

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
    one migration and returns its report.  Raises ``ConfigError`` / ``RunError`` as
    ``postcopy_harness.run`` does; a leftover fails the test."""

    from harness.config import ConfigError
    from harness.runner import RunError, run

    def _run(**options: object) -> dict:
        error: Exception | None = None
        try:
            report = run(**options)
        except (ConfigError, RunError) as e:
            error = e  # raised below, after the leftover check, outside this block: no exception chain
        left = _wait_clean()
        if left:
            pytest.fail(f"postcopy_run: the run left behind: {', '.join(left)}" + (f"; {error}" if error else ""),
                        pytrace=False)
        if error is not None:
            raise error
        return report

    return _run


@pytest.fixture
def postcopy_replay() -> Callable[..., dict[str, dict]]:
    """A callable: ``postcopy_replay(path, format="auto", vcpus=None, engines=None)`` returns the
    ``engines`` dict of a trace or QEMU log; bad input raises ``BlocktimeError`` (the reader's one
    line), as ``postcopy_harness.replay`` does."""

    from harness.traces import replay

    def _replay(path: str | os.PathLike, *, format: str = "auto", vcpus: int | None = None,
                engines: list[str] | tuple[str, ...] | str | None = None) -> dict[str, dict]:
        return replay(path, format=format, vcpus=vcpus, engines=engines)

    return _replay
