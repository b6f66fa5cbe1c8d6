"""Soak: many runs in one orchestrator process; its fds, RSS and shared memory must not grow.

Phase 1 repeats runs at ``--vcpus`` (default 256) for ``--minutes`` (default 10); phase 2 does
``--small-runs`` (default 50) small runs in a row.  All runs are in this process (the Python API's
``run_config``), so this process is the orchestrator being measured.  After every run it prints:
open fds, RSS, the malloc heap in use (glibc mallinfo2), its mappings of shared memory
(``/dev/shm`` or memfd in ``/proc/self/maps``) and
the ``pch-*`` entries in ``/dev/shm`` (those named after this process are the ones that count).

Fails (exit 1) when a run does not complete, or when, after the first run of a phase (warm-up:
imports), the fds or the shared mappings ever exceed that run's figure, an entry named after this
process is left in /dev/shm, or the median RSS or heap in use of the last quarter of the runs
exceeds that of the second quarter by more than ``--rss-slack-mib`` / ``--heap-slack-mib`` (memory
ramps up over the first runs, allocator arenas and freed memory glibc keeps, then stays; a leak
keeps growing).

Reproduce:  python bench/soak.py                                   # 10 minutes at 256 vCPUs + 50 small runs
            python bench/soak.py --minutes 1 --small-runs 10       # short
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

PROG = "soak"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="phase 1 length in minutes (default %(default)g)")
    p.add_argument("--vcpus", type=int, default=256, help="vCPUs of the phase 1 runs (default %(default)s)")
    p.add_argument("--ram", default="64M", help="guest RAM of the phase 1 runs (default %(default)s)")
    p.add_argument("--small-runs", type=int, default=50, help="phase 2: this many small runs (default %(default)s)")
    p.add_argument("--small-vcpus", type=int, default=2, help="vCPUs of a small run (default %(default)s)")
    p.add_argument("--small-ram", default="4M", help="guest RAM of a small run (default %(default)s)")
    p.add_argument("--rss-slack-mib", type=float, default=32.0,
                   help="RSS growth allowed over the warm-up run, MiB: freed memory glibc keeps (fragmentation "
                        "over runs of varying seeds) counts in RSS (default %(default)g)")
    p.add_argument("--heap-slack-mib", type=float, default=8.0,
                   help="growth of the malloc heap in use (a leak) allowed over the warm-up run, MiB "
                        "(default %(default)g)")
    args = p.parse_args(argv)
    if args.minutes < 0 or args.small_runs < 0 or args.vcpus < 1 or args.small_vcpus < 1:
        print(f"{PROG}: --minutes and --small-runs must be >= 0, --vcpus and --small-vcpus >= 1", file=sys.stderr)
        raise SystemExit(2)
    return args


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap_used_mib() -> float | None:
    """Bytes malloc has handed out and not got back (glibc mallinfo2: in-use chunks + mmapped
    blocks), in MiB; None without glibc 2.33+.  Unlike RSS it does not count freed memory the
    allocator keeps (fragmentation), so it is what a leak makes grow."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def sample() -> dict:
    """This process's fds, RSS and malloc heap in use (MiB), shared-memory mappings, and pch-*
    entries in /dev/shm."""
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if "/dev/shm/" in line or "/memfd:" in line)
    try:
        shm = [n for n in os.listdir("/dev/shm") if n.startswith("pch-")]
    except OSError:
        shm = []
    mine = [n for n in shm if n.startswith(f"pch-{os.getpid()}-")]
    return dict(fds=fds, rss_mib=rss_kib / 1024, heap_mib=heap_used_mib(), shm_maps=maps, dev_shm=len(shm),
                dev_shm_mine=len(mine))


