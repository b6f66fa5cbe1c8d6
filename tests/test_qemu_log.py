"""QEMU trace-log import: real captures against QEMU's own query-migrate, synthetic logs with known
answers, and clear errors for bad logs."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from postcopy_core.blocktime import BlocktimeError, EventColumns, replay, replay_columns
from postcopy_core.blocktime.qemu101_gen import generate_qemu101_log
from postcopy_core.blocktime.qemu_log import import_qemu_log, import_qemu_migrations
from postcopy_core.blocktime.synth import render_qemu_log, synthetic_run
from postcopy_core.blocktime.trace import detect_format, read_trace

DATA = Path(__file__).parent / "data" / "qemu"
CAPTURES = sorted(
    d for d in DATA.glob("*") if (d / "trace.log.gz").exists() and (d / "query-migrate.json").exists()
)


def _smp(capture: Path) -> int | None:
    try:
        return json.loads((capture / "info.json").read_text())["smp"]
    except (OSError, KeyError, ValueError):
        return None


@pytest.mark.skipif(not CAPTURES, reason="no QEMU capture in tests/data/qemu")
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_seed_replay_of_a_real_capture_matches_query_migrate(capture):
    qm = json.loads((capture / "query-migrate.json").read_text())
    meta, events = read_trace(capture / "trace.log.gz", vcpus=_smp(capture))
    assert meta.source == "qemu-log"
    r = replay(meta, events)
    seed = r["seed"]
    assert abs(seed["postcopy-blocktime"] - qm["postcopy-blocktime"]) <= 1
    assert len(seed["postcopy-vcpu-blocktime"]) == len(qm["postcopy-vcpu-blocktime"])
    for mine, theirs in zip(seed["postcopy-vcpu-blocktime"], qm["postcopy-vcpu-blocktime"], strict=True):
        assert abs(mine - theirs) <= 1
    q = meta.extra["qemu"]
    assert q["mismatched_ends"] == 0
    assert q["logged_total_ms"] == qm["postcopy-blocktime"]
    # The truth can only be at most the smallest per-vCPU blocked time.
    assert r["exact"]["blocktime-ns"] <= min(r["exact"]["vcpu-blocktime-ns"])


def test_enough_captures_of_each_kind():
    # The importer is held to every capture above; keep the variety that found its bugs.
    infos = [json.loads((c / "info.json").read_text()) for c in CAPTURES]
    assert len(CAPTURES) >= 10
    assert {i["smp"] for i in infos} >= {1, 2, 3, 4}
    assert {i.get("accel", "kvm") for i in infos} == {"kvm", "tcg"}
    assert any(i.get("hugetlb") for i in infos) and any(i.get("shared_pages") for i in infos)
    assert any(i["active_vcpus"] < i["smp"] for i in infos)  # an idle AP
    assert any(i["migration"]["max_postcopy_bandwidth_bytes_per_s"] for i in infos)


@pytest.mark.parametrize(("vcpus", "seed"), [(1, 1), (2, 2), (4, 3)])
def test_synthetic_log_round_trip(tmp_path, vcpus, seed):
    meta, cols = synthetic_run(vcpus, 150, seed=seed, mean_wait_ns=2_000_000, mean_run_ns=500_000)
    lines, truth = render_qemu_log(meta, cols.to_events(), seed=seed, late_stamp_prob=0.002)
    path = tmp_path / "trace.log"
    path.write_text("\n".join(lines) + "\n")
    assert detect_format(path) == "qemu-log"
    meta2, events = import_qemu_log(path, vcpus=vcpus)
    got = replay(meta2, events, ["seed"])["seed"]
    assert got["postcopy-blocktime"] == truth["postcopy-blocktime"]
    for mine, theirs in zip(got["postcopy-vcpu-blocktime"], truth["postcopy-vcpu-blocktime"], strict=True):
        assert abs(mine - theirs) <= 2
    assert meta2.extra["qemu"]["mismatched_ends"] == 0


HEAD = "100@1700000000.000000:loadvm_postcopy_handle_listen enter\n"
DD = "0x5500"


def begin(us: int, addr: int, t: int, cpu: int, ar: int = 0, tid: int = 10) -> str:
    return (
        f"{tid}@1700000000.{us:06d}:mark_postcopy_blocktime_begin addr: {addr:#x}, dd: {DD}, time: {t}, "
        f"cpu: {cpu}, already_received: {ar}\n"
    )


def end(us: int, addr: int, total: int, affected: int, tid: int = 11) -> str:
    return (
        f"{tid}@1700000000.{us:06d}:mark_postcopy_blocktime_end addr: {addr:#x}, dd: {DD}, time: {total}, "
        f"affected_cpu: {affected}\n"
    )


def request(us: int, addr: int, pid: int) -> str:
    return (
        f"10@1700000000.{us:06d}:postcopy_ram_fault_thread_request Request for HVA={addr:#x} rb=pc.ram "
        f"offset=0x0 pid={pid}\n"
    )


def test_hand_written_log(tmp_path):
    # One vCPU: fault at offset 5 ms (stamp 5.2 ms), placed 3 ms later -> the total moves by 3.
    # A non-vCPU request (pid 99 -> cpu -1) and a zero page are picked up too.
    text = (
        HEAD
        + request(5100, 0x7000, 42)
        + "10@1700000000.005150:get_mem_fault_cpu_index cpu: 0, pid: 42\n"
        + begin(5200, 0x7000, 5, 0)
        + request(6000, 0x9000, 99)
        + "10@1700000000.006001:get_mem_fault_cpu_index cpu: -1, pid: 99\n"
        + "11@1700000000.006500:postcopy_place_page_zero host=0x9000\n"
        + end(6501, 0x9000, 0, 0)
        + end(8300, 0x7000, 3, 1)
        + "11@1700000000.008301:postcopy_place_page host=0x7000\n"
        + "11@1700000000.009000:postcopy_ram_incoming_cleanup_blocktime total blocktime 3\n"
    )
    path = tmp_path / "log"
    path.write_text(text)
    meta, events = read_trace(path)
    assert meta.vcpus == 1 and meta.tid_map == {42: 0}
    kinds = [(type(e).__name__, e.addr, getattr(e, "vcpu", None), getattr(e, "zero", None)) for e in events]
    assert kinds == [
        ("Fault", 0x7000, 0, None),
        ("Fault", 0x9000, -1, None),
        ("Placed", 0x9000, None, True),
        ("Placed", 0x7000, None, False),
    ]
    r = replay(meta, events)
    assert r["seed"]["postcopy-blocktime"] == 3 and r["seed"]["postcopy-vcpu-blocktime"] == [3]
    assert r["modern"]["non-vcpu-faults"] == 1
    assert meta.extra["qemu"]["logged_total_ms"] == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD, "no mark_postcopy_blocktime_begin/end lines"),
        (HEAD + end(10, 0x1000, 0, 0), "only end lines"),
        (HEAD + begin(10, 0x1000, 5, 0)[:-30] + "\n", "line 2: malformed mark_postcopy_blocktime_begin"),
        (HEAD + end(10, 0x1000, 0, 0).replace("affected_cpu", "affected"), "line 2: malformed"),
        (
            HEAD
            + "mark_postcopy_blocktime_begin addr: 0x1000, dd: 0x1, time: 1, cpu: 0, already_received: 0\n",
            "line 2: .*-msg timestamp=on",
        ),
        (
            HEAD + begin(10, 0x1000, 5, 0) + begin(20, 0x2000, 6, 0).replace(DD, "0x6600"),
            "2 migrations in this log .*--migration N",
        ),
    ],
)
def test_bad_logs(tmp_path, text, message):
    path = tmp_path / "log"
    path.write_text(text)
    with pytest.raises(BlocktimeError, match=message) as info:
        read_trace(path, fmt="qemu-log")
    assert "\n" not in str(info.value)


def test_vcpus_too_small(tmp_path):
    path = tmp_path / "log"
    path.write_text(HEAD + begin(10, 0x1000, 5, 3))
    with pytest.raises(BlocktimeError, match=r"--vcpus 2 is smaller than the 4 vCPUs the log .* uses \(vCPU 3"):
        read_trace(path, vcpus=2)


def test_begin_raced_by_its_end(tmp_path):
    # vCPU 1's fault on 0x2000 filled its slot, the placement released it (affected 1), and only then
    # did the received check undo the slot (time 0, already_received 1): smp_cpus_down goes one low,
    # so later ends never see every vCPU down and the total stays 0, as the log says.
    text = (
        HEAD
        + begin(5200, 0x1000, 5, 0)
        + begin(6300, 0x2000, 0, 1, ar=1)
        + end(6300, 0x2000, 0, 1)
        + end(8300, 0x1000, 0, 1)
        + begin(10200, 0x3000, 10, 0)
        + begin(11200, 0x4000, 11, 1)
        + end(13300, 0x3000, 0, 1)
        + end(14300, 0x4000, 0, 1)
    )
    path = tmp_path / "log"
    path.write_text(text)
    meta, events = import_qemu_log(path, vcpus=2)
    q = meta.extra["qemu"]
    assert q["mismatched_ends"] == 0 and q["raced_begins"] == 1
    late = [e for e in events if getattr(e, "received_late", False)]
    assert [(e.addr, e.vcpu) for e in late] == [(0x2000, 1)]
    seed = replay(meta, events, ["seed"])["seed"]
    assert seed["postcopy-blocktime"] == 0
    assert seed["postcopy-vcpu-blocktime"][0] == 3 + 3
    assert seed["postcopy-vcpu-blocktime"][1] in (3, 4)  # the raced wait is 0 or 1 ms
    # The columnar path (flag 2) gives the same numbers.
    assert replay_columns(meta, EventColumns.from_events(events)) == replay(meta, events)


def test_several_migrations_in_one_log_are_split(tmp_path):
    # Two QEMU 7.2 captures and a QEMU 10.1 log appended to one file: three migrations, each
    # replayed on its own and matching its own query-migrate.
    small = [c for c in CAPTURES if c.name in ("kvm-smp2-hugetlb", "kvm-smp1-hugetlb")]
    assert len(small) == 2
    text = "".join(gzip.open(c / "trace.log.gz", "rt").read() for c in small)
    lines101, qm101, _ = generate_qemu101_log(2, 200, seed=9)
    path = tmp_path / "all.log"
    path.write_text(text + "\n".join(lines101) + "\n")
    found = import_qemu_migrations(path)
    assert [m.extra["qemu"]["migration"] for m, _ in found] == [1, 2, 3]
    for (meta, events), capture in zip(found, small, strict=False):
        qm = json.loads((capture / "query-migrate.json").read_text())
        got = replay(meta, events, ["seed"])["seed"]
        assert got["postcopy-blocktime"] == qm["postcopy-blocktime"]
        assert got["postcopy-vcpu-blocktime"] == qm["postcopy-vcpu-blocktime"]
    meta, events = found[2]
    assert replay(meta, events, ["modern"])["modern"]["postcopy-vcpu-blocktime"] == qm101["postcopy-vcpu-blocktime"]


def test_clock_from_sparse_begins():
    # 40 begins whose clock reads fall anywhere in their millisecond: the true clock difference is
    # inside the intersection of their two-sided bounds (width ~1/40 ms), and the importer's estimate
    # (its middle) is within that width of it.
    from postcopy_core.blocktime.qemu_log import _Begin, _Clock

    rng = random.Random(7)
    k = 1_700_000_000_123_456_789
    delay = 3_000
    begins = []
    for i in range(40):
        c = k + (i * 37 + 5) * 1_000_000 + rng.randrange(1_000_000)
        begins.append(_Begin(i, c + delay, 0x1000 * i, (c - k) // 1_000_000, 0, False, 0))
    clock = _Clock(begins)
    err = [abs(clock.offset_ns(b.w) - (b.w - delay - k)) for b in begins]
    assert max(err) < 60_000
