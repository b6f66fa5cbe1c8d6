"""Native trace files: round trips, gzip, and one clear error line for bad input."""

from __future__ import annotations

import gzip

import pytest

from postcopy_core.blocktime import (
    TRUTH,
    BlocktimeError,
    Fault,
    Placed,
    StallColumns,
    TraceMeta,
    replay,
    replay_columns,
    truth_result,
)
from postcopy_core.blocktime.trace import TraceWriter, detect_format, read_trace, read_trace_columns

EVENTS = [
    Fault(1_000_000, 0x1000, 0, 4242, None),
    Fault(1_500_000, 0x2000, -1, 77, None),
    Fault(2_000_000, 0x3000, 1, 4243, True),
    Placed(2_500_000, 0x1000, False),
    Fault(2_600_000, 0x4000, 1, 4243, False),
    Placed(3_000_000, 0x2000, True),
    Placed(4_000_000, 0x4000, False),
]


def write(path, events=EVENTS, **kw) -> TraceMeta:
    meta = TraceMeta(
        vcpus=2, page_size=4096, tid_map={4242: 0, 4243: 1}, start_ns=500_000, extra={"run": 7}, **kw
    )
    with TraceWriter(path, meta) as w:
        for ev in events:
            w.write(ev)
    return meta


@pytest.mark.parametrize("name", ["t.trace", "t.trace.gz"])
def test_round_trip_gives_the_same_events_and_results(tmp_path, name):
    path = tmp_path / name
    meta = write(path)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert detect_format(path) == "native"
    meta2, events = read_trace(path)
    assert events == EVENTS
    assert (meta2.vcpus, meta2.page_size, meta2.tid_map, meta2.start_ns) == (
        2,
        4096,
        {4242: 0, 4243: 1},
        500_000,
    )
    assert meta2.extra == {"run": 7}
    assert replay(meta2, events) == replay(meta, EVENTS)
    _, cols = read_trace_columns(path)
    assert cols.to_events() == EVENTS


def test_vcpu_from_tid_map(tmp_path):
    path = tmp_path / "t.trace"
    path.write_text(
        "#postcopy-harness-trace v1\n"
        'M {"vcpus": 2, "page_size": 4096, "tid_map": {"900": 1}}\n'
        "F 10 - 0x1000 900 -\n"
        "F 11 - 0x1000 901 -\n"
        "#end events=2\n"
    )
    _, events = read_trace(path)
    assert [e.vcpu for e in events] == [1, -1]


def test_vcpus_override(tmp_path):
    path = tmp_path / "t.trace"
    write(path)
    meta, _ = read_trace(path, vcpus=8)
    assert meta.vcpus == 8


def test_missing_end_marker_is_accepted_but_flagged(tmp_path):
    path = tmp_path / "t.trace"
    write(path)
    path.write_text("".join(path.read_text().splitlines(True)[:-1]))
    meta, events = read_trace(path)
    assert meta.extra["complete"] is False and len(events) == len(EVENTS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("#postcopy-harness-trace v2\n", "line 1: unsupported trace version v2"),
        ("hello\n", "unrecognised format"),
        ("#postcopy-harness-trace v1\nF 1 0 0x0 0 -\n", "line 2: event before the 'M' metadata line"),
        ("#postcopy-harness-trace v1\nM {not json\n", "line 2: metadata is not valid JSON"),
        ('#postcopy-harness-trace v1\nM {"vcpus": 0, "page_size": 4096}\n', "line 2: bad metadata"),
        ('#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4000}\n', "line 2: bad metadata"),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nF 1 0 0x1000 0\n',
            "line 3: malformed",
        ),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nF x 0 0x1000 0 -\n',
            "line 3: malformed",
        ),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nF 1 0 0x1000 0 2\n',
            "line 3: malformed",
        ),
        ('#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nP 1 zz 0\n', "line 3: malformed"),
        ('#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nQ 1\n', "line 3: malformed"),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\n#end events=3\n',
            "end marker says 3",
        ),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\n#end events=0\nP 1 0x0 0\n',
            "line 4",
        ),
        ('#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nS 0 5 1 0x0\n', "line 3: malformed"),
        ('#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nS 0 1 2\n', "line 3: malformed"),
        ('#postcopy-harness-trace v1\nS 0 1 2 0x0\n', "line 2: event before the 'M'"),
        (
            '#postcopy-harness-trace v1\nM {"vcpus": 1, "page_size": 4096}\nS 0 1 2 0x0\n#end events=0 stalls=2\n',
            "end marker says 2 stall intervals",
        ),
    ],
)
def test_bad_input_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.trace"
    path.write_text(text)
    with pytest.raises(BlocktimeError, match=message) as info:
        read_trace(path)
    assert "\n" not in str(info.value)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t.trace.gz"
    write(path, EVENTS * 2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BlocktimeError, match=r"line \d+: gzip data truncated or corrupt"):
        read_trace(path)


def test_corrupt_gzip_and_missing_file(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(BlocktimeError, match="gzip"):
        read_trace(path)
    with pytest.raises(BlocktimeError, match="cannot open"):
        read_trace(tmp_path / "nope")


def test_plain_gzip_content_is_detected_without_suffix(tmp_path):
    src = tmp_path / "t.trace"
    write(src)
    dst = tmp_path / "renamed"
    dst.write_bytes(gzip.compress(src.read_bytes()))
    assert read_trace(dst)[1] == EVENTS


STALLS = StallColumns.from_lists([0, 1, 0], [900_000, 1_900_000, 2_550_000], [2_600_000, 4_100_000, 2_700_000],
                                 [0x1000, 0x4000, 0x5000])


@pytest.mark.parametrize("name", ["t.trace", "t.trace.gz"])
def test_stall_intervals_round_trip_and_give_truth(tmp_path, name):
    path = tmp_path / name
    meta = TraceMeta(vcpus=2, page_size=4096)
    with TraceWriter(path, meta) as w:
        w.write_many(EVENTS)
        w.write_stalls(STALLS)
    meta2, cols = read_trace_columns(path)
    assert cols.to_events() == EVENTS
    assert cols.stalls is not None
    for col in ("vcpu", "start_ns", "end_ns", "addr"):
        assert getattr(cols.stalls, col).tolist() == getattr(STALLS, col).tolist()
    res = replay_columns(meta2, cols)
    assert res[TRUTH] == truth_result(meta, STALLS)
    assert res[TRUTH]["vcpu-blocktime-ns"] == [1_800_000, 2_200_000]  # vCPU 0: [0.9, 2.7) ms
    assert read_trace(path)[1] == EVENTS  # the per-event reader just skips them


def test_a_trace_without_intervals_is_unchanged_and_has_no_truth(tmp_path):
    path = tmp_path / "t.trace"
    write(path)
    assert path.read_text().splitlines()[-1] == f"#end events={len(EVENTS)}"  # as before intervals existed
    meta, cols = read_trace_columns(path)
    assert cols.stalls is None
    assert TRUTH not in replay_columns(meta, cols)


def test_a_run_where_no_vcpu_stalled_still_has_a_truth(tmp_path):
    path = tmp_path / "t.trace"
    meta = TraceMeta(vcpus=2, page_size=4096)
    with TraceWriter(path, meta) as w:
        w.write_stalls(StallColumns.from_lists([], [], []))
    assert path.read_text().splitlines()[-1] == "#end events=0 stalls=0"
    meta, cols = read_trace_columns(path)
    res = replay_columns(meta, cols)
    assert res[TRUTH]["vcpu-blocktime-ns"] == [0, 0] and res[TRUTH]["blocktime-ns"] == 0
