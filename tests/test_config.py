"""Run configuration: size parsing and one-line ConfigError for every bad field."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import ConfigError, RunConfig, parse_size
from postcopy_core.kernel import HUGE_PAGE_SIZE, PAGE_SIZE
from postcopy_core.link import Link


@pytest.mark.parametrize(
    "text, value",
    [
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("4096", 4096),
        ("512KiB", 512 << 10),
        ("512kib", 512 << 10),
        ("2g", 2 << 30),
        ("3MB", 3 << 20),
        ("1T", 1 << 40),
        ("1TiB", 1 << 40),
        (" 8 k ", 8 << 10),
        ("100b", 100),
        ("0", 0),
        ("007M", 7 << 20),
        (12345, 12345),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12Q", "", " ", "M", "1.5G", "-1M", "+1M", "1 G B", "1KiBB", "0x10", "1e6",
                                  "1GiG", "ten", "1,024", "1P"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as ei:
        parse_size(text)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"bad size {text!r}:")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["", "k", "m", "g", "t"]), st.sampled_from(["", "b", "ib"]),
       st.booleans())
def test_parse_size_property(n, unit, suffix, upper):
    if suffix == "ib" and not unit:
        suffix = ""
    text = f"{n}{unit}{suffix}"
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    assert parse_size(text.upper() if upper else text) == n * scale


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.validate() is cfg
    assert (cfg.vcpus, cfg.ram, cfg.backing, cfg.workload) == (4, 256 << 20, "shmem", "random")
    assert cfg.link_model == Link()
    assert cfg.page_size == PAGE_SIZE and cfg.npages == (256 << 20) // PAGE_SIZE


def test_validate_parses_the_link():
    cfg = RunConfig(link="1gbit,2ms").validate()
    assert cfg.link_model == Link(125_000_000, 2_000_000)
    assert "link_model" not in cfg.as_dict()
    assert cfg.as_dict()["link"] == "1gbit,2ms"


def test_hugetlb_page_size():
    cfg = RunConfig(backing="hugetlb", ram=64 << 20).validate()
    assert cfg.page_size == HUGE_PAGE_SIZE and cfg.npages == 32


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vcpus": 0}, "--vcpus 0: must be 1..4096"),
        ({"vcpus": -3}, "--vcpus -3: must be 1..4096"),
        ({"vcpus": 4097}, "--vcpus 4097: must be 1..4096"),
        ({"backing": "tmpfs"}, "--backing 'tmpfs': choose shmem or hugetlb"),
        ({"workload": "nope"}, "--workload 'nope': choose from sequential, random, stride, hotset, shared"),
        ({"transport": "rdma"}, "--transport 'rdma': choose unix or tcp"),
        ({"wake_policy": "some"}, "--wake-policy 'some': choose from waiters, all"),
        ({"zero_share": -0.1}, "--zero-share -0.1: must be between 0 and 1"),
        ({"zero_share": 1.5}, "--zero-share 1.5: must be between 0 and 1"),
        ({"zero_share": math.nan}, "--zero-share nan: must be between 0 and 1"),
        ({"write_ratio": -0.01}, "--write-ratio -0.01: must be between 0 and 1"),
        ({"write_ratio": 2.0}, "--write-ratio 2.0: must be between 0 and 1"),
        ({"write_ratio": math.nan}, "--write-ratio nan: must be between 0 and 1"),
        ({"timeout": 0}, "--timeout must be positive"),
        ({"timeout": -5.0}, "--timeout must be positive"),
        ({"timeout": math.nan}, "--timeout must be positive"),
        ({"seed": -1}, "--seed -1: must be 0 .. 2^63-1"),
        ({"seed": 1 << 63}, f"--seed {1 << 63}: must be 0 .. 2^63-1"),
        ({"link": "fast"}, "--link 'fast': bad bandwidth 'fast'"),
        ({"link": "1gbit,2ms,3"}, "--link '1gbit,2ms,3': expected BANDWIDTH[,LATENCY]"),
        ({"ram": 0}, f"--ram 0: must be a positive multiple of the page size {PAGE_SIZE}"),
        ({"ram": -PAGE_SIZE}, f"--ram {-PAGE_SIZE}: must be a positive multiple"),
        ({"ram": PAGE_SIZE + 1}, f"--ram {PAGE_SIZE + 1}: must be a positive multiple"),
        ({"ram": 3 * PAGE_SIZE, "backing": "hugetlb"},
         f"--ram {3 * PAGE_SIZE}: must be a positive multiple of the page size {HUGE_PAGE_SIZE}"),
        ({"ram": 2 * PAGE_SIZE, "vcpus": 3}, "--ram gives 2 pages, fewer than --vcpus 3"),
        ({"ram": 2 * PAGE_SIZE, "vcpus": 3, "workload": "stride"}, "--ram gives 2 pages, fewer than --vcpus 3"),
        ({"ram": PAGE_SIZE << 32}, f"--ram {PAGE_SIZE << 32}: more than 2^32 pages"),
        ({"image": "/nonexistent/ram.img"}, "cannot read image '/nonexistent/ram.img'"),
    ],
)
def test_validate_rejects(fields, message):
    with pytest.raises(ConfigError) as ei:
        RunConfig(**fields).validate()
    assert type(ei.value) is ConfigError
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(message), msg


@pytest.mark.parametrize("workload", ["hotset", "shared"])
def test_fewer_pages_than_vcpus_is_fine_when_vcpus_share_pages(workload):
    RunConfig(ram=2 * PAGE_SIZE, vcpus=3, workload=workload).validate()


@pytest.mark.parametrize(
    "fields",
    [{"vcpus": 1}, {"vcpus": 4096, "ram": 4096 * PAGE_SIZE}, {"zero_share": 0.0}, {"zero_share": 1.0},
     {"write_ratio": 1.0}, {"seed": 0}, {"seed": (1 << 63) - 1}, {"transport": "tcp"}, {"wake_policy": "all"},
     {"link": "unlimited,5ms"}, {"ram": PAGE_SIZE, "vcpus": 1}, {"background": False}],
)
def test_validate_accepts_edges(fields):
    cfg = RunConfig(**fields)
    assert cfg.validate() is cfg


def test_image_file_validates(tmp_path):
    img = tmp_path / "ram.img"
    img.write_bytes(bytes(4 * PAGE_SIZE))
    RunConfig(ram=4 * PAGE_SIZE, image=str(img)).validate()
    bad = tmp_path / "odd.img"
    bad.write_bytes(b"x" * (PAGE_SIZE + 1))
    with pytest.raises(ConfigError, match="not a non-zero multiple of the page size"):
        RunConfig(ram=4 * PAGE_SIZE, image=str(bad)).validate()


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -1.0, "never", True])
def test_stall_timeout_is_finite_or_off(value):
    with pytest.raises(ConfigError, match=r"--stall-timeout .*: give a finite number of seconds > 0, or off"):
        RunConfig(stall_timeout=value).validate()


def test_stall_timeout_off_turns_the_watchdog_off_by_name():
    from harness.stall import effective_timeout

    cfg = RunConfig(stall_timeout="off").validate()
    assert cfg.as_dict()["stall_timeout"] == "off"  # the report says off, not Infinity (invalid JSON)
    assert effective_timeout(cfg.stall_timeout, 0.1) == float("inf")
    assert effective_timeout(2.5, 0.1) == 2.5


def test_sizes_are_echoed_as_typed():
    from harness.config import parse_size, typed

    with pytest.raises(ConfigError, match=r"^--ram 100T: more than 2\^32 pages$"):
        RunConfig(ram=parse_size("100T")).validate()
    size = parse_size("8M")
    assert typed(size) == "8M" and str(size) == "8388608" and size == 8 << 20  # elsewhere a plain number
    assert typed(4097) == "4097" and typed(16 << 20, "16M") == "16M"  # a number from the API
