"""Crafted native traces: every mutation gets a result or one line and exit 2, in well under a second.

A small deterministic mutation fuzz over a valid trace (numbers swapped for extreme ones, bytes
flipped, lines dropped or repeated), plus the cases a tester found by hand: a billion vCPUs, a
2^64 page size, a number of thousands of digits, deeply nested JSON, ``--vcpus 1000000``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import random
import re
import time

import pytest

from harness import replay

VALID = """#postcopy-harness-trace v1
M {"extra": {}, "page_size": 4096, "source": "harness", "start_ns": 0, "tid_map": {"4242": 0, "4243": 1}, "vcpus": 2}
F 1500000 0 0x7000 4242 -
F 1600000 - 0x8000 4243 0
F 1700000 -1 0x9000 77 1
P 3000000 0x7000 0
P 3100000 0x8000 1
#end events=5
"""
EXTREME = ["0", "-1", "1", "65536", "1000000000", "4294967296", "1099511627776", str(1 << 63), str(1 << 64),
           "9" * 40, "9" * 5000, "1e999", "-0", "0x7fffffffffffffff", "nan"]
CASES = 400
PER_CASE_S = 2.0  # generous for a loaded 2-core host; a bounded parse of this file takes milliseconds


def mutate(rng: random.Random) -> str:
    pieces = re.split(r"(\d+)", VALID)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(pieces))
        op = rng.random()
        if pieces[i].isdigit() and op < 0.7:
            pieces[i] = rng.choice(EXTREME)
        elif pieces[i]:
            raw = bytearray(pieces[i].encode())
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            pieces[i] = raw.decode("latin-1")
    lines = "".join(pieces).splitlines(keepends=True)
    if rng.random() < 0.2 and len(lines) > 2:
        del lines[rng.randrange(1, len(lines))]
    if rng.random() < 0.2:
        j = rng.randrange(len(lines))
        lines.insert(j, lines[j])
    return "".join(lines)


def replay_once(path: str, vcpus: int | None = None) -> tuple[int, str, float]:
    args = argparse.Namespace(file=path, engine="all", format="auto", vcpus=vcpus, json=os.devnull, compare=None,
                              migration=None)
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = replay.run(args)
    return rc, err.getvalue(), time.monotonic() - t0


def assert_one_line_or_ok(rc: int, err: str, dt: float, what: str) -> None:
    assert rc in (0, 2), what
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("postcopy-harness replay: "), (what, err)
        assert len(err) < 400, (what, err[:400])
    assert dt < PER_CASE_S, (what, dt)


def test_mutated_native_traces_get_one_line(tmp_path):
    rng = random.Random(13)
    path = str(tmp_path / "t.trace")
    failures = 0
    for case in range(CASES):
        text = mutate(rng)
        if case % 5 == 0:
            with gzip.open(path, "wt", encoding="latin-1") as f:
                f.write(text)
        else:
            with open(path, "w", encoding="latin-1") as f:
                f.write(text)
        rc, err, dt = replay_once(path)  # any exception (MemoryError, OverflowError...) fails the test
        assert_one_line_or_ok(rc, err, dt, text)
        failures += rc == 2
    assert failures > CASES // 4  # the mutations do reach the checks (not all of them are harmless)


HAND_MADE = [
    ('"vcpus": 2', '"vcpus": 1000000000', "vcpus must be an integer in 1..16384"),
    ('"vcpus": 2', '"vcpus": ' + "9" * 5000, "metadata is not usable JSON"),
    ('"page_size": 4096', '"page_size": 18446744073709551616', "page_size must be a power of two"),
    ('"start_ns": 0', '"start_ns": 18446744073709551616', "start_ns must be an integer"),
    ('"tid_map": {"4242": 0', '"tid_map": {"4242": 1099511627776', "tid_map entry"),
    ('"extra": {}', '"extra": ' + "[" * 100000 + "]" * 100000, "metadata is not usable JSON"),
    ("#end events=5", "#end events=" + "9" * 5000, "malformed end marker"),
    ("F 1500000 0 0x7000", "F 1500000 4294967296 0x7000", "malformed record"),
    ("P 3000000 0x7000", "P 3000000 0x" + "f" * 40, "malformed record"),
]


@pytest.mark.parametrize("old,new,message", HAND_MADE)
def test_crafted_values_are_bounded(tmp_path, old, new, message):
    path = tmp_path / "t.trace"
    assert old in VALID
    path.write_text(VALID.replace(old, new, 1))
    rc, err, dt = replay_once(str(path))
    assert rc == 2 and message in err, err
    assert_one_line_or_ok(rc, err, dt, new[:80])


def test_replay_vcpus_option_is_bounded(tmp_path):
    path = tmp_path / "t.trace"
    path.write_text(VALID)
    rc, err, dt = replay_once(str(path), vcpus=1_000_000)
    assert rc == 2 and "--vcpus must be 1..16384" in err, err
    assert_one_line_or_ok(rc, err, dt, "--vcpus 1000000")
    assert replay_once(str(path), vcpus=16384)[0] == 0  # the bound itself is accepted
