"""Guest RAM on the destination: the shared memfd and the received map in named shared memory.

The memfd (shmem, or hugetlbfs with MFD_HUGETLB) is what every vCPU worker maps; the received map
(one byte per page, 1 = placed) lives in POSIX shared memory.  Its name carries the run's pid and a
random token, is created exclusively (nobody can guess it in advance, so nobody can make it first
and hand us their memory), and is unlinked as soon as the orchestrator has mapped it: the children
inherit the mapping over fork, so not even a SIGKILLed orchestrator leaves an entry in /dev/shm.
"""

from __future__ import annotations

import os
import re
import secrets

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


class SharedMemoryClash(FileExistsError):
    """The name chosen for a segment exists already (someone made it first); one line for the user."""


def segment_name(role: str) -> str:
    """``/pch-<pid>-<random token>-<role>``: the pid lets a later run sweep it, the token makes it unguessable."""
    return f"/{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(8)}-{role}"


class ReceivedMap:
    """One byte per page in shared memory: 1 once the page has been placed.

    Only the placement side writes it.  Bytes rather than bits so the hot path tests a page with a
    single index and no shifting.  The name lives only between its exclusive creation and the
    mapping (microseconds); processes forked later share the mapping, not the name.  ``fd`` stays
    open for the vCPU workers, which on hugetlbfs map it read-only: "not placed yet" is how an
    access knows it will fault (vcpu_workers/worker.py).
    """

    def __init__(self, npages: int, name: str | None = None) -> None:
        self.name = name or segment_name("received")
        try:
            shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=npages)
        except posix_ipc.ExistentialError:
            raise SharedMemoryClash(f"/dev/shm{self.name} already exists (made by another process?): "
                                    "refusing to share guest state through it") from None
        try:
            self._mapping = kernel.mmap_fd(shm.fd, npages)
        except BaseException:
            shm.close_fd()
            raise
        finally:
            unlink_quietly(self.name)
        self.fd = shm.fd  # closed by close()
        self.view = memoryview(self._mapping.buffer())
        self.npages = npages

    def __getitem__(self, page: int) -> int:
        return self.view[page]

    def close(self) -> None:
        """Unmap and close (the name is gone already)."""
        self.view.release()
        self._mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.Error:  # gone already, or not ours to remove (sticky /dev/shm)
        pass


def sweep_stale_segments() -> list[str]:
    """Unlink our own /dev/shm segments left by runs whose orchestrator is gone (runs of versions that
    kept the name); returns their names.  Another user's file under our prefix is left alone."""
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
        try:
            mine = os.lstat(f"/dev/shm/{name}").st_uid == os.geteuid()
        except OSError:
            continue
        if mine and pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            unlink_quietly("/" + name)
            swept.append(name)
    return swept
