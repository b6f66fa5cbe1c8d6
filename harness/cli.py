"""The ``postcopy-harness`` command line (argparse)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

EXIT_DEGRADED = 3  # run: completed, every page verified, but a vCPU worker was lost (killed mid-run)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one line, printed as is


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one postcopy migration end to end and report",
                       description="Start a source, a fault handler and N vCPU worker processes on the real "
                                   "userfaultfd, run a workload to completion, verify every page, tear down.",
                       epilog="exit status: 0 completed; 1 failed (also when every vCPU was killed); 2 bad input; "
                              "3 completed-degraded (some vCPU workers were killed mid-run: the others finished and "
                              "every page they read was verified, the report's workers.lost says which); 130 Ctrl-C; "
                              "143 SIGTERM")
    add_run_flags(p)
    from harness.restore import add_handler_flags

    add_handler_flags(p)  # run --handler CMD: someone else's fault handler (harness/restore.py)
    p.set_defaults(func=_run)


def add_run_flags(p, many_strategies: bool = False) -> None:
    """Every flag of ``run`` on parser ``p`` (``compare`` takes them too, with a list of strategies)."""
    from harness.config import LINK_MODES, RunConfig, size_arg
    from postcopy_core.handler import PLACE_MODES, WAKE_POLICIES
    from postcopy_core.link import LINK_UNITS
    from postcopy_core.plant import PLANTED_BUGS
    from vcpu_workers.workloads import WORKLOADS

    d = RunConfig()


    p.add_argument("--vcpus", type=int, default=d.vcpus, metavar="N",
                   help="vCPU worker processes, 1..4096 (default %(default)s)")
    p.add_argument("--non-vcpu", type=int, default=d.non_vcpu, metavar="N",
                   help="also N faulting processes that are not vCPUs (like a device model's DMA): served "
                        "like any fault, counted as non-vCPU by every engine (default %(default)s)")
    p.add_argument("--ram", type=size_arg, metavar="SIZE", default=None,
                   help="guest RAM size in bytes, K/M/G/T suffixes = KiB/MiB/GiB/TiB "
                        "(default 256M, or the size of --image)")
    p.add_argument("--backing", choices=("shmem", "hugetlb"), default=d.backing,
                   help="guest RAM in shmem (4 KiB pages) or hugetlbfs (2 MiB pages) (default %(default)s)")
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload,
                   help="the vCPUs' access pattern (default %(default)s)")
    p.add_argument("--link", default=d.link, metavar="BANDWIDTH[,LATENCY]",
                   help=f"the migration link, e.g. 1gbit,2ms; {LINK_UNITS} (default %(default)s)")
    p.add_argument("--link-mode", choices=LINK_MODES, default=d.link_mode,
                   help="model: the source's in-process link model applies --link; netns: the source runs in "
                        "its own network namespace behind a veth pair that tc shapes with --link (netem delay, "
                        "jitter, loss, rate; tbf for bandwidth alone), TCP between them (implies --transport "
                        "tcp; root, iproute2; removed after the run) (default %(default)s)")
    p.add_argument("--source", metavar="HOST:PORT",
                   help="migrate from a `postcopy-harness source --listen HOST:PORT` instead of forking a source "
                        "(needs --auth-key-file; --ram, --backing, --seed, --zero-share, --image must match "
                        "the source's) (default: fork one)")
    p.add_argument("--seed", type=int, metavar="N", default=d.seed,
                   help="seed of the RAM content and the access orders (default %(default)s)")
    p.add_argument("--zero-share", type=float, metavar="F", default=d.zero_share,
                   help="share of all-zero pages, 0..1 (default %(default)s)")
    p.add_argument("--image", metavar="FILE",
                   help="raw RAM image file to migrate instead of generated content (default: generated)")
    p.add_argument("--transport", choices=("unix", "tcp"), default=d.transport,
                   help="Unix socket pair or TCP on loopback (default %(default)s)")
    p.add_argument("--auth-key-file", metavar="FILE",
                   help="TCP: authenticate the page channels with the key in FILE (mode 600, >= 16 bytes) "
                        "instead of a fresh random key per run (default: a fresh key)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="with --source: run every channel over TLS with the x509 files in DIR, QEMU's layout "
                        "(ca-cert.pem, client-cert.pem, client-key.pem; ours alone, mode 600); the source's "
                        "certificate must name the --source host (default: no TLS)")
    p.add_argument("--write-ratio", type=float, metavar="F", default=d.write_ratio,
                   help="share of the vCPUs' accesses that are stores, 0..1; each store writes a value only it "
                        "could have written (an atomic increment on pages several vCPUs write: hotset, shared) and "
                        "is checked by later reads and in the final check of all RAM; 0: a read-only guest "
                        "(default %(default)s)")
    p.add_argument("--wake-policy", choices=WAKE_POLICIES, default=d.wake_policy,
                   help="after placing a page, wake only known waiters or every uffd (default %(default)s)")
    p.add_argument("--place", choices=PLACE_MODES, default=d.place,
                   help="how a page goes into guest RAM: copy = UFFDIO_COPY through a uffd; continue = written "
                        "into the page cache through the handler's own mapping, then UFFDIO_CONTINUE to the "
                        "vCPUs that wait (they register MINOR faults too) (default %(default)s)")
    p.add_argument("--no-background", dest="background", action="store_false",
                   help="the source sends only requested pages until the workload ends (pure demand paging; "
                        "the same as --strategy demand; default: a background stream too)")
    p.add_argument("--precopy", type=float, metavar="SECONDS", default=d.precopy,
                   help="send RAM for this long before postcopy while the guest dirties it (--dirty-rate); "
                        "pages dirtied since they were sent are discarded at the switchover and fault again "
                        "(default %(default)g: no precopy)")
    p.add_argument("--dirty-rate", type=float, metavar="PAGES_PER_S", default=d.dirty_rate,
                   help="pages the guest rewrites per second during --precopy (default %(default)g)")
    add_strategy_flags(p, many_strategies)
    p.add_argument("--pin", action="store_true",
                   help="pin the fault handler and the source to CPU 0 and the vCPU workers to CPU 1, "
                        "for comparisons with a pinned reference (default: not pinned)")
    p.add_argument("--live-engines", action="store_true",
                   help="feed the blocktime engines during the run (default: over the recorded events after it)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=d.timeout,
                   help="fail the run after this many seconds (default %(default)g)")
    p.add_argument("--inject", action="append", metavar="KIND@SECONDS[:HOLD][,vcpu=N]",
                   help="inject a fault SECONDS after the workload starts (repeatable): worker-crash (SIGKILL "
                        "vCPU N, default 0: the run ends completed-degraded), worker-stall / source-stall "
                        "(SIGSTOP, SIGCONT after HOLD s, default 2), handler-crash (fails the run); source-crash "
                        "(SIGKILL the source) and link-drop (shut the page channels down) are survived by "
                        "postcopy recovery: the destination pauses, a new source starts (after HOLD s if given) "
                        "and the run resumes; recovery-crash kills the next new source as it starts. The "
                        "report's recovery section says what happened (default: none)")
    p.add_argument("--plant-bug", metavar="KIND", choices=sorted(PLANTED_BUGS),
                   help="make the destination or source misbehave on purpose, to see the checks catch it: "
                        + "; ".join(f"{k}: {b.does} (caught as {b.caught_as})" for k, b in PLANTED_BUGS.items())
                        + " (default: none)")
    p.add_argument("--stall-timeout", type=stall_seconds, metavar="SECONDS|off", default=d.stall_timeout,
                   help="fail the run, naming who, when a vCPU, the source or the handler makes no progress "
                        "for this long (at least 3 page times of --link); a finite number, or off for no "
                        "watchdog (default %(default)g)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here (default: none)")
    p.add_argument("--trace", metavar="FILE",
                   help="record fault/placement events (replayable; .gz to compress) (default: none)")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, summary.txt, PNG plots and a Perfetto trace.json into DIR "
                        "(keeps the run's events for them; default: none)")
    p.add_argument("--live", action="store_true",
                   help="a live view of the vCPUs, pages and faults (plain lines when not on a terminal)")
    p.add_argument("--quiet", action="store_true", help="no progress line and no summary table")


def stall_seconds(text: str) -> float | str:
    """``--stall-timeout``'s value: ``off``, or a number (RunConfig refuses inf, nan and <= 0)."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of seconds nor off") from None