def phase(name: str, cfg_of, count: int | None, minutes: float | None) -> list[dict]:
    """Run until ``count`` runs or ``minutes`` are done; a sample after each run."""
    from postcopy_harness import run_config

    rows: list[dict] = []
    t0 = time.monotonic()
    while (count is None or len(rows) < count) and (minutes is None or time.monotonic() - t0 < minutes * 60
                                                     or not rows):
        t = time.monotonic()
        rep = run_config(cfg_of(len(rows)), write=False)
        if rep["status"] != "completed":
            raise SystemExit(f"{PROG}: {name} run {len(rows) + 1} did not complete: {rep['error']}")
        row = dict(sample(), run=len(rows) + 1, s=time.monotonic() - t, at=time.monotonic() - t0)
        rows.append(row)
        print(f"{name:5} run {row['run']:4}  {row['at']:7.1f} s  took {row['s']:5.2f} s  fds {row['fds']:4}  "
              f"rss {row['rss_mib']:7.1f} MiB  heap {row['heap_mib'] or 0:6.1f} MiB  "
              f"shm-maps {row['shm_maps']:3}  /dev/shm pch-* {row['dev_shm']:3} "
              f"(ours {row['dev_shm_mine']})", flush=True)
    return rows


def growth(name: str, rows: list[dict], rss_slack_mib: float, heap_slack_mib: float = 8.0) -> list[str]:
    """What grew after the warm-up run (empty: nothing)."""
    if not rows:
        return []
    warm, later = rows[0], rows[1:]
    problems = []
    for key in ("fds", "shm_maps"):
        worst = max((r[key] for r in later), default=warm[key])
        if worst > warm[key]:
            problems.append(f"{name}: {key} grew from {warm[key]} (run 1) to {worst}")
    if any(r["dev_shm_mine"] for r in rows):
        problems.append(f"{name}: a /dev/shm entry named after this process was left")
    # memory ramps up over the first runs (allocator arenas, caches) and then stays: compare the last
    # quarter of the runs with the second quarter (run 1 alone with fewer than 8 runs)
    n = len(rows)
    base_rows, base_words = (rows[n // 4: n // 2], f"runs {n // 4 + 1}-{n // 2}") if n >= 8 else (rows[:1], "run 1")
    for key, label, slack in (("rss_mib", "RSS", rss_slack_mib), ("heap_mib", "malloc heap in use", heap_slack_mib)):
        base = [r[key] for r in base_rows if r.get(key) is not None]
        tail = [r[key] for r in later[-max(1, len(later) // 4):] if r.get(key) is not None]
        if base and tail and statistics.median(tail) > statistics.median(base) + slack:
            problems.append(f"{name}: {label} grew from a median of {statistics.median(base):.1f} MiB ({base_words}) "
                            f"to {statistics.median(tail):.1f} MiB over the last quarter (slack {slack:g} MiB)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from harness.config import ConfigError, RunConfig, parse_size
    except ImportError:
        print(f"{PROG}: the postcopy-harness package is not installed (pip install .)", file=sys.stderr)
        return 2
    try:
        big = RunConfig(vcpus=args.vcpus, ram=parse_size(args.ram), workload="random").validate()
        small = RunConfig(vcpus=args.small_vcpus, ram=parse_size(args.small_ram)).validate()
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: pid {os.getpid()}, start: {sample()}")
    import dataclasses

    def seeded(cfg):
        return lambda i: dataclasses.replace(cfg, seed=i + 1).validate()

    rows_big = phase("big", seeded(big), None, args.minutes) if args.minutes > 0 else []
    rows_small = phase("small", seeded(small), args.small_runs, None) if args.small_runs else []
    problems = (growth("big", rows_big, args.rss_slack_mib, args.heap_slack_mib)
                + growth("small", rows_small, args.rss_slack_mib, args.heap_slack_mib))
    for name, rows in (("big", rows_big), ("small", rows_small)):
        if rows:
            first, last = rows[0], rows[-1]
            print(f"{PROG}: {name}: {len(rows)} runs; fds {first['fds']} -> {last['fds']}, "
                  f"RSS {first['rss_mib']:.1f} -> {last['rss_mib']:.1f} MiB, "
                  f"heap in use {first['heap_mib'] or 0:.1f} -> {last['heap_mib'] or 0:.1f} MiB, "
                  f"shm-maps {first['shm_maps']} -> {last['shm_maps']}")
    for p in problems:
        print(f"{PROG}: FAIL {p}", file=sys.stderr)
    if not problems:
        print(f"{PROG}: ok: nothing grew")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
