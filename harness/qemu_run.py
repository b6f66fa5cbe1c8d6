"""Run one real postcopy migration between two local QEMU processes and collect what each side saw.

The source boots the package's guest (``postcopy_core.guest``); the destination waits with
``-incoming defer``, ``postcopy-ram`` and ``postcopy-blocktime`` on, and its blocktime trace events
written with ``-trace events=FILE -D LOG``.  Before migrating, the guest runs alone for
``noise_s`` seconds: the gaps it logs then are its noise floor (VM exits, host preemption), and the
same window gives the TSC rate (the guest's TSC against the host's monotonic clock).

``migrate()`` returns a plain dict (``raw``) that ``harness.qemu_compare`` turns into the report.
Everything lives in a private temp dir, removed at the end; both QEMUs are always stopped and
reserved huge pages given back.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.qmp import QMP, QemuProcess, QmpError, wait_status
from postcopy_core import guest

TRACE_EVENTS = (
    # QEMU <= 10.0
    "mark_postcopy_blocktime_begin",
    "mark_postcopy_blocktime_end",
    # QEMU 10.1+
    "postcopy_blocktime_tid_cpu_map",
    "postcopy_blocktime_begin",
    "postcopy_blocktime_end",
    "postcopy_blocktime_end_one",
    # both
    "postcopy_ram_fault_thread_request",
    "postcopy_place_page",
    "postcopy_place_page_zero",
    "postcopy_ram_incoming_cleanup_blocktime",
    "loadvm_postcopy_handle_advise",
    "loadvm_postcopy_handle_run",
)
BACKINGS = ("anon", "shmem", "hugetlb")  # anon: QEMU's default private RAM
ACCELS = ("kvm", "tcg")
HUGEPAGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


class QemuRunError(RuntimeError):
    """The migration could not be run or did not finish (one line)."""


@dataclass(frozen=True)
class QemuRunConfig:
    """One configuration of ``postcopy-harness qemu``."""

    qemu: str = "qemu-system-x86_64"
    smp: int = 2
    mem: int = 128 << 20
    accel: str = "kvm"
    backing: str = "shmem"
    postcopy_bandwidth: float | None = None  # bytes/s; None = unlimited
    precopy_bandwidth: float = 16 << 20  # bytes/s during precopy, so that it does not converge
    precopy_s: float = 1.0
    workload: str = "sequential"
    threshold_us: float = 50.0
    noise_s: float = 2.0
    boot_timeout_s: float = 60.0
    timeout_s: float = 120.0

    def check(self) -> None:
        """Refuse what cannot run, before anything is started (``QemuRunError``, one line)."""
        if self.accel not in ACCELS:
            raise QemuRunError(f"--accel {self.accel}: choose from {', '.join(ACCELS)}")
        if self.backing not in BACKINGS:
            raise QemuRunError(f"--backing {self.backing}: choose from {', '.join(BACKINGS)}")
        if self.backing == "hugetlb" and self.mem % HUGEPAGE:
            raise QemuRunError(f"--mem {self.mem >> 20}M: hugetlb backing needs a multiple of 2 MiB")
        if self.precopy_s < 0 or self.noise_s <= 0 or self.threshold_us <= 0:
            raise QemuRunError("--precopy must be >= 0, and --noise and --stall-threshold > 0")
        try:
            guest.GuestConfig(self.smp, self.mem, self.workload)
        except guest.GuestError as exc:
            raise QemuRunError(str(exc)) from None


def missing(cfg: QemuRunConfig) -> str | None:
    """What this host lacks to run ``cfg``, as one line, or None."""
    if shutil.which(cfg.qemu) is None:
        return f"QEMU not found: {cfg.qemu} (install qemu-system-x86, or pass --qemu BINARY)"
    if cfg.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        why = "does not exist" if not os.path.exists("/dev/kvm") else "is not readable and writable"
        return f"KVM: /dev/kvm {why} (use --accel tcg)"
    if not guest.BINARY.is_file() and guest.missing_tools():
        return f"the guest is not built and {' and '.join(guest.missing_tools())} are missing (install binutils)"
    return None


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuRunError(f"{qemu} --version failed: {exc}") from None
    return (out.splitlines() or ["unknown"])[0]


def host_tsc_hz() -> float | None:
    """The host kernel's TSC rate, a first guess for the guest's threshold (refined by measuring)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


class _Hugepages:
    """Reserve 2 MiB pages for both QEMUs for the run only."""

    def __init__(self, pages: int) -> None:
        try:
            self.old = int(NR_HUGEPAGES.read_text())
            NR_HUGEPAGES.write_text(f"{self.old + pages}\n")
            got = int(NR_HUGEPAGES.read_text())
        except OSError as exc:
            raise QemuRunError(f"cannot reserve huge pages: {exc.strerror} (needs root)") from None
        if got < self.old + pages:
            NR_HUGEPAGES.write_text(f"{self.old}\n")
            raise QemuRunError(f"could reserve only {got - self.old} of {pages} huge pages")

    def release(self) -> None:
        NR_HUGEPAGES.write_text(f"{self.old}\n")