def add_strategy_flags(p, many: bool = False) -> None:
    """--strategy (one name, or a comma-separated list for compare), --prepage-window, --working-set."""
    from postcopy_core.strategies import DEFAULT_PREPAGE_WINDOW, DEFAULT_STRATEGY, STRATEGIES

    names = "; ".join(f"{name}: {cls.help}" for name, cls in STRATEGIES.items())
    if many:
        p.add_argument("--strategy", default="vanilla,preempt,prepage", metavar="NAME[,NAME...]",
                       help=f"the strategies to compare, comma-separated ({names}) (default %(default)s)")
    else:
        p.add_argument("--strategy", default=None, metavar="NAME",
                       help=f"what the source sends next: {names}. Default {DEFAULT_STRATEGY} (demand with "
                            "--no-background): the harness's behaviour before strategies, and the one that keeps "
                            "a fault's answer from waiting behind the stream (QEMU's own default is still vanilla; "
                            "preempt is the capability it added in 7.1 for that)")
    p.add_argument("--prepage-window", type=int, metavar="N", default=DEFAULT_PREPAGE_WINDOW,
                   help="prepage: pages pushed on each side of a faulting page, 1..4096 (default %(default)s)")
    p.add_argument("--working-set", metavar="FILE",
                   help="prefetch: a trace from an earlier run --trace; its faulted pages are streamed first, "
                        "in the order they were first touched (default: none)")


