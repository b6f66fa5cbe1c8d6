"""Postcopy recovery as the orchestrator sees it: pauses, resumes, replacement sources, paused time.

The destination says when it pauses (``postcopy-paused``: a page channel ended before every page
was in) and when it is active again (``resumed``: a new source said HELLO on both channels); the
orchestrator starts the new sources (harness/source_restart.py, ``_start_source``).  This log counts what
happened for the report's ``recovery`` section and decides when to give up: after
``RESTART_LIMIT`` replacements in a row that died before the destination resumed, or when a pause
lasts longer than the stall timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

RESTART_LIMIT = 4  # replacement sources in a row that may die before one resumes the destination


@dataclass
class RecoveryLog:
    """Pauses and resumes of one run; times in seconds after ``t_go`` (the workload's start)."""

    t_go: float = field(default_factory=time.monotonic)
    pauses: int = 0
    resumes: int = 0
    restarts: int = 0  # replacement sources started
    restarts_in_a_row: int = 0  # since the destination last resumed
    paused_s: float = 0.0  # closed pauses
    paused_since: float | None = None  # monotonic time the open pause began
    events: list[dict] = field(default_factory=list)
    last_cause: str = ""  # the latest reason a source was lost (for the error when recovery gives up)

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def _at(self, now: float) -> float:
        return round(now - self.t_go, 3)

    def pause(self, why: str, placed: int | None = None, now: float | None = None) -> None:
        """The destination went to postcopy-paused (again, if it already was) with ``placed`` pages in."""
        now = time.monotonic() if now is None else now
        event = {"event": "still-paused" if self.paused else "paused", "at-s": self._at(now), "why": why}
        if placed is not None:
            event["pages-placed"] = placed
        if self.paused_since is None:
            self.pauses += 1
            self.paused_since = now
        self.events.append(event)

    def restart(self, pid: int | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.restarts += 1
        self.restarts_in_a_row += 1
        self.events.append({"event": "source-started", "at-s": self._at(now), "pid": pid})

    def resume(self, now: float | None = None) -> None:
        """The destination is postcopy-active again."""
        now = time.monotonic() if now is None else now
        if self.paused_since is not None:
            self.paused_s += now - self.paused_since
            self.paused_since = None
        self.resumes += 1
        self.restarts_in_a_row = 0
        self.events.append({"event": "resumed", "at-s": self._at(now)})

    def source_lost(self, cause: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.last_cause = cause
        self.events.append({"event": "source-lost", "at-s": self._at(now), "cause": cause})

    def source_stalled(self, words: str, now: float | None = None) -> None:
        """The source made no progress for --stall-timeout: it is cut off and replaced like a lost one."""
        now = time.monotonic() if now is None else now
        self.events.append({"event": "source-stalled", "at-s": self._at(now), "why": words})

    def paused_for(self, now: float | None = None) -> float:
        """How long the open pause has lasted (0 when active)."""
        if self.paused_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.paused_since

    def total_paused_s(self, now: float | None = None) -> float:
        return self.paused_s + self.paused_for(now)

    def summary(self) -> dict:
        """The counts of the report's ``recovery`` section."""
        return {"pauses": self.pauses, "resumes": self.resumes, "paused-s": round(self.total_paused_s(), 3),
                "source-restarts": self.restarts, "events": list(self.events)}
