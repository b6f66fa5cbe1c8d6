"""``restore`` and ``run --handler``: snapshot restore from a memory file, by someone's handler or ours.

``restore --mem-file FILE`` is the Firecracker/CRIU model: guest RAM is the file's size, there is
no migration source, and the fault handler serves each fault from the file.  With ``--handler
CMD`` that handler is the user's (harness/external.py); without it the built-in one runs, fed from
the same file (its page server reads the file and answers only what the vCPUs fault on: no
background stream, no link model), so both can be compared side by side on the same file.
``run --handler CMD`` is the same against a memory file the harness writes from its seeded content.
"""

from __future__ import annotations

import argparse

from harness.handler_process import HANDOFFS, HandlerError, HandlerSpec

# what a run against an external handler takes from the command line; any other flag given (one
# about the source, its link, the built-in handler, a report of its events) is refused with --handler
USED_WITH_HANDLER = frozenset({
    "command", "func", "argv", "flag_defaults", "vcpus", "non_vcpu", "ram", "mem_file", "workload", "seed",
    "zero_share", "image", "write_ratio", "pin", "timeout", "stall_timeout", "json", "csv", "quiet", "repeat",
    "backing", "handler", "handoff", "handler_per_uffd", "remove_rate", "fork_events",
    "unmap_events"})


def add_handler_flags(p: argparse.ArgumentParser, events: bool = True) -> None:
    """--handler, --handoff, --handler-per-uffd, and --remove-rate, --fork-events unless ``events`` is
    false (run, restore, loadtest, compare); call it after the command's other flags: it records their
    defaults."""
    p.add_argument("--handler", metavar="CMD",
                   help="an external userfaultfd handler to test instead of the built-in one: a command line, "
                        "split as a shell would (docs/handler-protocol.md says what it is handed) "
                        "(default: the built-in one)")
    p.add_argument("--handoff", choices=HANDOFFS, default="pch",
                   help="how --handler gets the uffds: pch (this project's protocol, $PCH_HANDLER_SOCKET) or "
                        "firecracker (CMD SOCKET MEMFILE, one connection per uffd with Firecracker's "
                        "region-mapping JSON) (default %(default)s)")
    if events:
        p.add_argument("--fork-events", action="store_true",
                       help="with --handler: each vCPU forks a child mid-run that reads its next pages, so the "
                            "handler gets UFFD_EVENT_FORK with a new uffd it must serve (default: off)")
        p.add_argument("--unmap-events", action="store_true",
                       help="with --handler: each vCPU unmaps a piece of guest RAM mid-run and maps it back, and "
                            "moves another with mremap, so the handler gets UFFD_EVENT_UNMAP and UFFD_EVENT_REMAP "
                            "and must serve both pieces' later faults (default: off)")
        p.add_argument("--remove-rate", type=float, default=0.0, metavar="R",
                       help="with --handler: after each access a vCPU gives its page back (MADV_REMOVE, as a balloon "
                            "does) with probability R, 0..1, so the handler gets UFFD_EVENT_REMOVE and must serve "
                            "zeros there next (workloads sequential, random, stride) (default 0: never)")
    p.add_argument("--handler-per-uffd", action="store_true",
                   help="with --handoff firecracker: start one handler process per uffd (each its own socket), "
                        "for handlers that accept one connection only (default: one process for all)")
    # dest -> (its flag, its default): what unused_flag() compares against
    p.set_defaults(flag_defaults={a.dest: (a.option_strings[0], a.default) for a in p._actions if a.option_strings})


def unused_flag(args) -> str | None:
    """The first flag given that a run against an external handler would not use, or None."""
    for dest, (flag, default) in getattr(args, "flag_defaults", {}).items():
        if dest not in USED_WITH_HANDLER and getattr(args, dest, default) != default:
            return flag
    return None


def handler_spec(args) -> HandlerSpec | None:
    """The --handler flags as a HandlerSpec (None: the built-in handler); HandlerError on bad input."""
    if getattr(args, "handler", None) is None:
        if getattr(args, "handler_per_uffd", False) or getattr(args, "handoff", "pch") != "pch":
            raise HandlerError("--handoff and --handler-per-uffd need --handler CMD")
        return None
    return HandlerSpec.parse(args.handler, args.handoff, args.handler_per_uffd)


def refuse_remove_rate(args, cfg) -> str | None:
    """Why --remove-rate cannot be used here (None if it can)."""
    if getattr(args, "fork_events", False) and getattr(args, "handler", None) is None:
        return "--fork-events needs --handler: the built-in handler does not serve UFFD_EVENT_FORK"
    if getattr(args, "unmap_events", False) and getattr(args, "handler", None) is None:
        return "--unmap-events needs --handler: the built-in handler does not serve UFFD_EVENT_UNMAP/REMAP"
    rate = getattr(args, "remove_rate", 0.0)
    if not rate:
        return None
    if not 0 < rate <= 1:
        return f"--remove-rate {rate:g}: a share of accesses, 0..1"
    if getattr(args, "handler", None) is None:
        return "--remove-rate needs --handler: the built-in handler does not serve UFFD_EVENT_REMOVE"
    if cfg.workload not in ("sequential", "random", "stride"):
        return "--remove-rate needs a workload where each page has one vCPU (sequential, random, stride)"
    if cfg.non_vcpu:
        return "--remove-rate with --non-vcpu: a non-vCPU process would read pages a vCPU is giving back"
    return None


def refuse_with_handler(args, cfg) -> str | None:
    """Why these flags cannot go with --handler (None if they can)."""
    flag = unused_flag(args)
    if flag:
        return (f"{flag} is not for --handler (a restore from a memory file: no source, no migration link, "
                "no built-in handler)")
    if cfg is not None and cfg.backing != "shmem":
        return "--handler runs on --backing shmem only"
    return None


