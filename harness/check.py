"""``postcopy-harness check``: print the host probe as a table or JSON; exit 0 only if postcopy can run
(and, with ``--netns``, ``run --link-mode netns`` too)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from harness.config import MAX_VCPUS
from harness.report import output_console
from postcopy_core.probe import as_dict, can_run, probe


def main(args) -> int:
    if not 1 <= args.vcpus <= MAX_VCPUS:  # the range run accepts
        Console(stderr=True, soft_wrap=True, markup=False, highlight=False).print(
            f"postcopy-harness check: --vcpus {args.vcpus}: must be 1..{MAX_VCPUS}")
        return 2
    checks = probe(args.vcpus)
    from harness.netns import netns_checks

    checks += netns_checks(required=getattr(args, "netns", False))  # run --link-mode netns
    if getattr(args, "qemu", None):
        from harness.qemu_run import qemu_checks

        checks += qemu_checks(args.qemu, required=True)  # postcopy-harness qemu
    if args.json:
        print(json.dumps(as_dict(checks), indent=2))
    else:
        t = Table(title="postcopy-harness check: can postcopy run on this host?")
        t.add_column("check")
        t.add_column("", justify="center")
        t.add_column("detail")
        for c in checks:
            mark = ("[green]ok[/]" if c.ok else "[dim]-[/]" if c.skipped
                    else "[red]FAIL[/]" if c.required else "[yellow]no[/]")
            t.add_row(c.name, mark, c.detail)
        out = output_console()
        out.print(t)
        out.print("postcopy can run here" if can_run(checks) else "[red]postcopy cannot run here[/]")
    return 0 if can_run(checks) else 1
