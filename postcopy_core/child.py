"""What every child process of a run does right after fork, in one place.

Die with the parent (PR_SET_PDEATHSIG), leave Ctrl-C to the orchestrator, take a name that
ps/psutil show, keep only the fds it was given, run, and _exit with the body's code; a body that
raises says why in one line on stderr and exits 5.  Lean on purpose: the zygote imports it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import NoReturn

from postcopy_core import kernel

FAILED = 5  # exit code of a child whose body raised


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of this process not in ``keep`` (0, 1, 2 are always kept)."""
    keep = keep | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def run_child(name: str, label: str, keep: set[int], body: Callable[[], int],
              cpus: tuple[int, ...] = ()) -> NoReturn:
    """Set up the child (``name`` for ps, ``label`` for its error line, on ``cpus``), run ``body``, _exit."""
    code = FAILED
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        kernel.die_with_parent()
        kernel.set_process_name(name)
        close_fds_except(keep)
        if cpus:
            os.sched_setaffinity(0, cpus)
        code = body()
    except BaseException as e:  # one line; the orchestrator fails the run on our exit status
        try:
            os.write(2, f"{label}: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
        code = FAILED
    finally:
        os._exit(code)
