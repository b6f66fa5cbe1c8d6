"""Source strategies: what the source sends next, decided here; the byte lanes only move it.

The seam.  A strategy is a small object the source process (postcopy_core/source.py) asks three
things, and nothing else: the stream's order (:meth:`Strategy.stream_batches`, batches of page
numbers), the pages to push right after an answer (:meth:`Strategy.on_request`, given the pages the
destination asked for; called only when ``wants_requests``), and its channel model (``own_channel``:
answers on the urgent channel, or queued in the stream's FIFO like QEMU without postcopy-preempt).
The C lane (csrc/source.c) takes those batches in and puts frames out; it reports requested pages
back only when the strategy wants them, so the default path costs nothing more.  A new strategy is
one new subclass (it registers itself under its ``name``; here, or in a module imported at the end
of this one): no change in the fault path, the source loops or the C lane (an option of its own
also needs its flag in harness/cli.py and harness/config.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np

STREAM_BATCH = 1 << 16  # page numbers handed to the C lane at a time
DEFAULT_STRATEGY = "preempt"  # today's behaviour; why: docs/usage.md, "Source strategies"
DEFAULT_PREPAGE_WINDOW = 16

STRATEGIES: dict[str, type[Strategy]] = {}  # name -> class, in definition order (the CLI's choices)


def sequential_batches(npages: int, batch: int = STREAM_BATCH, first: int = 0) -> Iterator[np.ndarray]:
    """The background stream's order: RAM from ``first`` to the end, as QEMU's postcopy does."""
    for start in range(first, npages, batch):
        yield np.arange(start, min(start + batch, npages), dtype=np.uint32)


class Strategy:
    """Base strategy: QEMU postcopy-preempt (see :class:`Preempt`).  Subclass and set ``name``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    background: ClassVar[bool] = True  # stream the rest of RAM from the start (False: after the workload)
    own_channel: ClassVar[bool] = True  # answers on the urgent channel, not behind the stream
    wants_requests: ClassVar[bool] = False  # on_request is called (the C lane records requested pages)

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            STRATEGIES[cls.name] = cls

    @classmethod
    def from_config(cls, cfg) -> Strategy:
        """The strategy for a validated :class:`harness.config.RunConfig` (its own options, if any)."""
        return cls()

    def stream_batches(self, npages: int) -> Iterator[np.ndarray]:
        """Batches of page numbers for the background stream; sent pages are skipped by the lanes."""
        return sequential_batches(npages)

    def on_request(self, pages: np.ndarray, npages: int) -> np.ndarray | None:
        """Pages to push right behind the answers to requests for ``pages`` (first page of each)."""
        return None


class Demand(Strategy):
    name = "demand"
    help = "requested pages only, the rest once the workload ended (pure demand paging; = --no-background)"
    background = False


class Vanilla(Strategy):
    name = "vanilla"
    help = "QEMU's default: one channel, an answer queues behind the stream already in flight"
    own_channel = False


class Preempt(Strategy):
    name = "preempt"
    help = "QEMU postcopy-preempt: answers on their own channel, overtaking the stream (default)"


class Prepage(Strategy):
    """Around each faulting page, push its neighbours next (in the spirit of Hines and Gopalan's bubbling)."""

    name = "prepage"
    help = "preempt, and around each faulting page push its --prepage-window neighbours next"
    wants_requests = True

    def __init__(self, window: int = DEFAULT_PREPAGE_WINDOW) -> None:
        self.window = window
        # the pages after the fault, then those before it, each side in ascending order: most walks go
        # up, and runs of consecutive pages go out as few frames
        self.offsets = np.array([*range(1, window + 1), *range(-window, 0)], dtype=np.int64)

    @classmethod
    def from_config(cls, cfg) -> Strategy:
        return cls(cfg.prepage_window)

    def on_request(self, pages: np.ndarray, npages: int) -> np.ndarray | None:
        around = (pages.astype(np.int64)[:, None] + self.offsets[None, :]).ravel()
        around = around[(around >= 0) & (around < npages)]
        return around.astype(np.uint32) if around.size else None


class Prefetch(Strategy):
    """Stream a recorded working set first (in the order it was first touched), then the rest (REAP)."""

    name = "prefetch"
    help = "preempt, and stream a recorded working set (--working-set FILE) before the rest"

    def __init__(self, working_set: np.ndarray) -> None:
        self.working_set = np.asarray(working_set, dtype=np.uint32)

    @classmethod
    def from_config(cls, cfg) -> Strategy:
        return cls(cfg.working_set_pages)

    def stream_batches(self, npages: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.working_set), STREAM_BATCH):
            yield self.working_set[start : start + STREAM_BATCH]
        yield from sequential_batches(npages)  # the lanes skip what the working set sent


def make_strategy(cfg) -> Strategy:
    """The strategy object a validated run configuration names."""
    return STRATEGIES[cfg.strategy].from_config(cfg)


def read_working_set(path: str, page_size: int, npages: int) -> np.ndarray:
    """The pages a recorded trace (``run --trace``) faulted on, in order of first fault.

    Raises ValueError with one line naming the file when it is not a usable trace."""
    from postcopy_core.blocktime.events import KIND_FAULT, BlocktimeError
    from postcopy_core.blocktime.trace import read_trace_columns

    try:
        with open(path, "rb"):
            pass
        _, cols = read_trace_columns(path)
    except OSError as e:
        raise ValueError(f"--working-set {path}: {e.strerror or e}") from None
    except (BlocktimeError, UnicodeDecodeError, EOFError) as e:
        why = str(e).removeprefix(f"{path}: ")  # the reader names the file too
        raise ValueError(f"--working-set {path}: not a trace: {why}") from None
    addrs = cols.addr[cols.kind == KIND_FAULT]
    if not addrs.size:
        raise ValueError(f"--working-set {path}: the trace has no faults")
    pages = addrs // page_size
    if int(pages.min()) < 0 or int(pages.max()) >= npages:
        raise ValueError(f"--working-set {path}: faults outside --ram (page {int(pages.max())} of {npages}): "
                         "record it with the same --ram")
    _, first = np.unique(pages, return_index=True)
    return pages[np.sort(first)].astype(np.uint32)
