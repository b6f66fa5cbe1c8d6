"""``demo qemu``: a real VM migrated in postcopy; the guest's stalls against what QEMU's trace saw."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console


def qemu_demo(args: argparse.Namespace, console: Console) -> int:
    """Two local QEMUs, a throttled postcopy, the picture of stalls and traced faults per vCPU."""
    from harness.demo import DemoError, _explain, _written
    from harness.qemu_cmd import _write_report, notes, render
    from harness.qemu_compare import compare
    from harness.qemu_run import QemuRunConfig, QemuRunError, migrate, missing
    from harness.report import provenance

    cfg = QemuRunConfig(smp=2, mem=128 << 20, postcopy_bandwidth=50e6, precopy_s=0.5,
                        noise_s=1.0 if args.fast else 2.0)
    problem = missing(cfg)
    if problem:
        raise DemoError(problem, 2)
    _explain(console, args, "qemu: a real VM, migrated in postcopy, measured by its own clock", [
        "Two QEMUs on this host: the source boots the harness's guest (a boot sector whose two vCPUs",
        "walk RAM and log every gap in their TSC), the destination waits with postcopy-blocktime on and",
        "its blocktime events traced.  Postcopy runs at 400 Mbit/s, so the vCPUs fault on pages still on",
        "the source.  Watch QEMU's all-vCPUs total against the guest's, and in guest-vs-trace.png which",
        "stalls QEMU's trace saw (blue under red) and which it never did.",
    ])
    started = provenance(argv=args.argv)
    with tempfile.TemporaryDirectory(prefix="pch-demo-qemu-") as tmp:
        folder = args.report or tmp
        os.makedirs(folder, exist_ok=True)
        try:
            rep = {**started, **compare(migrate(cfg, Path(folder) / "qemu-trace.log"))}
        except QemuRunError as exc:
            raise DemoError(str(exc), 1) from None
        console.print(render(rep))
        for line in notes(rep):
            console.print(line, markup=False)
        if args.report:
            _write_report(folder, rep)
            _written(console, folder, ["guest-vs-trace.png", "guest-vs-qemu.png", "timeline.png", "report.json"])
        else:
            console.print("(--report DIR draws the picture: guest-vs-trace.png)")
    return 0 if rep["guest"]["memory-check"]["passed"] else 1
