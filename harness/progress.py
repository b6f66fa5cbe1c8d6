"""The live progress line of a run on a terminal: pages placed / total, faults/s, elapsed.

The orchestrator calls :meth:`RunProgress.tick` from its supervision loop; the counts come from
what it already has (the received map in shared memory, the handler's event records its reader
thread collects), so the fault path does no extra work.  Nothing is drawn for the first
``delay`` seconds (a short run stays as quiet as before), nor when stdout or stderr is not a
terminal, nor with ``--quiet``.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

TICK_S = 0.25  # how often the counts are read


class RunProgress:
    """A transient rich progress line on stderr, shown only on a terminal and after ``delay`` s."""

    def __init__(self, total_pages: int, delay: float = 1.5, console: Console | None = None,
                 enabled: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total = total_pages
        self.delay = delay
        # default: only when both stderr (the line) and stdout (the table after it) are terminals
        self.enabled = self.console.is_terminal and sys.stdout.isatty() if enabled is None else enabled
        self._t0 = time.monotonic()
        self._last = 0.0
        self._faults = (self._t0, 0)  # (when, faults) at the previous tick, for the rate
        self._rate = 0.0
        self._bar: Progress | None = None
        self._task = None

    def due(self) -> bool:
        """Whether a tick now would be drawn (cheap: lets the caller skip counting)."""
        now = time.monotonic()
        return self.enabled and now - self._t0 >= self.delay and now - self._last >= TICK_S

    def _count(self, faults: int) -> float:
        """Note a tick (its time is returned): the fault rate since the previous one."""
        now = time.monotonic()
        self._last = now
        t_prev, f_prev = self._faults
        if now > t_prev:
            self._rate = (faults - f_prev) / (now - t_prev)
        self._faults = (now, faults)
        return now

    def tick(self, placed: int, faults: int) -> None:
        """Show ``placed`` of the total pages and the fault rate since the previous tick."""
        now = self._count(faults)
        if self._bar is None:
            self._bar = Progress(TextColumn("pages placed"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[elapsed]}"),
                                 console=self.console, transient=True, auto_refresh=False)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, rate="", elapsed="")
        self._bar.update(self._task, completed=placed, rate=f"{self._rate:,.0f} faults/s",
                         elapsed=f"{now - self._t0:,.1f} s")
        self._bar.refresh()

    def close(self) -> None:
        """Remove the line (transient), leaving the terminal as it was."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
