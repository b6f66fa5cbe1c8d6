"""The project's C reference (``bench/uffd_ref.c -m mp``) as ``loadtest --reference`` runs it.

One worker process per vCPU, each with its own uffd handed to one handler process, pages copied
from memory (no source process): what one-uffd-per-vCPU costs with nothing else in the way.  The
source ships inside the package (``harness/data/uffd_ref.c`` in an install, ``bench/uffd_ref.c`` in
a checkout); it is built with the system compiler into a temporary directory (the install may be
read-only), run with the sweep point's vCPU count, RAM
size, pattern (``sequential`` = ``-p seq``, ``shared`` = ``-p same``) and backing; its WARM line
(rounds 2..R, the cold first round left out) gives faults/s and the fault p50/p99.
bench/compare_ref.py does the same for its one-to-one table.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

PATTERN = {"sequential": "seq", "shared": "same"}  # harness workload -> reference -p
ROUNDS = 3


class ReferenceError(RuntimeError):
    """The reference cannot be built or run here; one line."""


def default_source() -> Path:
    """The reference's C source: shipped in the package, or ``bench/`` of the checkout it runs from."""
    shipped = Path(__file__).resolve().parent / "data" / "uffd_ref.c"
    if shipped.is_file():
        return shipped
    return Path(__file__).resolve().parent.parent / "bench" / "uffd_ref.c"


def compiler() -> str | None:
    """The system C compiler (``$CC``, else cc or gcc), or None."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


class Reference:
    """A built reference binary (in a temporary directory, removed by :meth:`close`)."""

    def __init__(self, source: str | os.PathLike | None = None) -> None:
        src = Path(source or default_source())
        if not src.is_file():
            raise ReferenceError(f"no {src} (the reference's C source; give another with --reference-source FILE)")
        self.src = src
        self.max_workers = _limit(src, "MAXN")
        self._tmp = tempfile.TemporaryDirectory(prefix="pch-ref-")
        try:
            self.binary = build(src, self._tmp.name)
        except ReferenceError:
            self.close()
            raise

    def supports(self, workload: str, vcpus: int, npages: int) -> str | None:
        """Why the reference cannot run this point (None: it can)."""
        if workload not in PATTERN:
            return f"the reference has no {workload!r} pattern (only {', '.join(PATTERN)})"
        if self.max_workers and vcpus > self.max_workers:
            return f"the reference takes at most {self.max_workers} workers"
        if workload == "sequential" and npages % vcpus:
            return f"the reference needs the {npages} pages to split evenly over {vcpus}"
        return None

    def argv(self, vcpus: int, ram: int, workload: str, hugetlb: bool, pin: bool) -> list[str]:
        argv = [str(self.binary), "-m", "mp", "-n", str(vcpus), "-s", str(ram >> 20), "-r", str(ROUNDS),
                "-p", PATTERN[workload]]
        return argv + (["-H"] if hugetlb else []) + (["-A"] if pin else [])

    def run(self, vcpus: int, ram: int, workload: str, hugetlb: bool = False, pin: bool = False,
            timeout: float = 600.0) -> dict:
        """One run -> ``faults-per-s``, ``p50-us``, ``p99-us`` and its whole WARM line (``warm``)."""
        argv = self.argv(vcpus, ram, workload, hugetlb, pin)
        # its own session: on a timeout or Ctrl-C its handler and workers go down with it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as e:
            _killpg(proc.pid)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise ReferenceError(f"reference {shlex.join(argv[1:])}: no result within {timeout:g} s") from None
            raise
        _killpg(proc.pid)  # a dead main may leave its handler behind
        if proc.returncode:
            said = " | ".join(err.strip().splitlines()[:3]) or f"exit status {proc.returncode}"
            raise ReferenceError(f"reference {shlex.join(argv[1:])}: {' '.join(said.split())}")
        warm = parse_warm(out)
        if warm.get("verify_err"):
            raise ReferenceError(f"reference {shlex.join(argv[1:])}: {warm['verify_err']:.0f} pages failed "
                                 "verification")
        return {"faults-per-s": warm["faults_per_s"], "p50-us": warm["flt_p50_us"], "p99-us": warm["flt_p99_us"],
                "command": shlex.join(["uffd_ref", *argv[1:]]), "warm": warm}

    def close(self) -> None:
        self._tmp.cleanup()


def build(src: Path, out_dir: str) -> Path:
    """``cc -O2 -pthread -o <out_dir>/uffd_ref <src>`` (the source's folder may be read-only); the binary's path."""
    cc = compiler()
    if cc is None:
        raise ReferenceError("building the reference needs a C compiler (cc or gcc, or $CC), none found on PATH")
    out = Path(out_dir) / "uffd_ref"
    try:
        p = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)], capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise ReferenceError(f"building {src}: {cc} took more than 120 s") from None
    if p.returncode or not out.is_file():
        raise ReferenceError(f"building {src} failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return out


def parse_warm(text: str) -> dict:
    """The WARM line's ``key=value`` fields (numbers as floats) plus the totals line's ``verify_err``."""
    def fields(line: str) -> dict:
        out: dict = {}
        for tok in line.split():
            k, sep, v = tok.partition("=")
            if sep:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
        return out

    lines = text.splitlines()
    warm = [ln for ln in lines if ln.split()[1:2] == ["WARM"]]
    totals = [ln for ln in lines if ln.startswith("# totals:")]
    if not warm or not totals:
        raise ReferenceError("the reference printed no WARM or totals line")
    row = fields(warm[-1])
    row["verify_err"] = fields(totals[-1]).get("verify_err", 0.0)
    return row


def _limit(src: Path, name: str) -> int:
    m = re.search(rf"^#define\s+{name}\s+(\d+)\s*$", src.read_text(errors="replace"), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
