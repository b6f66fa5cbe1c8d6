#!/usr/bin/env python3
"""Print the markdown table of docs/performance.md from `postcopy-harness qemu --json` reports.

    python tools/qemu_table.py NAME=report.json ...
"""

from __future__ import annotations

import json
import sys


def _v(xs) -> str:
    return "[" + ", ".join(f"{x:.0f}" for x in xs) + "]"


def row(name: str, rep: dict) -> str:
    q, e, g, f = rep["qemu"], rep["engines"], rep["guest"], rep["faults"] or {}
    nf = g["noise-floor"]
    share = f.get("share-of-guest-stall-traced")
    cells = [
        f"`{name}`",
        f"{_v(q['postcopy-vcpu-blocktime'])} / {q['postcopy-blocktime']}",
        *(f"{_v(e[n]['postcopy-vcpu-blocktime'])} / {e[n]['postcopy-blocktime']}" if n in e else "-"
          for n in ("seed", "modern", "exact")),
        f"{_v(g['vcpu-stall-ms'])} / {g['all-stalled-ms']:.0f}",
        _v(nf["vcpu-ms-in-window"]),
        f"{f.get('matched', 0)}/{f.get('traced-faults', 0)}",
        "-" if share is None else f"{100 * share:.0f}%",
        "ok" if g["memory-check"]["passed"] else "FAIL",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    print("| run | QEMU per vCPU / total ms | seed | modern | exact | guest per vCPU / all ms | noise floor ms "
          "| faults matched/traced | guest stall traced | memory |")
    print("|" + "---|" * 10)
    for arg in argv:
        name, _, path = arg.partition("=")
        with open(path) as fh:
            print(row(name, json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
