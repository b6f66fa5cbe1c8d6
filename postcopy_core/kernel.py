"""The friendly face of the kernel interface (userfaultfd, memfd, eventfd, mmap).

The cffi extension ``postcopy_core._uffd`` (built at install from csrc/) returns -errno; this module
turns that into :class:`KernelError`, which names the operation and the errno, and holds no policy.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

from postcopy_core._uffd import ffi, lib

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUGE_PAGE_SIZE = 2 << 20

FEATURE_THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
FEATURE_MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
FEATURE_MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
FEATURE_MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
FEATURE_EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK  # run --fork-events: a forked child's uffd reaches the handler
FEATURE_EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP  # run --unmap-events: munmap of guest RAM reaches the handler
FEATURE_EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP  # and mremap of it (the registration moves along)
FEATURE_EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE  # run --remove-rate: MADV_REMOVE reaches the handler
FEATURE_MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
REGISTER_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
REGISTER_MINOR = lib.UFFDIO_REGISTER_MODE_MINOR
PAGEFAULT_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR
IOCTL_CONTINUE = 1 << lib._UFFDIO_CONTINUE
PAGEFAULT_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
IOCTL_COPY = 1 << lib._UFFDIO_COPY
IOCTL_ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
IOCTL_WAKE = 1 << lib._UFFDIO_WAKE

FEATURE_NAMES = {
    "THREAD_ID": FEATURE_THREAD_ID,
    "MISSING_SHMEM": FEATURE_MISSING_SHMEM,
    "MISSING_HUGETLBFS": FEATURE_MISSING_HUGETLBFS,
    "MINOR_SHMEM": FEATURE_MINOR_SHMEM,
    "MINOR_HUGETLBFS": FEATURE_MINOR_HUGETLBFS,
}


class KernelError(OSError):
    """A kernel call failed; the message names the operation and the errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {name} ({os.strerror(err)})"
        super().__init__(err, msg + (f": {detail}" if detail else ""))
        self.op = op

    def __str__(self) -> str:
        return self.strerror or ""


def _check(rc: int, op: str, detail: str = "") -> int:
    if rc < 0:
        raise KernelError(op, -rc, detail)
    return rc


# ---------------------------------------------------------------- userfaultfd


@dataclass
class Fault:
    """One page fault read from a userfaultfd."""

    addr: int
    flags: int
    ptid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WRITE)


