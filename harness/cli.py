"""The ``postcopy-harness`` command line (argparse)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one line, printed as is


def _add_run(sub) -> None:
    from harness.config import RunConfig, parse_size
    from postcopy_core.handler import WAKE_POLICIES
    from vcpu_workers.workloads import WORKLOADS

    d = RunConfig()

    def size(text: str) -> int:  # argparse shows an ArgumentTypeError's own message
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = sub.add_parser("run", help="run one postcopy migration end to end and report",
                       description="Start a source, a fault handler and N vCPU worker processes on the real "
                                   "userfaultfd, run a workload to completion, verify every page, tear down.")
    p.add_argument("--vcpus", type=int, default=d.vcpus, help=f"vCPU worker processes (default {d.vcpus})")
    p.add_argument("--ram", type=size, default=d.ram, help="guest RAM size, K/M/G suffixes (default 256M)")
    p.add_argument("--backing", choices=("shmem", "hugetlb"), default=d.backing)
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload)
    p.add_argument("--link", default=d.link, help="BANDWIDTH[,LATENCY], e.g. 1gbit,2ms (default unlimited)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the RAM content and the access orders")
    p.add_argument("--zero-share", type=float, default=d.zero_share, help="share of all-zero pages (0..1)")
    p.add_argument("--image", help="raw RAM image file to migrate instead of generated content")
    p.add_argument("--transport", choices=("unix", "tcp"), default=d.transport)
    p.add_argument("--auth-key-file", metavar="FILE",
                   help="TCP: authenticate the page channels with the key in FILE (mode 600, >= 16 bytes) "
                        "instead of a fresh random key per run")
    p.add_argument("--write-ratio", type=float, default=d.write_ratio, help="share of accesses that are stores")
    p.add_argument("--wake-policy", choices=WAKE_POLICIES, default=d.wake_policy,
                   help="after placing a page, wake only known waiters or every uffd")
    p.add_argument("--no-background", dest="background", action="store_false",
                   help="the source sends only requested pages until the workload ends (pure demand paging, "
                        "as ../shared/bench measures)")
    p.add_argument("--pin", action="store_true",
                   help="pin the fault handler and the source to CPU 0 and the vCPU workers to CPU 1 "
                        "(what ../shared/bench's -A does), for comparisons")
    p.add_argument("--live-engines", action="store_true",
                   help="feed the blocktime engines during the run (default: over the recorded events after it)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="fail the run after this many seconds")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--trace", metavar="FILE", help="record fault/placement events (replayable; .gz to compress)")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from harness.config import ConfigError, RunConfig

    fields = {k: getattr(args, k.replace("-", "_")) for k in RunConfig().as_dict()}
    cfg = RunConfig(**fields)
    try:
        cfg.validate()
    except ConfigError as e:
        err.print(f"postcopy-harness run: {e}", highlight=False)
        return 2
    from harness.report import build_report, print_summary, write_json
    from harness.run import execute
    from harness.supervise import RunFailed
    from postcopy_core.kernel import KernelError

    raw, error = None, None
    try:
        raw = execute(cfg)
    except KeyboardInterrupt:
        error = "interrupted"
    except (RunFailed, KernelError, OSError, ValueError, RuntimeError) as e:
        error = str(e)
    rep = build_report(cfg, raw, error)
    if args.json:
        write_json(rep, args.json)
    if not args.quiet:
        print_summary(rep)
    if rep["status"] != "completed":
        err.print(f"postcopy-harness run: failed: {rep['error']}", highlight=False)
        return 130 if error == "interrupted" else 1
    return 0


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="probe the host: can postcopy run here?")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--vcpus", type=int, default=4, help="check fd/process limits for this many vCPUs")
    p.set_defaults(func=_check)


def _check(args) -> int:
    from harness.check import main as check_main

    return check_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postcopy-harness",
        description="The destination side of QEMU's postcopy live migration, across real processes "
                    "on the real Linux userfaultfd.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_check(sub)
    from harness import loadtest, replay

    replay.add_parser(sub)
    loadtest.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["run"]  # the no-argument job: the embedded default run
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        err.print(f"postcopy-harness {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