def _run(args) -> int:
    from harness.config import ConfigError, RunConfig, image_bytes

    fields = {k: getattr(args, k.replace("-", "_")) for k in RunConfig().as_dict()}
    try:
        if fields["ram"] is None:  # not given: the image's size, or the default
            fields["ram"] = image_bytes(args.image) if args.image else RunConfig().ram
        cfg = RunConfig(**fields)
        cfg.validate()
    except ConfigError as e:
        err.print(f"postcopy-harness run: {e}", highlight=False)
        return 2
    from harness.handler_process import HandlerError
    from harness.restore import handler_problem, handler_spec, run_handler_main

    try:
        spec = handler_spec(args)
    except HandlerError as e:
        err.print(f"postcopy-harness run: {e}")
        return 2
    problem = handler_problem(args, cfg, spec)
    if problem:
        err.print(f"postcopy-harness run: {problem}")
        return 2
    if spec is not None:  # someone else's fault handler, a memory file and no source (harness/restore.py)
        return run_handler_main(args, cfg, spec)
    problem = _run_outputs_problem(args, cfg)
    if problem:
        err.print(f"postcopy-harness run: {problem}")
        return 2
    from harness.progress import RunProgress
    from harness.runner import run_config

    # the same function the Python API and the pytest plugin use
    if args.live:
        from harness.live import LiveView

        progress = LiveView(cfg)
    else:
        progress = None if args.quiet else RunProgress(cfg.npages)
    rep = run_config(cfg, progress=progress, argv=getattr(args, "argv", None), write=False)
    return _run_exit(args, rep)


