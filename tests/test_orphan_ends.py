"""An end line that woke a vCPU on an address no begin line named cannot happen in a whole QEMU log:
both importers count such lines and ``replay`` warns with the count (QEMU 7.2 and 10.1 logs)."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

from postcopy_core.blocktime.qemu101_gen import generate_qemu101_log
from postcopy_core.blocktime.qemu_log import import_qemu_log

CAPTURE = Path(__file__).resolve().parent / "data" / "qemu" / "kvm-smp2-bw24" / "trace.log.gz"
NOWHERE = 0x7F00DEAD0000  # an address no begin line of these logs names


def _replay_out(path: Path) -> str:
    return subprocess.run([sys.executable, "-m", "harness.cli", "replay", str(path)], capture_output=True,
                          text=True, timeout=120).stdout


def test_qemu72_end_without_begin_is_counted_and_warned(tmp_path):
    lines = gzip.decompress(CAPTURE.read_bytes()).decode().splitlines()
    meta, _ = import_qemu_log(CAPTURE)
    assert meta.extra["qemu"]["ends_without_begin"] == 0
    i = max(k for k, x in enumerate(lines) if "mark_postcopy_blocktime_end" in x)
    orphan = re.sub(r"addr: 0x[0-9a-fA-F]+", f"addr: {NOWHERE:#x}", lines[i])
    lines.insert(i + 1, re.sub(r"affected_cpu: -?\d+", "affected_cpu: 1", orphan))
    bad = tmp_path / "orphan.log"
    bad.write_text("\n".join(lines) + "\n")
    meta, _ = import_qemu_log(bad)
    assert meta.extra["qemu"]["ends_without_begin"] == 1
    assert "warning: 1 end lines affected vCPUs on an address no begin line named" in _replay_out(bad)


def test_qemu101_end_without_begin_is_counted_and_warned(tmp_path):
    lines, _qm, _ends = generate_qemu101_log(2, 200, seed=7)
    good = tmp_path / "good.log"
    good.write_text("\n".join(lines) + "\n")
    assert import_qemu_log(good)[0].extra["qemu"]["ends_without_begin"] == 0
    i = max(k for k, x in enumerate(lines) if "postcopy_blocktime_end " in x or "postcopy_blocktime_end:" in x)
    orphan = re.sub(r"addr: 0x[0-9a-fA-F]+", f"addr: {NOWHERE:#x}", lines[i])
    lines.insert(i + 1, re.sub(r"affected_cpus: \d+", "affected_cpus: 1", orphan))
    bad = tmp_path / "orphan.log"
    bad.write_text("\n".join(lines) + "\n")
    assert import_qemu_log(bad)[0].extra["qemu"]["ends_without_begin"] == 1
    assert "warning: 1 end lines affected vCPUs on an address no begin line named" in _replay_out(bad)