def _dump(q: QMP, tmp: Path, addr: int, size: int, name: str) -> bytes:
    path = tmp / name
    q.cmd("pmemsave", val=addr, size=size, filename=str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def _blocks(q: QMP, tmp: Path, n: int) -> tuple[int, list[guest.Block]]:
    return guest.parse_blocks(_dump(q, tmp, *guest.BLOCKS_DUMP, "blocks"), n)


def _logs(q: QMP, tmp: Path, walkers: int) -> list[bytes]:
    return [_dump(q, tmp, guest.LOG_BASE + s * guest.LOG_BYTES, guest.LOG_CAP * guest.ENTRY.size, f"log{s}")
            for s in range(walkers)]


def _cmdlines(cfg: QemuRunConfig, tmp: Path, img: Path) -> tuple[list[str], list[str]]:
    mem_mb = cfg.mem >> 20
    common = [cfg.qemu, "-accel", cfg.accel, "-machine", "pc", "-m", f"{mem_mb}M", "-smp", str(cfg.smp),
              "-nodefaults", "-display", "none", "-no-user-config",
              "-drive", f"file={img},format=raw,if=ide,snapshot=on", "-boot", "c"]
    backend = f"memory-backend-memfd,id=ram0,size={mem_mb}M,share=on"
    if cfg.backing == "hugetlb":
        backend += ",hugetlb=on,hugetlbsize=2M"
    if cfg.backing != "anon":
        common += ["-object", backend, "-machine", "memory-backend=ram0"]
    src = common + ["-name", "pch-qemu-source", "-qmp", f"unix:{tmp / 'qmp-src.sock'},server=on,wait=off"]
    dst = common + ["-name", "pch-qemu-destination", "-qmp", f"unix:{tmp / 'qmp-dst.sock'},server=on,wait=off",
                    "-incoming", "defer", "-msg", "timestamp=on",
                    "-trace", f"events={tmp / 'events'}", "-D", str(tmp / "trace.log")]
    return src, dst


def _wait_guest(q: QMP, tmp: Path, cfg: guest.GuestConfig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        started, blocks = _blocks(q, tmp, cfg.walkers)
        if started >= cfg.walkers and all(b.passes >= 1 for b in blocks):
            return
        if time.monotonic() > deadline:
            raise QemuRunError(f"the guest did not start walking memory in {timeout:g} s "
                               f"({started} of {cfg.walkers} vCPUs started, passes {[b.passes for b in blocks]})")
        time.sleep(0.1)


def _noise_window(q: QMP, tmp: Path, gcfg: guest.GuestConfig, seconds: float) -> dict:
    """Read the blocks, let the guest run ``seconds``, read again: TSC rate and the noise logs."""
    t0 = time.monotonic_ns()
    _, b0 = _blocks(q, tmp, gcfg.walkers)
    t0 = (t0 + time.monotonic_ns()) // 2
    time.sleep(seconds)
    t1 = time.monotonic_ns()
    _, b1 = _blocks(q, tmp, gcfg.walkers)
    t1 = (t1 + time.monotonic_ns()) // 2
    logs = _logs(q, tmp, gcfg.walkers)
    rates = sorted((x.last_tsc - a.last_tsc) / ((t1 - t0) / 1e9) for a, x in zip(b0, b1, strict=True))
    return {
        "tsc-hz": rates[len(rates) // 2],
        "tsc-hz-per-vcpu": rates,
        "seconds": (t1 - t0) / 1e9,
        "tsc": [[a.last_tsc, x.last_tsc] for a, x in zip(b0, b1, strict=True)],
        "entries": [guest.parse_log(lg, a.nlog, x.nlog) for lg, a, x in zip(logs, b0, b1, strict=True)],
        "passes": [x.passes - a.passes for a, x in zip(b0, b1, strict=True)],
    }


def migrate(cfg: QemuRunConfig, trace_to: Path) -> dict:
    """Run the migration ``cfg`` describes; the raw material of the report (see the module docstring).
    The destination's trace log is copied to ``trace_to``."""
    cfg.check()
    problem = missing(cfg)
    if problem:
        raise QemuRunError(problem)
    version = qemu_version(cfg.qemu)
    guess = host_tsc_hz() or 2e9
    gcfg = guest.GuestConfig(cfg.smp, cfg.mem, cfg.workload,
                             threshold_cycles=max(1, int(cfg.threshold_us * 1e-6 * guess * 0.8)))
    tmp = Path(tempfile.mkdtemp(prefix="pch-qemu-"))
    huge = src = dst = None
    try:
        img = tmp / "guest.img"
        img.write_bytes(guest.image(gcfg))
        (tmp / "events").write_text("\n".join(TRACE_EVENTS) + "\n")
        if cfg.backing == "hugetlb":
            huge = _Hugepages(2 * cfg.mem // HUGEPAGE)
        src_cmd, dst_cmd = _cmdlines(cfg, tmp, img)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{s.getsockname()[1]}"
        src = QemuProcess(src_cmd, tmp / "qmp-src.sock", tmp / "src.out")
        dst = QemuProcess(dst_cmd, tmp / "qmp-dst.sock", tmp / "dst.out")
        qs, qd = src.qmp, dst.qmp
        assert qs is not None and qd is not None
        _wait_guest(qs, tmp, gcfg, cfg.boot_timeout_s)
        noise = _noise_window(qs, tmp, gcfg, cfg.noise_s)

        qs.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        qd.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True},
                                                         {"capability": "postcopy-blocktime", "state": True}])
        params = {"max-bandwidth": int(cfg.precopy_bandwidth)}
        if cfg.postcopy_bandwidth:
            params["max-postcopy-bandwidth"] = int(cfg.postcopy_bandwidth)
        qs.cmd("migrate-set-parameters", **params)
        qd.cmd("migrate-incoming", uri=uri)
        t_migrate = time.monotonic_ns()
        qs.cmd("migrate", uri=uri)
        wait_status(qs, {"active", "postcopy-active", "completed"}, 20)
        time.sleep(cfg.precopy_s)
        t_postcopy = time.monotonic_ns()
        qs.cmd("migrate-start-postcopy")
        # The source stops the guest to switch over; what its logs hold then is the source's part.
        deadline = time.monotonic() + 30
        while qs.cmd("query-status")["status"] == "running":
            if time.monotonic() > deadline:
                raise QemuRunError("the source guest never stopped after migrate-start-postcopy")
            time.sleep(0.005)
        _, at_switch = _blocks(qs, tmp, gcfg.walkers)
        src_info = wait_status(qs, {"completed"}, cfg.timeout_s)
        wait_status(qd, {"completed"}, 30)
        t_done = time.monotonic_ns()
        time.sleep(0.3)  # the guest keeps running on the destination: it is alive
        qd.cmd("stop")
        t_stop = time.monotonic_ns()
        dst_info = qd.cmd("query-migrate")
        cpus = qd.cmd("query-cpus-fast")
        _, at_end = _blocks(qd, tmp, gcfg.walkers)
        logs = _logs(qd, tmp, gcfg.walkers)
        entries = [guest.parse_log(lg, a.nlog, b.nlog) for lg, a, b in zip(logs, at_switch, at_end, strict=True)]
        src.stop()
        dst.stop()  # flushes the trace log
        shutil.copyfile(tmp / "trace.log", trace_to)
        return {
            "config": asdict(cfg),
            "qemu-version": version,
            "guest": {
                "threshold-cycles": gcfg.threshold_cycles,
                "region-pages": gcfg.region_pages,
                "regions": [gcfg.region_of(s) for s in range(gcfg.walkers)],
                "walkers": gcfg.walkers,
                "apic": [b.apic for b in at_end],
                "at-switch": [asdict(b) for b in at_switch],
                "at-end": [asdict(b) for b in at_end],
                "entries": entries,
            },
            "noise": noise,
            "timing-ns": {"migrate": t_migrate, "postcopy": t_postcopy, "completed": t_done, "stopped": t_stop},
            "query-migrate": dst_info,
            "source-query-migrate": src_info,
            "query-cpus-fast": cpus,
            "trace-file": str(trace_to),
            "command-lines": {"source": src_cmd, "destination": dst_cmd},
        }
    except QmpError as exc:
        detail = ""
        for p in (dst, src):
            if p is not None and p.proc.poll() not in (None, 0):
                detail = f" ({p.cmd[p.cmd.index('-name') + 1]} said: {p.output().strip()[-200:]})"
        raise QemuRunError(f"{exc}{detail}") from None
    finally:
        for p in (src, dst):
            if p is not None:
                p.stop()
        if huge is not None:
            huge.release()
        shutil.rmtree(tmp, ignore_errors=True)


def qemu_checks(qemu: str, required: bool = False) -> list:
    """``check``'s rows for ``postcopy-harness qemu`` (required ones with ``check --qemu``)."""
    from postcopy_core.probe import Check

    path = shutil.which(qemu)
    rows = [Check("qemu: binary", path is not None,
                  f"{path}: {qemu_version(qemu)}" if path else f"{qemu} not found (install qemu-system-x86)",
                  required)]
    if path:
        try:
            events = subprocess.run([qemu, "-trace", "help"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            events = ""
        names = set(events.split())
        old, new = "mark_postcopy_blocktime_begin" in names, "postcopy_blocktime_begin" in names
        rows.append(Check("qemu: blocktime trace events", old or new,
                          "QEMU 10.1+ events (postcopy_blocktime_*)" if new else
                          "QEMU <= 10.0 events (mark_postcopy_blocktime_*)" if old else
                          "none listed by -trace help (a QEMU built without the log trace backend?)", required))
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    rows.append(Check("qemu: KVM (/dev/kvm)", kvm, "usable" if kvm else "missing or not accessible: use --accel tcg",
                      False))
    built = guest.BINARY.is_file()
    tools = guest.missing_tools()
    rows.append(Check("qemu: guest boot sector", built or not tools,
                      ("shipped " + str(guest.BINARY.name)) + ("" if not tools else
                                                               f" ({' and '.join(tools)} missing: cannot rebuild)")
                      if built else f"not built and {' and '.join(tools)} missing (install binutils)", required))
    return rows