class Uffd:
    """A userfaultfd: open, negotiate features, register ranges, resolve faults.

    ioctls act on the address space of the process that *created* the uffd, even when another
    process holds it (received over SCM_RIGHTS): that is how the fault handler fills the workers'
    memory.  The fd is always non-blocking, as poll() on a uffd requires.
    """

    def __init__(self, fd: int, features: int = 0, ioctls: int = 0) -> None:
        self.fd = fd
        self.features = features
        self.ioctls = ioctls
        self._addr = ffi.new("uint64_t[128]")
        self._flags = ffi.new("uint64_t[128]")
        self._ptid = ffi.new("uint32_t[128]")
        self._other = ffi.new("uint32_t *")

    @classmethod
    def open(cls, features: int) -> Uffd:
        """Create a uffd (syscall, else /dev/userfaultfd) and negotiate ``features`` (all required)."""
        fd = _check(lib.pch_userfaultfd(lib.O_CLOEXEC | lib.O_NONBLOCK), "userfaultfd")
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.pch_uffd_api(fd, features, feats, ioctls)
        if rc < 0:
            os.close(fd)
            _check(rc, "UFFDIO_API", f"features {features:#x}")
        return cls(fd, feats[0], ioctls[0])

    @classmethod
    def adopt(cls, fd: int) -> Uffd:
        """Wrap a uffd received from another process (its API was negotiated there)."""
        return cls(fd)

    def register(self, addr: int, length: int, mode: int = REGISTER_MISSING) -> int:
        """Register [addr, addr+length) in ``mode`` (default MISSING); returns the ioctls the range supports."""
        out = ffi.new("uint64_t *")
        _check(
            lib.pch_uffd_register(self.fd, addr, length, mode, out),
            "UFFDIO_REGISTER",
            f"range {addr:#x}+{length:#x}",
        )
        return out[0]

    def unregister(self, addr: int, length: int) -> None:
        _check(lib.pch_uffd_unregister(self.fd, addr, length), "UFFDIO_UNREGISTER")

    def copy(self, dst: int, src, length: int, wake: bool = True) -> None:
        """UFFDIO_COPY ``length`` bytes from ``src`` (a cffi pointer or an int address) to ``dst``."""
        mode = 0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE
        if isinstance(src, int):
            src = ffi.cast("void *", src)
        _check(lib.pch_uffd_copy(self.fd, dst, src, length, mode), "UFFDIO_COPY", f"dst {dst:#x}")

    def zeropage(self, dst: int, length: int, wake: bool = True) -> None:
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        _check(lib.pch_uffd_zeropage(self.fd, dst, length, mode), "UFFDIO_ZEROPAGE", f"dst {dst:#x}")

    def continue_(self, addr: int, length: int) -> None:
        """UFFDIO_CONTINUE: map [addr, addr+length), already in the page cache, and wake its waiters."""
        _check(lib.pch_uffd_continue_upto(self.fd, addr, length, 0, ffi.NULL), "UFFDIO_CONTINUE",
               f"range {addr:#x}+{length:#x}")

    def wake(self, addr: int, length: int) -> None:
        _check(lib.pch_uffd_wake(self.fd, addr, length), "UFFDIO_WAKE", f"range {addr:#x}+{length:#x}")

    def read(self, max_msgs: int = 128) -> list[Fault]:
        """Read up to ``max_msgs`` queued faults (one read(2) call).

        An empty list when nothing was queued: poll() can report a uffd readable that another
        reader already drained.  (The fault handler reads in C, csrc/dest.c; this is for tools
        and tests.)
        """
        n = _check(
            lib.pch_uffd_read_faults(self.fd, self._addr, self._flags, self._ptid, max_msgs, self._other),
            "read(userfaultfd)",
        )
        return [Fault(self._addr[i], self._flags[i], self._ptid[i]) for i in range(n)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- memfd, eventfd, mmap


def memfd_create(name: str, hugetlb: bool = False) -> int:
    """A memfd for guest RAM: shmem, or hugetlbfs (2 MiB pages) when ``hugetlb``."""
    flags = lib.MFD_CLOEXEC | (lib.MFD_HUGETLB if hugetlb else 0)
    return _check(lib.pch_memfd_create(name.encode(), flags), "memfd_create", "MFD_HUGETLB" if hugetlb else "")


def eventfd(initval: int = 0, nonblock: bool = True) -> int:
    flags = lib.EFD_CLOEXEC | (lib.EFD_NONBLOCK if nonblock else 0)
    return _check(lib.pch_eventfd(initval, flags), "eventfd")


class Mapping:
    """An mmap()ed region with a known address, which userfaultfd ioctls need."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length

    def pointer(self, offset: int = 0, ctype: str = "uint8_t *"):
        return ffi.cast(ctype, self.addr + offset)

    def buffer(self, offset: int = 0, length: int | None = None):
        """A writable Python buffer over part of the mapping (no copy)."""
        n = self.length - offset if length is None else length
        return ffi.buffer(ffi.cast("char *", self.addr + offset), n)

    def close(self) -> None:
        if self.addr:
            _check(lib.pch_munmap(self.addr, self.length), "munmap")
            self.addr = 0


def mmap_fd(fd: int, length: int, writable: bool = True, private: bool = False) -> Mapping:
    prot = lib.PROT_READ | (lib.PROT_WRITE if writable else 0)
    flags = lib.MAP_PRIVATE if private else lib.MAP_SHARED
    out = ffi.new("uint64_t *")
    _check(lib.pch_mmap(length, prot, flags, fd, 0, out), "mmap", f"{length} bytes")
    return Mapping(out[0], length)


def populate_write(m: Mapping) -> None:
    """Fault every page of a shared mapping in, writable (MADV_POPULATE_WRITE): zeroed pages in the page cache."""
    _check(lib.pch_madvise(m.addr, m.length, lib.MADV_POPULATE_WRITE), "madvise(MADV_POPULATE_WRITE)",
           f"{m.length} bytes")


def prefer_huge_pages(m: Mapping) -> bool:
    """Ask for transparent huge pages behind an anonymous mapping (MADV_HUGEPAGE, as QEMU asks for
    guest RAM); False where the kernel says no (THP off or absent): a hint, not a need."""
    return lib.pch_madvise(m.addr, m.length, lib.MADV_HUGEPAGE) == 0


def mmap_anon(length: int, shared: bool = False, populate: bool = False) -> Mapping:
    flags = lib.MAP_ANONYMOUS | (lib.MAP_SHARED if shared else lib.MAP_PRIVATE)
    if populate:
        flags |= lib.MAP_POPULATE
    out = ffi.new("uint64_t *")
    _check(lib.pch_mmap(length, lib.PROT_READ | lib.PROT_WRITE, flags, -1, 0, out), "mmap", f"{length} bytes")
    return Mapping(out[0], length)


# ---------------------------------------------------------------- process hygiene


def set_process_name(name: str) -> None:
    """Set the name ps/psutil show for this process (prctl PR_SET_NAME, 15 chars)."""
    _check(lib.pch_set_name(name.encode()[:15]), "prctl(PR_SET_NAME)")


def die_with_parent(sig: int = 9) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG)."""
    _check(lib.pch_set_pdeathsig(sig), "prctl(PR_SET_PDEATHSIG)")


def become_subreaper() -> None:
    """Adopt the orphans of our descendants (PR_SET_CHILD_SUBREAPER), so that they can be reaped."""
    _check(lib.pch_set_child_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER)")


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of every timestamp in the harness (same as time.monotonic_ns)."""
    return lib.pch_now_ns()


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd`` (setns CLONE_NEWNET).

    Sockets created afterwards belong to that namespace; sockets made before keep theirs."""
    _check(lib.pch_setns(fd, lib.CLONE_NEWNET), "setns(CLONE_NEWNET)")
