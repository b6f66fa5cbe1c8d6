"""Counting refused connections instead of writing a line for each one.

A stranger can open connections as fast as the kernel accepts them; one stderr line per refusal
let it flood the log (945 lines in 40 s on ``source --listen``) and hide what matters.  So the
first refusal is told in full at once (a person sees that someone knocks, and why they were turned
away), later ones are only counted, and one line with the count and the commonest reasons follows
when the listening phase ends, or at most once a :data:`SUMMARY_EVERY_S` while it goes on.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import Counter

from postcopy_core.auth import warn

SUMMARY_EVERY_S = 60.0
REASONS_SHOWN = 3  # a summary names this many reasons, the commonest first


class Refusals:
    """The refusals of one listener; ``what`` names one connection in the log ("uffd hand-off")."""

    def __init__(self, what: str, summary_every_s: float = SUMMARY_EVERY_S) -> None:
        self.what = what
        self.summary_every_s = summary_every_s
        self.total = 0  # every refusal, told or counted
        self._told = False
        self._pending: Counter[str] = Counter()  # counted since the last line
        self._since = time.monotonic()
        self._lock = threading.Lock()  # source --listen refuses from a thread during a migration

    def refuse(self, peer: str, why: str) -> None:
        """Count one refused connection from ``peer``; the first is told at once."""
        with self._lock:
            self.total += 1
            if not self._told:
                self._told = True
                self._since = time.monotonic()
                warn(f"refused a {self.what} from {peer}: {why} (later refusals are counted, not listed)")
                return
            self._pending[why] += 1
            due = time.monotonic() - self._since >= self.summary_every_s
        if due:
            self.flush()

    def tick(self) -> None:
        """Write the summary line if one is due (for a listener that may sit quiet for long)."""
        with self._lock:
            due = bool(self._pending) and time.monotonic() - self._since >= self.summary_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        """One line for what was counted since the last line (nothing when nothing was)."""
        with self._lock:
            n = sum(self._pending.values())
            if not n:
                return
            common = self._pending.most_common()
            reasons = ", ".join(f"{why}: {k}" for why, k in common[:REASONS_SHOWN])
            if len(common) > REASONS_SHOWN:
                reasons += f", {len(common) - REASONS_SHOWN} other reasons: {sum(k for _, k in common[REASONS_SHOWN:])}"
            seconds = time.monotonic() - self._since
            self._pending.clear()
            self._since = time.monotonic()
        plural = "s" if n != 1 else ""
        warn(f"refused {n} more {self.what}{plural} in {seconds:.0f} s ({reasons}); "
             f"{self.total} refused in all")


class TurnAway:
    """While a listener is not accepting (``source --listen`` mid-migration), refuse every
    connection at once from a thread, so none waits in the kernel's queue: ``with TurnAway(...):``."""

    def __init__(self, listener: socket.socket, refusals: Refusals, why: str) -> None:
        self.listener, self.refusals, self.why = listener, refusals, why
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="pch-turn-away", daemon=True)

    def __enter__(self) -> TurnAway:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _serve(self) -> None:
        self.listener.setblocking(False)
        while True:
            ready, _, _ = select.select([self.listener, self._stop_r], [], [], self.refusals.summary_every_s)
            if self._stop_r in ready:
                return
            self.refusals.tick()
            while self.listener in ready:
                try:
                    conn, addr = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # out of fds for a moment: the next turn tries again
                    time.sleep(0.05)
                    break
                conn.close()
                self.refusals.refuse(f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr), self.why)
