"""Where the time of one fault goes: the share of each crossing and syscall, at 1 and 8 vCPUs.

A fault's path: the vCPU touches a missing page -> the handler has read the fault from the uffd ->
the request is written (send on the return path) -> the source has read it (recv) -> the source
has written the page (sendmsg) -> the handler has read the page (recv) -> the handler enters
UFFDIO_COPY -> the vCPU runs again (the copy, its wake-up and the vCPU's scheduling: the woken vCPU
often runs on the other CPU before the handler's ioctl has even returned, so "copy done" is no
point on the vCPU's path; the ioctl's own duration, enter to the handler's placement stamp, is
shown apart).  Each step is timed with CLOCK_MONOTONIC stamps taken by the processes
themselves or by the kernel for them, never guessed:
  - the worker's own stamps around the faulting access (the results area: start and latency),
  - the handler's event records: fault read (``F``), page placed right after the copy (``P``),
  - the kernel's syscall tracepoints (``perf record -k mono -e raw_syscalls:*``: the same clock)
    for the handler's send/recv/ioctl and the source's recv/sendmsg.
For every faulting access, each step's end is the first matching stamp after the previous step's
end (its page for F and P).  With one vCPU a fault is alone on the path, so the match is exact;
with several, a request or an answer may ride in a syscall that carries a neighbour's too, and a
step can be credited to the syscall of the batch it rode in (the end-to-end total stays exact).
Tracing costs each traced syscall about a microsecond, so the total is a little above an
untraced run's p50.  Without perf (or ``--no-perf``) only the three stamp-only steps are shown.

Reproduce:  python bench/fault_breakdown.py --vcpus 1,8 --ram 32M        (as root, ~1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:  # the installed package (plain or editable), not this checkout's files by path
    import numpy as np

    from harness.config import ConfigError, RunConfig, parse_size
except ImportError as e:
    sys.exit(f"bench/fault_breakdown.py needs postcopy-harness installed (pip install . or pip install -e .): {e}")

PROG = "fault_breakdown"
# x86-64 syscall numbers: what the fault path's processes call (csrc/dest.c, csrc/source.c)
NR_READ, NR_IOCTL, NR_SENDTO, NR_RECVFROM, NR_SENDMSG = 0, 16, 44, 45, 46
TRACED = (NR_READ, NR_IOCTL, NR_SENDTO, NR_RECVFROM, NR_SENDMSG)
STEPS = (
    ("fault -> handler has read it", "the vCPU's fault waits in the uffd; the handler wakes, epoll, read(uffd)"),
    ("-> request written", "the handler decides, send() of REQ_PAGES on the return path"),
    ("-> source has read it", "a crossing: the source wakes (poll) and recv()s the request"),
    ("-> source has written the page", "the source's sendmsg() of the page frame"),
    ("-> handler has read the page", "a crossing: the handler wakes (epoll) and recv()s the frame"),
    ("-> UFFDIO_COPY entered", "parse the frame, find the waiters, enter the ioctl"),
    ("-> vCPU runs again", "the copy, its wake-up, the vCPU scheduled and taking its stamp"),
)
NO_PERF_STEPS = (STEPS[0][0], "-> vCPU runs again (request, source, answer, copy, wake)")


class BenchError(RuntimeError):
    """Bad input or an unusable machine; one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fault_breakdown.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vcpus", default="1,8", metavar="LIST", help="comma list of vCPU counts (default 1,8)")
    ap.add_argument("--ram", default="32M", help="guest RAM (default 32M; every page faults once)")
    ap.add_argument("--no-perf", action="store_true", help="stamps only: three steps, no syscall tracing")
    ap.add_argument("--json", metavar="FILE", help="write every step's statistics here")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one run, stamps to --out
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def config(n: int, ram: int, report: str) -> RunConfig:
    """Pure demand paging, sequential slices: every fault takes the whole path once."""
    return RunConfig(vcpus=n, ram=ram, workload="sequential", background=False, report=report)


# ------------------------------------------------------------------ the run (child process)


def child(n: int, ram: int, out: str) -> int:
    """One harness run; its stalls and the handler's records go to ``out`` (npz)."""
    from harness.run import execute

    with tempfile.TemporaryDirectory() as tmp:  # --report only makes the run keep its material
        raw = execute(config(n, ram, tmp))
    _meta, cols = raw["material"]
    st = cols.stalls
    np.savez(out, kind=cols.kind, t=cols.t_ns, addr=cols.addr, vcpu=cols.vcpu,
             s_vcpu=st.vcpu, s_start=st.start_ns, s_end=st.end_ns, s_addr=st.addr)
    return 0


