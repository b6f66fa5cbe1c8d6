"""QEMU 10.1+ logs: the importer and the modern engine against generated logs with known answers."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy_core.blocktime import EventColumns, replay, replay_columns
from postcopy_core.blocktime.qemu101_gen import generate_qemu101_log
from postcopy_core.blocktime.qemu_log import import_qemu_log
from postcopy_core.blocktime.trace import detect_format

QM_KEYS = (
    "postcopy-blocktime",
    "postcopy-vcpu-blocktime",
    "postcopy-latency",
    "postcopy-vcpu-latency",
    "postcopy-non-vcpu-latency",
    "postcopy-latency-dist",
)


def _write(tmp_path, lines, name="qemu101.log"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vcpus=st.integers(1, 6),
    steps=st.integers(20, 600),
    seed=st.integers(0, 2**32),
    stamps=st.booleans(),
    non_vcpu=st.integers(0, 3),
)
def test_modern_engine_reproduces_qemu101(tmp_path, vcpus, steps, seed, stamps, non_vcpu):
    lines, qm, ends = generate_qemu101_log(vcpus, steps, seed, stamps=stamps, non_vcpu_threads=non_vcpu)
    path = _write(tmp_path, lines)
    if not any("postcopy_blocktime_begin" in x for x in lines):
        return  # nothing faulted: the importer says so (tested below)
    meta, events = import_qemu_log(path)
    q = meta.extra["qemu"]
    assert meta.vcpus == vcpus and q["version"] == "10.1+"
    # Every end line's affected_cpus / affected_non_cpus / end_one left_faults, and every begin's exist.
    assert q["end_lines"] == len(ends) and q["mismatched_ends"] == 0
    got = replay(meta, events, ["modern"])["modern"]
    assert {k: got[k] for k in QM_KEYS} == qm
    cols = replay_columns(meta, EventColumns.from_events(events), ["modern"])["modern"]
    assert {k: cols[k] for k in QM_KEYS} == qm


def test_a_wrong_count_is_caught(tmp_path):
    lines, _qm, ends = generate_qemu101_log(3, 400, seed=5)
    affected, non, idx = next(e for e in ends if e[0] > 0)
    lines[idx] = re.sub(r"affected_cpus: \d+", f"affected_cpus: {affected + 1}", lines[idx])
    meta, _ = import_qemu_log(_write(tmp_path, lines))
    assert meta.extra["qemu"]["mismatched_ends"] == 1
    assert meta.extra["qemu"]["first_mismatch_lines"] == [idx + 1]


def test_detected_without_stamps(tmp_path):
    lines, _, _ = generate_qemu101_log(2, 100, seed=1, stamps=False)
    assert detect_format(_write(tmp_path, lines)) == "qemu-log"


def test_time_going_backwards_is_counted_and_warned(tmp_path):
    import subprocess
    import sys

    lines, _qm, _ends = generate_qemu101_log(2, 200, seed=7)
    path = _write(tmp_path, lines)
    meta, _ = import_qemu_log(path)
    assert meta.extra["qemu"]["backwards_times"] == 0
    idx = [i for i, x in enumerate(lines) if "postcopy_blocktime_begin" in x][5]
    lines[idx] = re.sub(r"time: \d+", "time: 1", lines[idx])  # before every earlier line
    bad = _write(tmp_path, lines, "bad.log")
    meta, _ = import_qemu_log(bad)
    assert meta.extra["qemu"]["backwards_times"] == 1
    out = subprocess.run([sys.executable, "-m", "harness.cli", "replay", str(bad)], capture_output=True, text=True,
                         timeout=120).stdout
    assert "warning: 1 lines whose time: goes backwards" in out
