"""Guest RAM on the destination: the shared memfd and the received map in named shared memory.

The memfd (shmem, or hugetlbfs with MFD_HUGETLB) is what every vCPU worker maps; the received map
(one byte per page, 1 = placed) lives in POSIX shared memory under a name that includes the run's
pid, so a dashboard can attach to a live run, and a later run can sweep segments of dead runs.
"""

from __future__ import annotations

import os
import re

import posix_ipc

from postcopy_core import kernel

SHM_PREFIX = "pch-"
_SHM_RE = re.compile(r"^pch-(\d+)-")


class GuestRam:
    """The memfd that backs guest RAM; the orchestrator creates it, every process maps it."""

    def __init__(self, size: int, hugetlb: bool = False, name: str = "pch-guest-ram") -> None:
        self.size = size
        self.hugetlb = hugetlb
        self.page_size = kernel.HUGE_PAGE_SIZE if hugetlb else kernel.PAGE_SIZE
        if size % self.page_size:
            raise ValueError(f"RAM size {size} is not a multiple of the page size {self.page_size}")
        self.fd = kernel.memfd_create(name, hugetlb=hugetlb)
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            os.close(self.fd)
            raise kernel.KernelError("ftruncate(memfd)", e.errno, f"{size} bytes") from None

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReceivedMap:
    """One byte per page in named shared memory: 1 once the page has been placed.

    Only the placement side writes it; anyone may read it.  Bytes rather than bits so the hot path
    tests a page with a single index and no shifting.
    """

    def __init__(self, npages: int, name: str | None = None, create: bool = True) -> None:
        self.name = name or f"/{SHM_PREFIX}{os.getpid()}-received"
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(self.name, flags, mode=0o600, size=npages if create else 0)
        try:
            # mapped through the kernel module so no fd stays open behind the mapping
            self._mapping = kernel.mmap_fd(shm.fd, npages)
        finally:
            shm.close_fd()
        self.view = memoryview(self._mapping.buffer())
        self.npages = npages
        self._owner = create

    def __getitem__(self, page: int) -> int:
        return self.view[page]

    def close(self) -> None:
        """Unmap; the creator also unlinks the name."""
        self.view.release()
        self._mapping.close()
        if self._owner:
            unlink_quietly(self.name)
            self._owner = False


def unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def sweep_stale_segments() -> list[str]:
    """Unlink /dev/shm segments of earlier runs whose orchestrator is gone; returns their names."""
    swept = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return swept
    for name in names:
        m = _SHM_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            unlink_quietly("/" + name)
            swept.append(name)
    return swept