def _run_outputs_problem(args, cfg) -> str | None:
    """What makes the run's outputs or its memory impossible, found before any process starts."""
    from harness.report_dir import report_dir_problem
    from harness.run import check_memory
    from harness.supervise import RunFailed

    for flag, path in (("--json", args.json), ("--trace", args.trace)):
        problem = unwritable(path)
        if problem:  # before the run, so its results are not lost at the end
            return f"{flag} {path}: {problem}"
    problem = report_dir_problem(args.report)
    if problem:
        return f"--report {args.report}: {problem}"
    try:
        check_memory(cfg)  # a --ram the host cannot hold is bad input: say so before any process starts
    except RunFailed as e:
        return str(e)
    return None


def _run_exit(args, rep: dict) -> int:
    """Write --json, print the summary and the outcome; the run's exit code."""
    from harness.report import lost_words, print_summary, write_json

    error = rep["error"]
    write_error = rep.get("report-error")
    if args.json:
        try:
            write_json(rep, args.json)
        except OSError as e:  # checked before the run, so rare (disk full): the summary still shows
            write_error = f"cannot write --json {args.json}: {e.strerror}"
    if not args.quiet:
        print_summary(rep)
    if args.report and not write_error:
        from harness.report_dir import wrote_line

        print(wrote_line(args.report))
    if write_error:
        err.print(f"postcopy-harness run: {write_error}")
        return 1
    if rep["status"] == "completed-degraded":  # every page verified, but without some workers
        err.print(f"postcopy-harness run: completed-degraded: lost {lost_words(rep)}; the others finished "
                  "and every page they read was verified", highlight=False)
        return EXIT_DEGRADED
    if rep["status"] != "completed":
        err.print(f"postcopy-harness run: failed: {rep['error']}", highlight=False)
        return {"interrupted": 130, "terminated": 143}.get(error, 1)
    return 0


def unwritable(path: str | None) -> str | None:
    """Why ``path`` cannot take an output file (None if it can): found now, not after a long run.
    Nothing is left behind, so a run that fails early leaves no empty file."""
    from postcopy_core.outfile import output_problem

    return output_problem(path)


def _add_source(sub) -> None:
    from harness.config import RunConfig, size_arg
    from postcopy_core.link import LINK_UNITS

    d = RunConfig()


    p = sub.add_parser("source", help="serve a RAM image to a `run --source` elsewhere",
                       description="Serve a RAM image over TCP until one destination (postcopy-harness run "
                                   "--source HOST:PORT) has migrated it, or Ctrl-C. Every connection proves it "
                                   "knows the key of --auth-key-file (HMAC-SHA256 challenge-response both ways).",
                       epilog="exit status: 0 a destination got every page; 1 failed; 2 bad input; 130 Ctrl-C")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where to listen; ':PORT' or 'PORT' binds loopback (127.0.0.1), any other host only "
                        "when given explicitly; port 0 = any (the port is printed)")
    p.add_argument("--auth-key-file", required=True, metavar="FILE",
                   help="the key both sides prove they know (mode 600, >= 16 bytes)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="serve over TLS only, with the x509 files in DIR, QEMU's layout (ca-cert.pem, "
                        "server-cert.pem, server-key.pem; ours alone, mode 600); a destination must show a "
                        "client certificate from that CA (default: no TLS)")
    p.add_argument("--ram", type=size_arg, metavar="SIZE", default=None,
                   help="RAM size, K/M/G/T = KiB..TiB (default 256M, or the size of --image)")
    p.add_argument("--backing", choices=("shmem", "hugetlb"), default=d.backing,
                   help="page size of the destination's guest RAM: shmem 4 KiB, hugetlb 2 MiB (default %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", default=d.seed,
                   help="seed of the RAM content (default %(default)s)")
    p.add_argument("--zero-share", type=float, metavar="F", default=d.zero_share,
                   help="share of all-zero pages, 0..1 (default %(default)s)")
    p.add_argument("--image", metavar="FILE", help="raw RAM image file to serve (default: generated content)")
    p.add_argument("--link", default=d.link, metavar="BANDWIDTH[,LATENCY]",
                   help=f"apply the in-process link model here; {LINK_UNITS} (default %(default)s)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=None,
                   help="give up when no destination connected within this long (default: wait)")
    p.add_argument("--quiet", action="store_true", help="no 'listening on' and 'migrated' lines")
    p.set_defaults(func=_source)


