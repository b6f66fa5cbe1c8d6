"""Bounds on imported logs, ``replay --migration``, and crafted QEMU logs answered in one line."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import pytest

from harness import replay as replay_cmd
from postcopy_core.blocktime import EventColumns, Fault, Placed, TraceMeta
from postcopy_core.blocktime.bounds import blocktime_bounds
from postcopy_core.blocktime.qemu101_gen import generate_qemu101_log

MS = 1_000_000


def test_a_wait_cut_short_separates_the_bounds():
    # vCPU 0 faults on A at 0; a signal ends its wait and it faults on B at 2 ms; B is placed at
    # 5 ms, A only at 10 ms.  Upper: blocked [0, 10) = 10 ms; lower: [0, 2) + [2, 5) = 5 ms.
    # vCPU 1 waits once, [1, 4): both bounds agree on it.
    meta = TraceMeta(vcpus=2, page_size=4096)
    events = [
        Fault(0, 0xA000, 0, 0, False),
        Fault(1 * MS, 0xC000, 1, 0, False),
        Fault(2 * MS, 0xB000, 0, 0, False),
        Placed(4 * MS, 0xC000),
        Placed(5 * MS, 0xB000),
        Placed(10 * MS, 0xA000),
    ]
    b = blocktime_bounds(meta, EventColumns.from_events(events))
    assert b["upper"]["vcpu-blocktime-ns"] == [10 * MS, 3 * MS]
    assert b["lower"]["vcpu-blocktime-ns"] == [5 * MS, 3 * MS]
    assert b["upper"]["blocktime-ns"] == b["lower"]["blocktime-ns"] == 3 * MS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _two_migrations(tmp_path):
    a, qa, _ = generate_qemu101_log(2, 300, seed=1)
    b, qb, _ = generate_qemu101_log(3, 300, seed=2)
    path = tmp_path / "two.log"
    path.write_text("\n".join(a + b) + "\n")
    return path, [qa, qb]


def test_replay_every_migration_and_one(tmp_path, capsys):
    path, answers = _two_migrations(tmp_path)
    out = tmp_path / "all.json"
    args = parse(["replay", str(path), "--json", str(out)])
    assert args.func(args) == 0
    runs = json.loads(out.read_text())["migrations"]
    assert [r["vcpus"] for r in runs] == [2, 3]
    for r, qm in zip(runs, answers, strict=True):
        assert r["engines"]["modern"]["postcopy-vcpu-blocktime"] == qm["postcopy-vcpu-blocktime"]
        lo, hi = r["bounds"]["lower"], r["bounds"]["upper"]
        assert all(x <= y for x, y in zip(lo["vcpu-blocktime-ns"], hi["vcpu-blocktime-ns"], strict=True))
    text = " ".join(capsys.readouterr().out.split())  # the table may wrap its title
    assert "migration 1 of 2" in text and "migration 2 of 2" in text and "lower (" in text
    args = parse(["replay", str(path), "--migration", "2", "--json", str(out)])
    assert args.func(args) == 0
    one = json.loads(out.read_text())
    assert one["vcpus"] == 3 and one["meta"]["qemu"]["migration"] == 2
    args = parse(["replay", str(path), "--migration", "3"])
    assert args.func(args) == 2
    assert "holds 2 migration(s)" in capsys.readouterr().err


BASE = "100@1700000000.000000:"
CRAFTED = {
    "huge cpu index": BASE + "mark_postcopy_blocktime_begin addr: 0x1000, dd: 0x1, time: 5, cpu: 1099511627776, "
    "already_received: 0\n",
    "huge cpu in 10.1": BASE + "postcopy_blocktime_tid_cpu_map cpu: 1099511627776, tid: 5\n",
    "huge address": BASE + "postcopy_blocktime_begin addr: 0xffffffffffffffff, time: 5, cpu: 0, exist: 0\n",
    "huge time": BASE + "postcopy_blocktime_begin addr: 0x1000, time: 99999999999999999999, cpu: 0, exist: 0\n",
    "long line": BASE + "mark_postcopy_blocktime_begin " + "x" * 10_000_000 + "\n",
    "binary junk": None,
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_logs_get_one_line_fast(tmp_path, name):
    path = tmp_path / "crafted.log"
    if CRAFTED[name] is None:
        path.write_bytes(BASE.encode() + b"mark_postcopy_blocktime_begin \xff\xfe\x00\x80" * 1000 + b"\n")
    else:
        path.write_text(CRAFTED[name])
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "replay", str(path), "--format", "qemu-log"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_vcpus_option_bounded(tmp_path):
    lines, _, _ = generate_qemu101_log(2, 50, seed=3)
    path = tmp_path / "a.log"
    path.write_text("\n".join(lines) + "\n")
    args = parse(["replay", str(path), "--vcpus", "1000000"])
    assert args.func(args) == 2


def test_mutation_fuzz_of_qemu_logs(tmp_path):
    # Bounded: 120 mutated logs (7.2 and 10.1), each must replay or fail with BlocktimeError
    # (exit 2, one line) -- never another exception -- and the whole loop stays within seconds.
    from postcopy_core.blocktime import BlocktimeError, replay_columns
    from postcopy_core.blocktime.qemu_log import import_qemu_migrations
    from postcopy_core.blocktime.synth import render_qemu_log, synthetic_run

    meta, cols = synthetic_run(2, 30, seed=4, mean_wait_ns=2 * MS, mean_run_ns=MS // 2)
    seeds = [
        render_qemu_log(meta, cols.to_events(), seed=4)[0],
        generate_qemu101_log(2, 80, seed=4)[0],
    ]
    rng = random.Random(1234)
    junk = ["0x" + "f" * 16, "-1", "4294967296", "1099511627776", "", "\x00", "9" * 25, ", ", ":"]
    t0 = time.monotonic()
    for k in range(120):
        lines = list(seeds[k % 2])
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            tokens = lines[i].split(" ")
            j = rng.randrange(len(tokens))
            op = rng.random()
            if op < 0.5:
                tokens[j] = rng.choice(junk)
            elif op < 0.7:
                del tokens[j]
            elif op < 0.85:
                lines.insert(rng.randrange(len(lines)), lines[i])
            else:
                del lines[i]
                continue
            lines[i] = " ".join(tokens)
        path = tmp_path / f"m{k}.log"
        path.write_text("\n".join(lines) + "\n")
        try:
            for m, events in import_qemu_migrations(path):
                replay_columns(m, EventColumns.from_events(events))
        except BlocktimeError as exc:
            assert "\n" not in str(exc)
    assert time.monotonic() - t0 < 60