def handler_problem(args, cfg, spec: HandlerSpec | None) -> str | None:
    """Why the --handler and --remove-rate flags cannot go with the rest (None if they can)."""
    import shutil

    from harness.cli import unwritable

    problem = refuse_remove_rate(args, cfg) or (refuse_with_handler(args, cfg) if spec is not None else None)
    if not problem and spec is not None and shutil.which(spec.command[0]) is None:
        problem = f"--handler: {spec.command[0]!r} is not a command here (not found, or not executable)"
    if problem:
        return problem
    json_problem = unwritable(getattr(args, "json", None))
    return f"--json {args.json}: {json_problem}" if json_problem else None


def run_handler_main(args, cfg, spec: HandlerSpec, mode: str = "run") -> int:
    """Run ``cfg`` against ``spec``, print and write the report; the command's exit status."""
    from harness.cli import EXIT_DEGRADED, err
    from harness.external_report import print_external_summary, run_external
    from harness.report import lost_words

    rep = run_external(cfg, spec, getattr(args, "argv", None), mode, getattr(args, "remove_rate", 0.0),
                       getattr(args, "fork_events", False), getattr(args, "unmap_events", False))
    if not args.quiet:
        print_external_summary(rep)
    if rep["status"] == "completed-degraded":
        err.print(f"postcopy-harness {mode}: completed-degraded: lost {lost_words(rep)}")
        return EXIT_DEGRADED
    if rep["status"] != "completed":
        err.print(f"postcopy-harness {mode}: failed: {rep['error']}")
        return {"interrupted": 130, "terminated": 143}.get(rep["error"], 1)
    return 0


def add_parser(sub) -> None:
    from harness.config import RunConfig, size_arg
    from vcpu_workers.workloads import WORKLOADS

    d = RunConfig()


    p = sub.add_parser("restore", help="snapshot restore: vCPUs fault on a memory file served on demand",
                       description="Restore guest RAM from a memory file on demand, as Firecracker and CRIU do: "
                                   "N vCPU worker processes fault on it, a fault handler (yours with --handler, "
                                   "else the built-in one) serves each fault from the file; every read and store "
                                   "is checked, and all of RAM once every process is gone.",
                       epilog="exit status: 0 completed; 1 failed; 2 bad input; 3 completed-degraded")
    p.add_argument("--mem-file", metavar="FILE",
                   help="the memory file (raw guest RAM; its size is the RAM size); default: the harness writes "
                        "one from its seeded content (--ram, --seed, --zero-share)")
    p.add_argument("--ram", type=size_arg, default=None, metavar="SIZE",
                   help="RAM size when the harness writes the file (default 256M)")
    p.add_argument("--seed", type=int, default=d.seed, help="content seed of the written file (default %(default)s)")
    p.add_argument("--zero-share", type=float, default=d.zero_share, metavar="FRACTION",
                   help="share of all-zero pages in the written file (default %(default)s)")
    p.add_argument("--vcpus", type=int, default=d.vcpus, metavar="N",
                   help="vCPU worker processes (default %(default)s)")
    p.add_argument("--non-vcpu", type=int, default=0, metavar="N", help="also N non-vCPU faulting processes")
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload, help="access pattern (default %(default)s)")
    p.add_argument("--write-ratio", type=float, default=d.write_ratio, metavar="R",
                   help="share of accesses that store, each checked (default %(default)s)")
    p.add_argument("--pin", action="store_true", help="handler on CPU 0, workers on CPU 1")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="SECONDS")
    p.add_argument("--stall-timeout", type=float, default=d.stall_timeout, metavar="SECONDS",
                   help="a vCPU that waits this long fails the run, naming the handler and why (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    add_handler_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from harness.cli import err
    from harness.config import ConfigError, RunConfig, image_bytes

    try:
        spec = handler_spec(args)
        ram = args.ram
        if args.mem_file:
            if args.ram is not None:
                raise ConfigError("--ram is the size of --mem-file: leave it out")
            ram = image_bytes(args.mem_file)
        cfg = RunConfig(vcpus=args.vcpus, non_vcpu=args.non_vcpu, ram=ram or RunConfig().ram, seed=args.seed,
                        zero_share=args.zero_share, image=args.mem_file, workload=args.workload,
                        write_ratio=args.write_ratio, pin=args.pin, timeout=args.timeout,
                        stall_timeout=args.stall_timeout, background=False, json=args.json)
        cfg.validate()
    except (ConfigError, HandlerError) as e:
        err.print(f"postcopy-harness restore: {e}")
        return 2
    problem = handler_problem(args, cfg, spec)
    if problem:
        err.print(f"postcopy-harness restore: {problem}")
        return 2
    if spec is not None:
        return run_handler_main(args, cfg, spec, mode="restore")
    return _builtin(args, cfg)


def _builtin(args, cfg) -> int:
    """The built-in handler on the same file: demand paging only, from a page server reading the file."""
    from harness.cli import EXIT_DEGRADED, err
    from harness.external_report import handler_words
    from harness.report import print_summary, write_json
    from harness.runner import run_config

    rep = run_config(cfg, argv=getattr(args, "argv", None), write=False)
    rep["mode"] = "restore"
    rep["handler"]["kind"] = handler_words(None)["kind"]
    if cfg.json:
        write_json(rep, cfg.json)
    if not args.quiet:
        print_summary(rep)
    if rep["status"] == "completed-degraded":
        return EXIT_DEGRADED
    if rep["status"] != "completed":
        err.print(f"postcopy-harness restore: failed: {rep['error']}")
        return 1
    return 0
