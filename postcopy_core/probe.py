"""Can postcopy run on this host?  The harness's postcopy_ram_supported_by_host.

Each check really exercises the kernel (open a uffd, negotiate features, register a shmem and a
hugetlbfs range) rather than guessing from versions.
"""

from __future__ import annotations

import errno
import os
import platform
import resource
from dataclasses import asdict, dataclass

from postcopy_core import kernel


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed required check means postcopy cannot run
    skipped: bool = False  # not tried because an earlier check failed (that one is the failure)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def fds_needed(vcpus: int) -> int:
    """fds the fault handler holds: one uffd per vCPU plus sockets, eventfd, memfd and slack."""
    return vcpus + 64


def raise_fd_limit(vcpus: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to what ``vcpus`` need (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fds_needed(vcpus)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def free_huge_pages() -> int:
    """Huge pages a new hugetlbfs mapping can still get: free and unreserved, plus overcommit
    headroom; -1 when the kernel does not say."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.startswith("HugePages_"):
                    info[key] = int(rest.split()[0])
        with open("/proc/sys/vm/nr_overcommit_hugepages", encoding="ascii") as f:
            overcommit = int(f.read())
    except (OSError, ValueError):
        return -1
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    return free + max(0, overcommit - info.get("HugePages_Surp", 0))


def available_memory() -> int:
    """Bytes the kernel says new allocations can get without swapping (MemAvailable); -1 if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return -1


def preflight(hugetlb: bool, minor: bool = False) -> None:
    """Fail fast, in one line, when this host cannot run postcopy at all (before any process starts);
    ``minor``: also the MINOR faults that ``run --place continue`` needs."""
    feats = kernel.FEATURE_THREAD_ID | (kernel.FEATURE_MISSING_HUGETLBFS if hugetlb else kernel.FEATURE_MISSING_SHMEM)
    try:
        kernel.Uffd.open(feats).close()
    except kernel.KernelError as e:
        raise RuntimeError(f"this host cannot run postcopy: {e} (see: postcopy-harness check)") from None
    if minor:
        feats |= kernel.FEATURE_MINOR_HUGETLBFS if hugetlb else kernel.FEATURE_MINOR_SHMEM
        try:
            kernel.Uffd.open(feats).close()
        except kernel.KernelError as e:
            kind = "MINOR_HUGETLBFS" if hugetlb else "MINOR_SHMEM"
            raise RuntimeError(f"--place continue needs userfaultfd {kind} (Linux 5.13+): {e}; "
                               "use --place copy") from None


def _try_register(hugetlb: bool) -> tuple[bool, str]:
    feats = kernel.FEATURE_THREAD_ID | (kernel.FEATURE_MISSING_HUGETLBFS if hugetlb else kernel.FEATURE_MISSING_SHMEM)
    size = kernel.HUGE_PAGE_SIZE if hugetlb else kernel.PAGE_SIZE * 4
    fd = m = u = None
    try:
        fd = kernel.memfd_create("pch-probe", hugetlb=hugetlb)
        os.ftruncate(fd, size)
        m = kernel.mmap_fd(fd, size)
        u = kernel.Uffd.open(feats)
        ioctls = u.register(m.addr, size)
        need = kernel.IOCTL_COPY | (0 if hugetlb else kernel.IOCTL_ZEROPAGE)
        if ioctls & need != need:
            return False, f"registered, but the range lacks COPY/ZEROPAGE (ioctls {ioctls:#x})"
        # place one page through the uffd: the whole path, not just the registration
        src = kernel.mmap_anon(kernel.HUGE_PAGE_SIZE if hugetlb else kernel.PAGE_SIZE)
        u.copy(m.addr, src.addr, src.length)
        src.close()
        return True, "register + UFFDIO_COPY work"
    except (kernel.KernelError, OSError) as e:
        return False, str(e) if isinstance(e, kernel.KernelError) else f"{e.strerror}"
    finally:
        if u is not None:
            u.close()
        if m is not None:
            m.close()
        if fd is not None:
            os.close(fd)


def probe(vcpus: int = 4) -> list[Check]:
    """Run every check; postcopy can run when every required one is ok."""
    checks: list[Check] = []
    checks.append(Check("kernel", True, f"{platform.system()} {platform.release()} ({platform.machine()})", False))
    try:
        u = kernel.Uffd.open(0)
        feats = u.features
        u.close()
        uffd = Check("userfaultfd", True, "syscall or /dev/userfaultfd, UFFDIO_API ok")
    except kernel.KernelError as e:
        denied = e.errno in (errno.EPERM, errno.EACCES)
        hint = " (run as root, or sysctl vm.unprivileged_userfaultfd=1)" if denied else ""
        uffd = Check("userfaultfd", False, f"{e}{hint}")
        feats = 0
    checks.append(_unprivileged_check(uffd.ok))
    checks.append(uffd)
    skip = "skipped: no userfaultfd"
    for name, bit in kernel.FEATURE_NAMES.items():
        required = name in ("THREAD_ID", "MISSING_SHMEM")  # hugetlbfs and MINOR (--place continue): optional
        if not uffd.ok:
            checks.append(Check(f"feature {name}", False, skip, required, skipped=True))
            continue
        checks.append(Check(f"feature {name}", bool(feats & bit), "supported" if feats & bit else "missing", required))
    if feats:
        ok, detail = _try_register(False)
        checks.append(Check("shmem memfd + uffd", ok, detail))
    else:
        checks.append(Check("shmem memfd + uffd", False, skip, skipped=True))

    nr = _read("/proc/sys/vm/nr_hugepages") or "0"
    free = str(max(0, free_huge_pages()))
    hint = "" if int(free) else " (reserve: echo N > /proc/sys/vm/nr_hugepages)"
    checks.append(Check("huge pages reserved / free", int(free) > 0,
                        f"{nr} / {free} of {kernel.HUGE_PAGE_SIZE >> 20} MiB{hint}", False))
    if int(free) > 0 and feats & kernel.FEATURE_MISSING_HUGETLBFS:
        ok, detail = _try_register(True)
        checks.append(Check("hugetlbfs memfd + uffd", ok, detail, False))
    else:
        detail = "skipped: no free huge pages" if feats else skip
        checks.append(Check("hugetlbfs memfd + uffd", False, detail, False, skipped=True))
    checks.append(Check("page sizes", True, f"base {kernel.PAGE_SIZE:,}, huge {kernel.HUGE_PAGE_SIZE:,}", False))

    checks += limit_checks(vcpus)
    return checks


def limit_checks(vcpus: int) -> list[Check]:
    """The fd and process limits ``vcpus`` worker processes need: what ``check`` shows and ``run``
    refuses to start without (one function, so the two always agree)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = fds_needed(vcpus)
    fd_ok = hard == resource.RLIM_INFINITY or hard >= need
    raised = " (raised at run time)" if soft < need <= hard else ""
    hint = "" if fd_ok else f" (RLIMIT_NOFILE: the fault handler holds one uffd per vCPU; raise it: ulimit -n {need})"
    checks = [Check(f"fd limit for {vcpus} uffds", fd_ok,
                    f"soft {_count(soft)}, hard {_count(hard)}, need {need:,}{raised}{hint}")]
    nproc_soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    pid_max = int(_read("/proc/sys/kernel/pid_max") or 0)
    threads_max = int(_read("/proc/sys/kernel/threads-max") or 0)
    nproc = nproc_soft if nproc_soft != resource.RLIM_INFINITY else 1 << 30
    room = min(x for x in (nproc, pid_max, threads_max) if x)
    checks.append(Check(f"process limits for {vcpus} vCPUs", room > vcpus + 16,
                        f"RLIMIT_NPROC {_count(nproc_soft)}, "
                        f"pid_max {pid_max:,}, threads-max {threads_max:,}"))
    return checks


def _unprivileged_check(uffd_ok: bool) -> Check:
    """vm.unprivileged_userfaultfd matters only to a non-root user: ok for root, or when it is 1, or
    when userfaultfd opened anyway (/dev/userfaultfd); otherwise it is why userfaultfd failed."""
    unpriv = _read("/proc/sys/vm/unprivileged_userfaultfd")
    euid = os.geteuid()
    if euid == 0:
        return Check("vm.unprivileged_userfaultfd", True, f"{unpriv or 'n/a'} (root does not need it)", False)
    if unpriv is None:
        return Check("vm.unprivileged_userfaultfd", uffd_ok, "n/a (no such sysctl on this kernel)", False)
    if unpriv == "1" or uffd_ok:
        return Check("vm.unprivileged_userfaultfd", True, f"{unpriv} (euid {euid})", False)
    return Check("vm.unprivileged_userfaultfd", False,
                 f"{unpriv}: non-root users may not use userfaultfd (euid {euid}; "
                 "sysctl vm.unprivileged_userfaultfd=1, or run as root)", False)


def _count(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit:,}"


def can_run(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.required)


def as_dict(checks: list[Check]) -> dict:
    return {"can-run": can_run(checks), "checks": [asdict(c) for c in checks]}
