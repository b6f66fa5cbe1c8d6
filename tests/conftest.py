"""Shared fixtures: leftover checks (processes, /dev/shm, sockets) and huge page reservation."""

from __future__ import annotations

import os
import time

import psutil
import pytest

HUGEPAGES = "/proc/sys/vm/nr_hugepages"


# Every process this test session starts carries this tag in its environment (children inherit
# it), so the leftover checks count what *we* left, not the runs of other people on the machine.
SESSION_TAG = f"PCH_TEST_SESSION={os.getpid()}-{time.monotonic_ns()}"
os.environ["PCH_TEST_SESSION"] = SESSION_TAG.split("=", 1)[1]


def _ours(pid: int) -> bool | None:
    """Whether process ``pid`` belongs to this test session (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        if not env:  # a zombie shows no environment: ours if we (or our subreaper role) must reap it
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            return ppid == os.getpid() or _ours(ppid) is True
        return SESSION_TAG.encode() in env.split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return False


def leftovers() -> list[str]:
    """Everything a run of this session may leave behind: pch-* processes, /dev/shm segments,
    abstract sockets (named after the orchestrator's pid: ours, or one that is gone)."""
    found = []
    for p in psutil.process_iter(["name", "pid"]):
        if (p.info["name"] or "").startswith("pch-") and _ours(p.info["pid"]):
            found.append(f"process {p.info['name']} pid {p.info['pid']}")
    try:
        found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith("pch-")]
    except OSError:
        pass
    with open("/proc/net/unix") as f:
        for line in f:
            name = line.split()[-1]
            if not name.startswith("@pch-"):
                continue
            pid = name.split("-")[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _ours(int(pid)) is not False:
                found.append(f"socket {name}")
    return found


def _reap_adopted() -> None:
    """In-process runs make this process a child subreaper: reap orphans that were handed to us."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def wait_no_leftovers(timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        _reap_adopted()
        left = leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def clean_machine():
    """Fail the test if it leaves any process, segment or socket of a run behind."""
    before = set(leftovers())
    yield
    left = [x for x in wait_no_leftovers() if x not in before]
    assert not left, f"left behind: {left}"


def _uffd_usable() -> bool:
    try:
        from postcopy_core import kernel

        kernel.Uffd.open(kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM).close()
        return True
    except Exception:
        return False


requires_uffd = pytest.mark.skipif(not _uffd_usable(), reason="userfaultfd with THREAD_ID/MISSING_SHMEM unavailable")


@pytest.fixture
def hugepages():
    """Reserve huge pages for a test and restore the setting after: ``hugepages(n)``."""
    with open(HUGEPAGES) as f:
        original = f.read().strip()

    def reserve(n: int) -> None:
        try:
            with open(HUGEPAGES, "w") as f:
                f.write(str(n))
        except OSError as e:
            pytest.skip(f"cannot reserve huge pages ({e.strerror}): needs root")
        with open(HUGEPAGES) as f:
            got = int(f.read())
        if got < n:
            pytest.skip(f"the kernel reserved only {got} of {n} huge pages (memory fragmented)")

    yield reserve
    with open(HUGEPAGES, "w") as f:
        f.write(original)
