"""Output files (``--json``, ``--trace``, ``--report``) created safely, and checked before a run.

Runs are often root's, and output paths often in shared folders such as /tmp: a file is opened
without following a symbolic link at its name (``O_NOFOLLOW``), must be a regular file with one
link (a planted hard link would point the write elsewhere) -- or a character device such as
/dev/null --, and is created ``0600`` when it holds
guest data (page addresses: traces; a private file that already exists is made ``0600`` too).
:func:`output_problem` says before the run why a path cannot take the file -- a pseudo filesystem
such as /proc or /sys (root may open files there, the write then fails), a missing folder, a folder
that refuses a new file -- so a long migration is not run for nothing.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import IO

PRIVATE = 0o600
PUBLIC = 0o644
# filesystems that hold no user files: writes there configure the kernel or fail
PSEUDO_FS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "devpts", "configfs",
    "pstore", "bpf", "efivarfs", "fusectl", "mqueue", "binfmt_misc", "autofs", "selinuxfs", "nsfs",
})


def _pseudo_devices() -> dict[int, str]:
    """st_dev -> filesystem type of every mounted pseudo filesystem (from /proc/self/mountinfo)."""
    found: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, fstype = left.split(), right.split()[:1]
                if len(fields) > 2 and fstype and fstype[0] in PSEUDO_FS:
                    major, _, minor = fields[2].partition(":")
                    found[os.makedev(int(major), int(minor))] = fstype[0]
    except (OSError, ValueError):
        pass
    return found


def pseudo_fs(path: str) -> str | None:
    """The pseudo filesystem type ``path`` (which exists) lives on, or None."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    return _pseudo_devices().get(dev)


def output_problem(path: str | None) -> str | None:
    """Why ``path`` cannot take an output file (None if it can), found now, not after a long run.
    Nothing is left behind: an existing file is opened without truncating it, a new one is created
    and removed at once."""
    if path is None:
        return None
    if os.path.islink(path):
        return "is a symbolic link (refused: output files are never written through one)"
    if os.path.isdir(path):
        return "is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    kind = pseudo_fs(path if os.path.exists(path) else folder)
    if kind:
        return f"is on {kind}, a kernel filesystem, not a place for output files"
    existed = os.path.exists(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | (0 if existed else os.O_EXCL), PRIVATE)
    except OSError as e:
        return _why(e)
    try:
        return _not_plain(os.fstat(fd))
    finally:
        os.close(fd)
        if not existed:
            os.unlink(path)


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "is a symbolic link (refused: output files are never written through one)"
    if e.errno == errno.ENXIO:
        return "is a FIFO with no reader; give a regular file"
    return (e.strerror or str(e)).lower()


def _not_plain(st: os.stat_result) -> str | None:
    if stat.S_ISCHR(st.st_mode):  # a sink such as /dev/null: nothing is kept there
        return None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links (refused: the write would change the other names too)"
    return None


def open_output(path: str, mode: str = "w", private: bool = False, encoding: str | None = "utf-8") -> IO:
    """``open(path, mode)`` for writing ("w", "wb"), without following a symbolic link at ``path``,
    refusing anything but a regular file with one link, mode 0600 when ``private``.  Raises OSError
    (its strerror says why)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 PRIVATE if private else PUBLIC)
    try:
        problem = _not_plain(os.fstat(fd))
        if problem:
            raise OSError(errno.EINVAL, f"{path} {problem}")
        os.set_blocking(fd, True)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)  # truncated only now: a refused file keeps its content
            if private:
                os.fchmod(fd, PRIVATE)  # an existing file keeps its mode through O_CREAT
        raw = io.FileIO(fd, "wb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    binary = io.BufferedWriter(raw)
    return binary if "b" in mode else io.TextIOWrapper(binary, encoding=encoding, newline=None)
