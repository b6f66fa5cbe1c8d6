"""The live view of a run (``run --live``): what each vCPU is doing, pages received, faults/s.

It builds on the progress line (:class:`harness.progress.RunProgress`): the orchestrator feeds it
the same ticks (pages placed, faults so far) from its supervision loop, and attaches itself so the
view can also read what the run already keeps in shared memory, without any work on the fault path:

* the access board (``postcopy_core/board.py``): the page each vCPU is touching (+ 1); a vCPU whose
  page is not in the received map yet is stalled on it;
* the handler's event records the orchestrator's reader thread collects: faults per vCPU, and the
  time of each vCPU's latest fault (how long it has been stalled);
* with ``--live-engines``, the engines fed during the run: their blocktime so far.

On a terminal it is a rich Live table on stderr, refreshed four times a second; anywhere else it
prints a plain progress line every second (a log or CI gets lines, not escape codes).
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from harness.config import RunConfig
from harness.progress import RunProgress

PLAIN_EVERY_S = 1.0  # a plain line per second when not on a terminal
MAX_ROWS = 16  # vCPU rows shown; the rest are summed up in one line


class LiveView(RunProgress):
    """A dashboard of one run; ``attach(run)`` is called by :class:`harness.run.Run`."""

    def __init__(self, cfg: RunConfig, console: Console | None = None, terminal: bool | None = None) -> None:
        console = console or Console(stderr=True)
        super().__init__(cfg.npages, delay=0.0, console=console, enabled=True)
        self.cfg = cfg
        self.terminal = console.is_terminal if terminal is None else terminal
        self.run = None
        self.vcpus = cfg.vcpus
        self._read = (0, b"")  # (event chunks read, partial record)
        self.faults = np.zeros(cfg.vcpus, np.int64)
        self.last_fault = np.zeros(cfg.vcpus, np.int64)  # monotonic ns of each vCPU's latest fault
        self.last_page = np.full(cfg.vcpus, -1, np.int64)  # the page of that fault
        self._seen: dict[int, tuple[int, int]] = {}  # vCPU -> (board page, first seen ns)
        self._engines: dict[str, int] = {}
        self._live: Live | None = None
        self._last_plain = 0.0
        self.lines = 0  # plain lines printed (tests)

    def attach(self, run) -> None:
        """Called by the run once its shared memory exists."""
        self.run = run

    def due(self) -> bool:
        now = time.monotonic()
        every = 0.25 if self.terminal else PLAIN_EVERY_S
        return now - self._last >= every

    # ------------------------------------------------------------ reading the run

    def _read_records(self) -> None:
        from harness.accounting import RECORD
        from postcopy_core.handler import EV_FAULT

        acc = getattr(self.run, "accounting", None)
        if acc is None:
            return
        done, tail = self._read
        chunks = acc.chunks[done:]  # the reader thread only appends
        data = tail + b"".join(chunks)
        whole = len(data) - len(data) % RECORD.itemsize
        rec = np.frombuffer(data, RECORD, whole // RECORD.itemsize)
        self._read = (done + len(chunks), data[whole:])
        f = rec[(rec["kind"] == EV_FAULT) & (rec["vcpu"] >= 0) & (rec["vcpu"] < self.vcpus)]
        if f.size:
            v = f["vcpu"].astype(np.int64)
            self.faults += np.bincount(v, minlength=self.vcpus)
            # the latest fault of each vCPU: records are in order, so the last one per vCPU wins
            self.last_fault[v] = f["t"]
            self.last_page[v] = (f["addr"] // self.cfg.page_size).astype(np.int64)
        if acc.live:
            for name, eng in list(acc.engines.items()):
                try:
                    self._engines[name] = int(eng.result()["postcopy-blocktime"])
                except (RuntimeError, ValueError, KeyError, IndexError):
                    pass  # fed concurrently by the reader thread: keep the previous value

    def states(self) -> list[tuple[str, int, float]]:
        """Per vCPU: ("running" | "stalled" | "idle", page or -1, ms stalled so far)."""
        run = self.run
        out = []
        now = time.monotonic_ns()
        board = getattr(run, "board", None)
        received = getattr(run, "received", None)
        for v in range(self.vcpus):
            slot = int(board.slots[v]) if board is not None else 0
            if slot == 0:
                out.append(("idle", -1, 0.0))
                self._seen.pop(v, None)
                continue
            page = slot - 1
            if received is None or page >= self.cfg.npages or received[page]:
                out.append(("running", page, 0.0))
                continue
            seen = self._seen.get(v)
            if seen is None or seen[0] != page:
                seen = self._seen[v] = (page, now)
            since = int(self.last_fault[v]) if self.last_page[v] == page else seen[1]
            out.append(("stalled", page, max(now - min(since, seen[1]), 0) / 1e6))
        return out

    # ------------------------------------------------------------ drawing

    def tick(self, placed: int, faults: int) -> None:
        now = self._count(faults)
        if self.run is None:
            return
        self._read_records()
        states = self.states()
        if self.terminal:
            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=False)
                self._live.start()
            self._live.update(self.render(placed, faults, states, now - self._t0), refresh=True)
        elif now - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = now
            self.console.print(self.plain_line(placed, faults, states, now - self._t0), markup=False,
                               highlight=False, soft_wrap=True)
            self.lines += 1

    def _engine_text(self) -> str:
        if not self._engines:
            return "" if self.cfg.live_engines else "blocktime per engine: with --live-engines"
        return "blocktime so far: " + ", ".join(f"{k} {v:,} ms" for k, v in self._engines.items())

    def plain_line(self, placed: int, faults: int, states: list, elapsed: float) -> str:
        """One line for a log: elapsed, pages, faults/s, vCPUs stalled, blocktime per engine."""
        stalled = sum(1 for s, _, _ in states if s == "stalled")
        eng = self._engine_text() if self._engines else ""
        return (f"live {elapsed:6.1f} s  pages {placed:,}/{self.total:,}  faults {faults:,} ({self._rate:,.0f}/s)  "
                f"vCPUs stalled {stalled}/{len(states)}" + (f"  {eng}" if eng else ""))

    def render(self, placed: int, faults: int, states: list, elapsed: float) -> Group:
        """The dashboard: a header line and one row per vCPU (the first :data:`MAX_ROWS`)."""
        share = placed / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        head = Text(f"postcopy live  {elapsed:,.1f} s   pages received {placed:,}/{self.total:,} "
                    f"[{bar:<30}] {share:5.1%}   faults {faults:,} ({self._rate:,.0f}/s)")
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col, just in (("vCPU", "right"), ("state", "left"), ("page", "right"), ("stalled for", "right"),
                          ("faults", "right")):
            t.add_column(col, justify=just)
        for v, (state, page, ms) in enumerate(states[:MAX_ROWS]):
            style = {"stalled": "red", "running": "green"}.get(state, "dim")
            t.add_row(str(v), f"[{style}]{state}[/]", f"{page:,}" if page >= 0 else "-",
                      _stalled_for(state, ms), f"{int(self.faults[v]):,}")
        parts = [head, t]
        if len(states) > MAX_ROWS:
            rest = states[MAX_ROWS:]
            parts.append(Text(f"... {len(rest)} more vCPUs: {sum(s == 'stalled' for s, _, _ in rest)} stalled"))
        parts.append(Text(self._engine_text(), style="dim"))
        return Group(*parts)

    def close(self) -> None:
        self.run = None  # its shared memory is about to go
        if self._live is not None:
            self._live.stop()
            self._live = None
        super().close()


def _stalled_for(state: str, ms: float) -> str:
    """How long a stalled vCPU has waited; "new" when its fault record has not come in yet."""
    if state != "stalled":
        return ""
    return f"{ms:,.1f} ms" if ms >= 0.05 else "new"
