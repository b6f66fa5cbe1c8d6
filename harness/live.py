"""The live view of a run (``run --live``)."""

from __future__ import annotations

from harness.config import RunConfig
from harness.progress import RunProgress


class LiveView(RunProgress):
    """For now the progress line (the full view follows)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg.npages)