def _source(args) -> int:
    from harness.config import ConfigError, RunConfig, image_bytes, parse_endpoint, typed
    from harness.remote_source import serve
    from postcopy_core.tls import TlsError, server_context

    try:
        ram = args.ram if args.ram is not None else image_bytes(args.image) if args.image else RunConfig().ram
        cfg = RunConfig(ram=ram, backing=args.backing, seed=args.seed, zero_share=args.zero_share, image=args.image,
                        link=args.link, transport="tcp", auth_key_file=args.auth_key_file, vcpus=1).validate()
        parse_endpoint(args.listen, "--listen")
        if args.timeout is not None and not args.timeout > 0:
            raise ConfigError("--timeout must be positive")
        tls = server_context(args.tls_creds) if args.tls_creds is not None else None
    except (ConfigError, ValueError, TlsError) as e:
        err.print(f"postcopy-harness source: {e}")
        return 2
    try:
        return serve(cfg, args.listen, args.quiet, args.timeout, tls)
    except OSError as e:  # AuthError, ConnectionError, a dead destination: one line
        err.print(f"postcopy-harness source: failed: {e.strerror or e}")
        return 1
    except MemoryError:
        err.print(f"postcopy-harness source: failed: not enough memory for --ram {typed(cfg.ram)}")
        return 1


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="probe the host: can postcopy run here?")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--vcpus", type=int, metavar="N", default=4,
                   help="check fd/process limits for this many vCPUs, 1..4096 (default %(default)s)")
    p.add_argument("--netns", action="store_true",
                   help="also require what --link-mode netns needs: root, iproute2 (ip, tc), a network "
                        "namespace with a veth pair, tc tbf; netem (latency, jitter, loss) is shown either way")
    p.add_argument("--qemu", nargs="?", const="qemu-system-x86_64", default=None, metavar="BINARY",
                   help="also require what `qemu` needs: QEMU (default qemu-system-x86_64) with the blocktime "
                        "trace events, the guest; KVM is shown either way")
    p.set_defaults(func=_check)


def _check(args) -> int:
    from harness.check import main as check_main

    return check_main(args)


def build_parser() -> argparse.ArgumentParser:
    from harness.cliparser import OneLineParser, add_version_everywhere

    parser = OneLineParser(
        prog="postcopy-harness",
        description="The destination side of QEMU's postcopy live migration, across real processes "
                    "on the real Linux userfaultfd.",
        epilog="With no COMMAND (or only options), the command is run: 'postcopy-harness --vcpus 2' is "
               "'postcopy-harness run --vcpus 2'. COMMAND --help shows its options, defaults and units.")
    from harness import tool_version

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_source(sub)
    _add_check(sub)
    from harness import compare, demo, loadtest, qemu_cmd, replay

    replay.add_parser(sub)
    qemu_cmd.add_parser(sub)
    loadtest.add_parser(sub)
    compare.add_parser(sub)
    demo.add_parser(sub)
    from harness import restore

    restore.add_parser(sub)
    add_version_everywhere(parser, f"postcopy-harness {tool_version()}")  # after every subcommand exists
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]  # the bare command is `run`: `postcopy-harness --vcpus 2` = `run --vcpus 2`
    args = parser.parse_args(argv)
    args.argv = [parser.prog, *argv]  # for the reports (main may be called with its own argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        from harness.run import Terminated

        word, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        err.print(f"postcopy-harness {args.command}: {word}")
        return code


if __name__ == "__main__":
    sys.exit(main())
