#!/usr/bin/env python3
"""Capture a real QEMU postcopy migration with blocktime tracing.

Runs two local QEMU/KVM processes (source and destination), boots the tiny
memory-touching guest from guest.asm on the source, migrates it to the
destination over a local socket, switches to postcopy early, and writes a
capture directory:

    trace.log[.gz]          destination trace (log backend, -msg timestamp=on)
    query-migrate.json      destination query-migrate after completion
    query-cpus-fast.json    destination query-cpus-fast (cpu-index -> thread-id)
    source-query-migrate.json
    info.json               versions, command lines, parameters, timings

Everything lives in a private temp dir that is removed at the end; both QEMU
processes are always terminated.  The QMP client is the package's (harness.qmp).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's harness package
from harness.qmp import QMP, wait_status  # noqa: E402  (shared with `postcopy-harness qemu`)

HERE = Path(__file__).resolve().parent
GUEST_SRC = HERE / "guest.asm"
HEARTBEAT = 0x9000
FLOPPY_SIZE = 1474560

TRACE_EVENTS = [
    # the core blocktime accounting events
    "mark_postcopy_blocktime_begin",
    "mark_postcopy_blocktime_end",
    "postcopy_ram_fault_thread_request",
    "postcopy_place_page",
    "postcopy_place_page_zero",
    "postcopy_ram_incoming_cleanup_blocktime",
    "get_mem_fault_cpu_index",
    # low-volume lifecycle markers, handy for bracketing the postcopy phase
    "loadvm_postcopy_handle_advise",
    "loadvm_postcopy_handle_listen",
    "loadvm_postcopy_handle_run",
    "loadvm_postcopy_handle_run_bh",
    "postcopy_ram_listen_thread_start",
    "postcopy_ram_listen_thread_exit",
    "postcopy_ram_fault_thread_entry",
    "postcopy_ram_fault_thread_exit",
    "postcopy_ram_fault_thread_quit",
    "postcopy_ram_incoming_cleanup_entry",
    "postcopy_ram_incoming_cleanup_join",
    "postcopy_ram_incoming_cleanup_exit",
    "process_incoming_migration_co_postcopy_end_main",
]


def log(msg: str) -> None:
    print(f"[capture {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_image(tmp: Path, wake_aps: bool, base_mb: int, percpu_mb: int, step: int,
                shared: bool = False) -> Path:
    nasm = shutil.which("nasm")
    if not nasm:
        sys.exit("nasm not found (apt-get install nasm)")
    bin_path = tmp / "guest.bin"
    subprocess.run(
        [nasm, "-f", "bin", f"-DWAKE_APS={int(wake_aps)}", f"-DBASE_MB={base_mb}",
         f"-DPERCPU_MB={percpu_mb}", f"-DSTEP_PAGES={step}", f"-DSHARED={int(shared)}",
         "-o", str(bin_path), str(GUEST_SRC)],
        check=True, timeout=30)
    img = tmp / "boot.img"
    data = bin_path.read_bytes()
    assert len(data) == 512 and data[510:] == b"\x55\xaa"
    img.write_bytes(data + b"\0" * (FLOPPY_SIZE - 512))
    return img


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def reserve_hugepages(extra: int) -> int:
    """Add ``extra`` 2 MiB huge pages to the pool; returns the old value for restore_hugepages."""
    old = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(f"{old + extra}\n")
    got = int(NR_HUGEPAGES.read_text())
    if got < old + extra:
        NR_HUGEPAGES.write_text(f"{old}\n")
        raise RuntimeError(f"could reserve only {got - old} of {extra} huge pages")
    log(f"nr_hugepages {old} -> {got} (restored at the end)")
    return old


def restore_hugepages(old: int) -> None:
    NR_HUGEPAGES.write_text(f"{old}\n")
    log(f"nr_hugepages restored to {int(NR_HUGEPAGES.read_text())}")


def boot_args(img: Path, how: str) -> list[str]:
    """The boot drive: a floppy (the first captures) or an IDE disk.  Under nested KVM SeaBIOS
    can time out reading the floppy ("No bootable device"); the disk boots everywhere.
    snapshot=on keeps both QEMUs off each other's image lock."""
    if how == "floppy":
        return ["-drive", f"file={img},format=raw,if=floppy,readonly=on", "-boot", "a"]
    return ["-drive", f"file={img},format=raw,if=ide,snapshot=on", "-boot", "c"]


