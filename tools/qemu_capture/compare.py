#!/usr/bin/env python3
"""Replay capture directories with the seed engine and print QEMU's query-migrate next to it.

    python3 tools/qemu_capture/compare.py tests/data/qemu/*

One line per capture: QEMU's postcopy-blocktime and postcopy-vcpu-blocktime, the seed replay's,
the largest difference, and the importer's unexplained end lines.  Exit 1 if any is off by > 1 ms.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from postcopy_core.blocktime import BlocktimeError, replay_columns
from postcopy_core.blocktime.trace import read_trace_columns


def compare(capture: Path) -> tuple[str, int]:
    """One report line for ``capture`` and its worst difference in ms."""
    qm = json.loads((capture / "query-migrate.json").read_text())
    smp = json.loads((capture / "info.json").read_text()).get("smp")
    log = next(p for p in (capture / "trace.log.gz", capture / "trace.log") if p.exists())
    meta, cols = read_trace_columns(str(log), "qemu-log", smp)
    seed = replay_columns(meta, cols, ["seed"])["seed"]
    theirs = [qm["postcopy-blocktime"], *qm["postcopy-vcpu-blocktime"]]
    mine = [seed["postcopy-blocktime"], *seed["postcopy-vcpu-blocktime"]]
    worst = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
    q = meta.extra["qemu"]
    line = (
        f"{capture.name:24} qemu {theirs[0]:5} {theirs[1:]}  seed {mine[0]:5} {mine[1:]}  "
        f"max|diff| {worst} ms  unexplained ends {q['mismatched_ends']}/{q['end_lines']}"
    )
    return line, worst


def main(argv: list[str]) -> int:
    bad = 0
    for arg in argv:
        try:
            line, worst = compare(Path(arg))
        except (OSError, KeyError, StopIteration, BlocktimeError) as exc:
            print(f"{arg}: cannot compare: {exc}")
            bad += 1
            continue
        print(line)
        bad += worst > 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