# ------------------------------------------------------------------ tracing


def perf_usable() -> str | None:
    """Why ``perf record -k mono`` of syscall tracepoints cannot run here (None: it can)."""
    if not shutil.which("perf"):
        return "perf is not installed"
    p = subprocess.run(["perf", "record", "-q", "-k", "mono", "-e", "raw_syscalls:sys_exit", "-o", os.devnull,
                        "--", "true"], capture_output=True, text=True)
    if p.returncode:
        return "perf cannot record syscall tracepoints here: " + " ".join(p.stderr.split())[:120]
    return None


def traced_run(n: int, ram: int, tmp: str, use_perf: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the child (under perf if asked): its stamps and, per (process, syscall, enter|exit), the times."""
    out = os.path.join(tmp, f"run{n}.npz")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--ram", str(ram), "--out", out]
    data = os.path.join(tmp, f"perf{n}.data")
    filt = " || ".join(f"id == {i}" for i in TRACED)
    if use_perf:
        cmd = ["perf", "record", "-q", "-k", "mono", "-m", "16M", "-e", "raw_syscalls:sys_enter",
               "--filter", filt, "-e", "raw_syscalls:sys_exit", "--filter", filt, "-o", data, "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        said = " ".join((p.stderr.strip().splitlines() or ["no output"])[-1].split())
        raise BenchError(f"the run at {n} vCPUs failed: {said}")
    stamps = dict(np.load(out))
    calls: dict[str, np.ndarray] = {}
    if use_perf:
        text = subprocess.run(["perf", "script", "-i", data, "-F", "comm,time,event,trace", "--ns"],
                              capture_output=True, text=True).stdout
        calls = parse_perf(text)
    return stamps, calls


def parse_perf(text: str) -> dict[str, np.ndarray]:
    """``perf script`` lines -> {"pch-fault exit 45": times ns (sorted), ...}; exits with ret <= 0 left out."""
    acc: dict[str, list[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] not in ("pch-fault", "pch-source"):
            continue
        try:
            t = int(round(float(parts[1].rstrip(":")) * 1e9))
            nr = int(parts[4])
        except ValueError:
            continue
        if parts[2].endswith("sys_exit:"):
            if int(parts[-1]) <= 0:  # EAGAIN and EOF carry nothing
                continue
            key = f"{parts[0]} exit {nr}"
        else:
            key = f"{parts[0]} enter {nr}"
        acc.setdefault(key, []).append(t)
    return {k: np.sort(np.array(v, dtype=np.int64)) for k, v in acc.items()}


# ------------------------------------------------------------------ matching


def _first_at_or_after(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per element of t, the first of ``times`` >= it (-1 if none)."""
    if times.size == 0:
        return np.full(t.shape, -1, dtype=np.int64)
    i = np.searchsorted(times, t, side="left")
    return np.where(i < times.size, times[np.minimum(i, times.size - 1)], -1)


def _last_before(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    if times.size == 0:
        return np.full(t.shape, -1, dtype=np.int64)
    i = np.searchsorted(times, t, side="right") - 1
    return np.where(i >= 0, times[np.maximum(i, 0)], -1)


def breakdown(stamps: dict, calls: dict[str, np.ndarray]) -> dict:
    """Per faulting access the end of every step; their durations (ns) as a (faults, steps) array."""
    kind, t, addr, vcpu = stamps["kind"], stamps["t"], stamps["addr"], stamps["vcpu"]
    fault, placed = kind == 0, kind == 1
    # the handler's F record of this vCPU and page, and the page's P record
    f_key = {(int(v), int(a)): int(x) for v, a, x in zip(vcpu[fault], addr[fault], t[fault], strict=True)}
    p_key = {int(a): int(x) for a, x in zip(addr[placed], t[placed], strict=True)}
    s0, s_end = stamps["s_start"], stamps["s_end"]
    t_read = np.array([f_key.get((int(v), int(a)), -1) for v, a in zip(stamps["s_vcpu"], stamps["s_addr"],
                                                                        strict=True)], dtype=np.int64)
    t_placed = np.array([p_key.get(int(a), -1) for a in stamps["s_addr"]], dtype=np.int64)
    ok = (t_read >= s0) & (t_placed >= t_read) & (s_end >= t_read)
    ends = [t_read]
    enter = None
    if calls:
        prev = t_read
        for key in ("pch-fault exit 44", "pch-source exit 45", "pch-source exit 46", "pch-fault exit 45"):
            nxt = _first_at_or_after(calls.get(key, np.empty(0, np.int64)), prev)
            ok &= (nxt >= 0) & (nxt <= t_placed)
            ends.append(nxt)
            prev = nxt
        # the copy of this page: the handler's last ioctl entered before its placement stamp
        enter = _last_before(calls.get("pch-fault enter 16", np.empty(0, np.int64)), t_placed)
        ok &= (enter >= prev) & (s_end >= enter)
        ends.append(enter)
    ends.append(s_end)
    ends = np.stack(ends, axis=1)[ok]
    starts = np.concatenate([s0[ok][:, None], ends[:, :-1]], axis=1)
    steps = ends - starts
    out = {"faults": int(ok.sum()), "matched-of": int(ok.size), "steps": steps}
    if enter is not None:  # the copy's own ioctl, as the handler lives it: enter to its placement stamp
        out["copy-ioctl"] = (t_placed - enter)[ok]
    return out


# ------------------------------------------------------------------ output


def table(n: int, res: dict, perf: bool) -> tuple[list[str], dict]:
    steps = res["steps"]
    names = [s[0] for s in STEPS]
    if not perf:
        names = list(NO_PERF_STEPS)
    total = steps.sum(axis=1)
    mean_total = float(total.mean()) if total.size else 0.0
    rows, doc = [], {"vcpus": n, "faults": res["faults"], "matched-of": res["matched-of"],
                     "total-us": {"mean": mean_total / 1e3, "p50": float(np.median(total)) / 1e3}, "steps": []}
    p50s = np.median(steps, axis=0) if total.size else np.zeros(len(names))
    sum_p50 = float(p50s.sum())
    lines = [f"{n} vCPU{'s' if n > 1 else ''}: {res['faults']} faults matched of {res['matched-of']}, "
             f"one fault {mean_total / 1e3:.1f} µs mean, {float(np.median(total)) / 1e3:.1f} µs p50",
             f"  {'step':<56} {'p50 µs':>8} {'share':>6} {'mean µs':>8} {'share':>6}"]
    for i, name in enumerate(names):
        col = steps[:, i]
        mean, p50 = float(col.mean()) / 1e3, float(p50s[i]) / 1e3
        share_p50 = float(p50s[i]) / sum_p50 if sum_p50 else 0.0
        share = float(col.mean()) / mean_total if mean_total else 0.0
        lines.append(f"  {name:<56} {p50:8.1f} {share_p50:6.1%} {mean:8.1f} {share:6.1%}")
        doc["steps"].append({"step": name, "p50-us": p50, "share-p50": share_p50, "mean-us": mean, "share": share})
        rows.append(name)
    if "copy-ioctl" in res and res["copy-ioctl"].size:
        c = res["copy-ioctl"]
        mean = float(c.mean()) / 1e3
        p50 = float(np.median(c))
        lines.append(f"  {'  the UFFDIO_COPY ioctl (handler: enter to return)':<56} {p50 / 1e3:8.1f} "
                     f"{p50 / sum_p50 if sum_p50 else 0:6.1%} {mean:8.1f} "
                     f"{float(c.mean()) / mean_total if mean_total else 0:6.1%}")
        doc["copy-ioctl-us"] = {"mean": mean, "p50": float(np.median(c)) / 1e3}
    return lines, doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ram = parse_size(args.ram)
        if args.child is not None:
            return child(args.child, ram, args.out)
        vcpus = [int(x) for x in args.vcpus.split(",")]
        for n in vcpus:
            config(n, ram, "x").validate()
        why = "--no-perf" if args.no_perf else perf_usable()
        use_perf = why is None
        docs = []
        with tempfile.TemporaryDirectory(prefix="pch-breakdown-") as tmp:
            for n in vcpus:
                stamps, calls = traced_run(n, ram, tmp, use_perf)
                res = breakdown(stamps, calls)
                if not res["faults"]:
                    raise BenchError(f"{n} vCPUs: no fault could be followed along the whole path")
                lines, doc = table(n, res, use_perf)
                print("\n".join(lines))
                print()
                docs.append(doc)
    except (BenchError, ConfigError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print("share = the step's p50 / the sum of the steps' p50s (a typical fault), and its mean / one fault's "
          "mean (the means add up to the total, tails included); "
          + ("syscall ends from perf's raw_syscalls tracepoints (CLOCK_MONOTONIC)" if use_perf
             else f"stamps only ({why})"))
    repro = ["python", "bench/fault_breakdown.py", "--vcpus", args.vcpus, "--ram", args.ram]
    print("Reproduce: " + shlex.join(repro + (["--no-perf"] if args.no_perf else [])))
    if args.json:
        Path(args.json).write_text(json.dumps({"perf": use_perf, "results": docs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