def heartbeats(q: QMP, ncpu: int) -> tuple[list[int], list[int]]:
    """Read per-CPU pass counters and APIC IDs via HMP xp."""
    def words(addr: int, n: int) -> list[int]:
        out = q.hmp(f"xp /{n}wx {addr:#x}")
        vals = []
        for ln in out.splitlines():
            if ":" in ln:
                vals += [int(w, 16) for w in ln.split(":", 1)[1].split()]
        return vals[:n]
    return words(HEARTBEAT, ncpu), words(HEARTBEAT + 0x100, ncpu)


def qemu_version(qemu: str) -> str:
    return subprocess.run([qemu, "--version"], capture_output=True, text=True,
                          timeout=10).stdout.splitlines()[0]


def stop(proc: subprocess.Popen | None, q: QMP | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    if q is not None:
        try:
            q.sock.settimeout(5)
            q.cmd("quit")
        except Exception:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _migration_uri(tmp: Path, transport: str) -> str:
    """A Unix socket in the temp folder, or a free TCP port on loopback."""
    if transport == "unix":
        return f"unix:{tmp / 'mig.sock'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp:127.0.0.1:{port}"


def _wait_for_guest(qs, args, active: int) -> None:
    """Wait until every CPU that should run the loop has done a few passes."""
    deadline = time.monotonic() + args.boot_timeout
    while True:
        hb, _apic = heartbeats(qs, args.smp)
        if all(h >= 3 for h in hb[:active]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest did not start touching memory: passes={hb}")
        time.sleep(0.1)


def _write_trace(out_dir: Path, raw: bytes, gzip_over: int) -> str:
    """The trace log into the capture folder (gzipped when bigger than ``gzip_over``); its name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("trace.log", "trace.log.gz"):
        (out_dir / stale).unlink(missing_ok=True)
    if len(raw) > gzip_over:
        with gzip.GzipFile(out_dir / "trace.log.gz", "wb", compresslevel=9, mtime=0) as f:
            f.write(raw)
        return "trace.log.gz"
    (out_dir / "trace.log").write_bytes(raw)
    return "trace.log"


def _count_trace(raw: bytes) -> tuple[dict[str, int], dict[str, int], int]:
    """Lines per trace event, begin lines per vCPU, and begins on a page already received."""
    counts: dict[str, int] = {}
    begins_per_cpu: dict[str, int] = {}
    already_received = 0
    for ln in raw.decode(errors="replace").splitlines():
        ev = ln.split(":", 1)[1].split(" ", 1)[0] if ":" in ln else ""
        counts[ev] = counts.get(ev, 0) + 1
        if ev == "mark_postcopy_blocktime_begin":
            cpu = ln.rsplit("cpu: ", 1)[1].split(",", 1)[0]
            begins_per_cpu[cpu] = begins_per_cpu.get(cpu, 0) + 1
            already_received += ln.endswith("already_received: 1")
    return counts, begins_per_cpu, already_received


def _sanity_problems(args, dst_info: dict, n_begin: int, n_end: int, vcpu_bt: list, active_idx: list[int],
                     hb_before: list[int], hb_after: list[int]) -> list[str]:
    """What makes the capture suspect (an empty list: it looks sane)."""
    problems = []
    if dst_info.get("status") != "completed":
        problems.append(f"destination status {dst_info.get('status')!r}")
    if n_begin < 10 or n_end < 10:
        problems.append(f"too few begin/end lines ({n_begin}/{n_end})")
    if len(vcpu_bt) != args.smp:
        problems.append(f"postcopy-vcpu-blocktime has {len(vcpu_bt)} entries")
    for i in active_idx:
        if i < len(vcpu_bt) and not vcpu_bt[i]:
            problems.append(f"active vCPU {i} has zero blocktime")
    if args.active == "bsp" and any(vcpu_bt[1:]):
        problems.append("idle APs accumulated blocktime")
    if any(d <= b for d, b in zip(hb_after, hb_before, strict=True)):
        problems.append("guest made no progress on the destination")
    return problems


def run(args) -> int:
    qemu = args.qemu
    out_dir = Path(args.out).resolve()
    active = args.smp if args.active == "all" else 1
    percpu_mb = args.percpu_mb or max(16, 256 // active)
    need_mb = args.base_mb + (1 if args.shared else active) * percpu_mb
    if percpu_mb & (percpu_mb - 1) or not args.step_pages & 1:
        sys.exit("--percpu-mb must be a power of two and --step-pages odd")
    if need_mb > args.ram_mb:
        sys.exit(f"guest regions end at {need_mb} MiB but RAM is {args.ram_mb} MiB")

    tmp = Path(tempfile.mkdtemp(prefix="qemu-capture-"))
    hugepages: int | None = None  # nr_hugepages before we reserved some, restored at the end
    src = dst = None
    qs = qd = None
    try:
        img = build_image(tmp, args.active == "all" and args.smp > 1, args.base_mb, percpu_mb,
                          args.step_pages, args.shared)
        if args.hugetlb:
            hugepages = reserve_hugepages(2 * args.ram_mb // 2)  # both QEMUs, 2 MiB pages
        events_file = tmp / "events"
        events_file.write_text("\n".join(TRACE_EVENTS) + "\n")
        trace_log = tmp / "trace.log"
        mig_uri = _migration_uri(tmp, args.transport)

        common = [
            qemu, "-accel", args.accel, "-machine", "pc", "-m", f"{args.ram_mb}M",
            "-smp", str(args.smp), "-nodefaults", "-display", "none",
        ] + boot_args(img, args.boot)
        if args.hugetlb:
            # Guest RAM on 2 MiB hugetlbfs pages (memfd, so no mount is needed).
            common[5:5] = [
                "-object", f"memory-backend-memfd,id=ram0,size={args.ram_mb}M,hugetlb=on,"
                "hugetlbsize=2M", "-machine", "memory-backend=ram0"]
        src_cmd = common + [
            "-name", "source",
            "-qmp", f"unix:{tmp / 'qmp-src.sock'},server=on,wait=off",
        ]
        dst_cmd = common + [
            "-name", "destination",
            "-qmp", f"unix:{tmp / 'qmp-dst.sock'},server=on,wait=off",
            "-incoming", "defer",
            "-msg", "timestamp=on", "-trace", f"events={events_file}", "-D", str(trace_log),
        ]

        log(f"source: {' '.join(src_cmd)}")
        with open(tmp / "src.out", "wb") as out:
            src = subprocess.Popen(src_cmd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
        log(f"destination: {' '.join(dst_cmd)}")
        with open(tmp / "dst.out", "wb") as out:
            dst = subprocess.Popen(dst_cmd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
        qs = QMP(tmp / "qmp-src.sock", src)
        qd = QMP(tmp / "qmp-dst.sock", dst)

        caps = [{"capability": "postcopy-ram", "state": True}]
        qs.cmd("migrate-set-capabilities", capabilities=caps)
        qd.cmd("migrate-set-capabilities",
               capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
        qd.cmd("migrate-incoming", uri=mig_uri)

        _wait_for_guest(qs, args, active)
        time.sleep(args.warmup)
        hb, apic = heartbeats(qs, args.smp)
        log(f"source guest passes per cpu-slot {hb}, apic ids {apic}")
        if args.active == "bsp" and any(hb[1:]):
            raise RuntimeError("APs are running the loop in bsp-only mode")

        qs.cmd("migrate-set-parameters", **{
            "max-bandwidth": args.precopy_bw_mb << 20,
            "max-postcopy-bandwidth": args.postcopy_bw_mb << 20,
        })
        t_migrate = time.time()
        qs.cmd("migrate", uri=mig_uri)
        wait_status(qs, {"active", "postcopy-active", "completed"}, 10)
        time.sleep(args.precopy_secs)
        t_postcopy = time.time()
        qs.cmd("migrate-start-postcopy")
        log(f"postcopy started after {t_postcopy - t_migrate:.2f}s of precopy")
        src_info = wait_status(qs, {"completed"}, args.timeout)
        dst_info = wait_status(qd, {"completed"}, 30)
        t_done = time.time()
        log(f"migration completed {t_done - t_postcopy:.2f}s after postcopy start")
        # Let the guest keep running on the destination briefly, proving it is alive.
        time.sleep(0.5)
        hb_dst, _ = heartbeats(qd, args.smp)
        dst_info = qd.cmd("query-migrate")
        cpus = qd.cmd("query-cpus-fast")
        status = qd.cmd("query-status")
        log(f"destination guest passes per cpu-slot {hb_dst}, run state {status['status']}")

        stop(src, qs)
        stop(dst, qd)   # flushes the trace log
        src = dst = None

        raw = trace_log.read_bytes()
        trace_name = _write_trace(out_dir, raw, args.gzip_over)

        def dump(name, obj):
            (out_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

        dump("query-migrate.json", dst_info)
        dump("query-cpus-fast.json", cpus)
        dump("source-query-migrate.json", src_info)

        counts, begins_per_cpu, already_received = _count_trace(raw)

        def scrub(text):
            return str(text).replace(str(tmp), "$TMP")

        n_begin = counts.get("mark_postcopy_blocktime_begin", 0)
        n_end = counts.get("mark_postcopy_blocktime_end", 0)
        vcpu_bt = dst_info.get("postcopy-vcpu-blocktime") or []
        active_idx = sorted(apic[:active])   # cpu-index == APIC ID with this topology
        problems = _sanity_problems(args, dst_info, n_begin, n_end, vcpu_bt, active_idx, hb[:active],
                                    hb_dst[:active])

        dump("info.json", {
            "name": out_dir.name,
            "qemu_version": qemu_version(qemu),
            "host_kernel": platform.release(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "smp": args.smp,
            "active_vcpus": active,
            "active_cpu_indexes": active_idx,
            "ram_mb": args.ram_mb,
            "accel": args.accel,
            "boot": args.boot,
            "hugetlb": args.hugetlb,
            "shared_pages": args.shared,
            "guest": {
                "source": "tools/qemu_capture/guest.asm",
                "boot": "floppy boot sector via SeaBIOS, flat 32-bit protected mode",
                "wake_aps": args.active == "all" and args.smp > 1,
                "region_base_mb": args.base_mb,
                "region_per_cpu_mb": percpu_mb,
                "page_stride_bytes": 4096 * args.step_pages,
                "step_pages": args.step_pages,
                "note": "guest slot k (fetch-and-add order) touches region k; "
                        "apic_id_per_slot[k] is that CPU's APIC ID == QEMU cpu-index",
                "apic_id_per_slot": apic,
                "passes_per_slot_source_before_migrate": hb,
                "passes_per_slot_destination_after": hb_dst,
            },
            "migration": {
                "transport": args.transport,
                "uri": scrub(mig_uri),
                "max_bandwidth_bytes_per_s": args.precopy_bw_mb << 20,
                "max_postcopy_bandwidth_bytes_per_s": args.postcopy_bw_mb << 20,
                "precopy_secs_before_postcopy": round(t_postcopy - t_migrate, 3),
                "postcopy_to_completed_secs": round(t_done - t_postcopy, 3),
                "capabilities_source": ["postcopy-ram"],
                "capabilities_destination": ["postcopy-ram", "postcopy-blocktime"],
                "wall_clock_unix": {"migrate": t_migrate, "start_postcopy": t_postcopy,
                                    "completed_seen": t_done},
            },
            "trace": {"file": trace_name, "events_enabled": TRACE_EVENTS,
                      "line_counts": dict(sorted(counts.items())), "bytes": len(raw),
                      "begin_lines_per_cpu": dict(sorted(begins_per_cpu.items())),
                      "begin_already_received": already_received},
            "source_cmdline": [scrub(c) for c in src_cmd],
            "destination_cmdline": [scrub(c) for c in dst_cmd],
            "source_output": scrub((tmp / "src.out").read_text(errors="replace")),
            "destination_output": scrub((tmp / "dst.out").read_text(errors="replace")),
            "vcpu_thread_ids": {str(c["cpu-index"]): c["thread-id"] for c in cpus},
            "sanity_problems": problems,
        })

        print(json.dumps({
            "capture": str(out_dir),
            "status": dst_info.get("status"),
            "postcopy-blocktime": dst_info.get("postcopy-blocktime"),
            "postcopy-vcpu-blocktime": vcpu_bt,
            "vcpu-thread-ids": {c["cpu-index"]: c["thread-id"] for c in cpus},
            "begin_lines": n_begin,
            "begin_lines_per_cpu": begins_per_cpu,
            "end_lines": n_end,
            "trace_file": trace_name,
        }, indent=2))
        if problems:
            log("SANITY PROBLEMS: " + "; ".join(problems))
            return 1
        log("capture looks sane")
        return 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p, q in ((src, qs), (dst, qd)):
            try:
                stop(p, q)
            except Exception as e:  # keep cleaning up
                log(f"cleanup: {e}")
        for q in (qs, qd):
            if q is not None:
                q.close()
        if hugepages is not None:
            restore_hugepages(hugepages)
        if args.keep_tmp:
            log(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


class Deadline(Exception):
    pass


def _on_signal(signum, _frame):
    raise Deadline(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="capture directory to write, e.g. tests/data/qemu/smp1")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--active", choices=["all", "bsp"], default="all",
                    help="which vCPUs run the touch loop (bsp: APs stay halted)")
    ap.add_argument("--ram-mb", type=int, default=512)
    ap.add_argument("--base-mb", type=int, default=64)
    ap.add_argument("--percpu-mb", type=int, default=0,
                    help="touched MiB per active vCPU, a power of two (default 256 / active vCPUs)")
    ap.add_argument("--step-pages", type=int, default=1,
                    help="odd page step of the touch loop (1 = sequential 4 KiB stride)")
    ap.add_argument("--precopy-bw-mb", type=int, default=10, help="max-bandwidth, MiB/s")
    ap.add_argument("--postcopy-bw-mb", type=int, default=0,
                    help="max-postcopy-bandwidth, MiB/s (0 = unlimited)")
    ap.add_argument("--precopy-secs", type=float, default=0.5,
                    help="seconds of precopy before migrate-start-postcopy")
    ap.add_argument("--warmup", type=float, default=1.0, help="guest run time before migrating")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="tcp",
                    help="migration channel: tcp on 127.0.0.1 or a unix socket")
    ap.add_argument("--timeout", type=float, default=120, help="migration timeout, seconds")
    ap.add_argument("--max-runtime", type=float, default=300,
                    help="hard limit for the whole run, seconds")
    ap.add_argument("--boot-timeout", type=float, default=120,
                    help="seconds to wait for the guest loop to run on the source")
    ap.add_argument("--gzip-over", type=int, default=1 << 20,
                    help="gzip trace.log when larger than this many bytes")
    ap.add_argument("--accel", choices=["kvm", "tcg"], default="kvm")
    ap.add_argument("--boot", choices=["disk", "floppy"], default="disk",
                    help="boot the sector from an IDE disk or a floppy")
    ap.add_argument("--shared", action="store_true",
                    help="every active vCPU loops over the same region (faults on shared pages)")
    ap.add_argument("--hugetlb", action="store_true",
                    help="guest RAM on 2 MiB hugetlbfs pages (reserves them for the run only)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    if not shutil.which(args.qemu):
        sys.exit(f"{args.qemu} not found (apt-get install qemu-system-x86)")
    # Turn SIGTERM/SIGALRM into exceptions so the cleanup in run() always happens.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(int(args.max_runtime))
    try:
        return run(args)
    except Deadline as e:
        log(f"aborted: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
