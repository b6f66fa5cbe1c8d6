"""Every write survives: stores that carry information, the checks that see a lost one, and the bugs
planted to prove those checks (``run --plant-bug``), on the real kernel path.

The checker is credited only with what it caught: each planted kind must fail its run with the class
it is known by, on each placement where it can act.
"""

from __future__ import annotations

import pytest

from harness.config import ConfigError, RunConfig
from harness.report import build_report
from harness.run import execute
from harness.supervise import RunFailed
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image
from postcopy_core.plant import PLANTED_BUGS
from tests.conftest import requires_uffd
from tests.test_run import run
from vcpu_workers.stores import KINDS, content_struct

PS = 4096


# ---------------------------------------------------------------- the judge, on pages built here

@pytest.fixture
def judge():
    """judge(page, bytes, mode, want=0, lo=0, hi=0) -> class name or None, over generated content."""
    spec = ContentSpec(PS, 64, seed=7, zero_permille=0)
    img = Image(spec)
    c, *_ = content_struct(spec, None, None)

    def call(page: int, data: bytearray, mode: int, want: int = 0, lo: int = 0, hi: int = 0) -> str | None:
        buf = ffi.from_buffer("uint8_t[]", data)
        f = ffi.new("struct pch_finding *", {"page": -1})
        kind = lib.pch_judge_page(c, page, buf, mode, want, lo, hi, f)
        return None if kind < 0 else KINDS[kind]

    call.source = lambda page: bytearray(img.page(page))
    yield call
    img.close()


def _put(data: bytearray, word: int, value: int) -> bytearray:
    data[word * 8:(word + 1) * 8] = value.to_bytes(8, "little")
    return data


def test_judge_classifies_one_writer_pages(judge):
    own, seed = lib.PCH_WRITES_OWN, 7
    k = lib.pch_store_word(PS, 3)
    mine = lib.pch_store_value(seed, 5, 3, 41)
    written = _put(judge.source(5), k, mine)
    assert judge(5, written, own, mine) is None
    assert judge(5, judge.source(5), own, mine) == "reverted"  # the source's bytes are back
    assert judge(5, bytearray(PS), own, mine) == "zeroed"
    assert judge(5, _put(judge.source(5), k, lib.pch_store_value(seed, 5, 3, 40)), own, mine) == "stale"
    assert judge(5, _put(judge.source(5), k, lib.pch_store_value(seed, 6, 3, 41)), own, mine) == "foreign"
    assert judge(5, _put(judge.source(6), k, mine), own, mine) == "foreign"  # another page's bytes
    torn = written[:PS // 2] + bytearray(PS // 2)
    assert judge(5, torn, own, mine) == "torn"
    # no store known (a reader of another vCPU's page): the source's word or a store of its owner
    assert judge(5, written, own) is None and judge(5, judge.source(5), own) is None
    assert judge(5, _put(judge.source(5), 0, mine), own) == "torn"  # word 0 belongs to no store


def test_judge_counts_increments(judge):
    count, w = lib.PCH_WRITES_COUNT, lib.PCH_COUNTER_WORD
    src = int.from_bytes(judge.source(9)[w * 8:(w + 1) * 8], "little")
    assert judge(9, _put(judge.source(9), w, (src + 5) % 2**64), count, lo=5, hi=5) is None
    assert judge(9, judge.source(9), count, lo=5, hi=5) == "reverted"
    assert judge(9, _put(judge.source(9), w, (src + 3) % 2**64), count, lo=5, hi=5) == "stale"  # 2 lost
    assert judge(9, _put(judge.source(9), w, (src + 9) % 2**64), count, lo=5, hi=5) == "foreign"  # never made
    assert judge(9, _put(judge.source(9), w, (src + 4) % 2**64), count, lo=4, hi=5) is None  # one cut short


def test_store_values_are_unique_and_decode():
    seen = {lib.pch_store_value(1, page, vcpu, seq) for page in range(8) for vcpu in range(8) for seq in range(8)}
    assert len(seen) == 8 * 8 * 8
    v, q = ffi.new("uint32_t *"), ffi.new("uint64_t *")
    assert lib.pch_store_decode(1, 3, lib.pch_store_value(1, 3, 4095, 12345), v, q) and (v[0], q[0]) == (4095, 12345)
    assert not lib.pch_store_decode(1, 3, 0x1234, v, q)


# ---------------------------------------------------------------- real runs

@pytest.mark.kernel
@requires_uffd
def test_the_default_run_stores_and_checks_them(clean_machine):
    assert RunConfig().write_ratio > 0
    rep = run(ram=16 << 20)
    v = rep["verification"]
    assert v["writes"] > 0 and v["writes-checked"] >= v["writes"] and v["lost-writes"] == 0


@pytest.mark.kernel
@requires_uffd
@pytest.mark.parametrize("workload", ["shared", "hotset"])
def test_counter_pages_add_up(workload, clean_machine):
    """Several vCPUs increment the same pages; the final count equals the increments made."""
    rep = run(vcpus=4, ram=4 << 20, workload=workload, write_ratio=0.5)
    assert rep["verification"]["writes-checked"] >= rep["verification"]["writes"] > 0


@pytest.mark.kernel
@requires_uffd
def test_write_ratio_zero_is_read_only(clean_machine):
    rep = run(ram=8 << 20, write_ratio=0)
    assert rep["verification"]["writes"] == 0


def _planted(kind: str, **kw) -> dict:
    cfg = RunConfig(ram=16 << 20, vcpus=4, plant_bug=kind, **kw).validate()
    try:
        return build_report(cfg, execute(cfg))
    except RunFailed as e:
        return build_report(cfg, None, str(e))


PLANTS = [("revert-after-write", "copy", {}), ("revert-after-write", "continue", {}),
          ("zero-page", "copy", {}), ("zero-page", "continue", {}),
          ("wrong-page", "copy", {}), ("wrong-page", "continue", {}),
          ("stale-generation", "copy", dict(precopy=0.4, dirty_rate=4000)),
          ("lost-wake", "copy", dict(stall_timeout=1.5)), ("lost-wake", "continue", dict(stall_timeout=1.5)),
          ("resend-overwrite", "copy", dict(inject=["source-crash@0.2"], link="200mbit")),
          ("resend-overwrite", "continue", dict(inject=["source-crash@0.2"], link="200mbit"))]


@pytest.mark.kernel
@requires_uffd
@pytest.mark.parametrize("kind,place,extra", PLANTS, ids=[f"{k}-{p}" for k, p, _ in PLANTS])
def test_every_planted_bug_is_caught_and_named(kind, place, extra, clean_machine):
    rep = _planted(kind, place=place, **extra)
    assert rep["status"] == "failed"
    verdict = rep["plant-bug"]
    assert verdict["caught"], (verdict, rep["error"])
    assert PLANTED_BUGS[kind].caught_as in verdict["classes-seen"]
    if PLANTED_BUGS[kind].caught_as != "hung":
        assert verdict["acted"] > 0 and rep["verification"]["by-kind"][PLANTED_BUGS[kind].caught_as] > 0
        assert f"({PLANTED_BUGS[kind].caught_as})" in rep["error"] or "lost writes" in rep["error"]


def test_all_planted_kinds_are_tested():
    assert {k for k, _, _ in PLANTS} == set(PLANTED_BUGS)


def test_a_plant_that_cannot_act_is_refused():
    with pytest.raises(ConfigError, match="stale-generation needs --precopy"):
        RunConfig(plant_bug="stale-generation").validate()
    with pytest.raises(ConfigError, match="resend-overwrite needs a recovery"):
        RunConfig(plant_bug="resend-overwrite").validate()
    with pytest.raises(ConfigError, match="choose from"):
        RunConfig(plant_bug="nope").validate()


@pytest.mark.kernel
@requires_uffd
def test_no_deadlock_with_tiny_socket_buffers_and_a_stopped_source(clean_machine, monkeypatch):
    """The smallest socket buffers the kernel allows and a source stopped for a second: the return
    path fills (hundreds of vCPUs each ask for a page) and the destination queues its requests,
    serving faults meanwhile; the run completes with every page and every store verified."""
    monkeypatch.setenv("PCH_SOCKET_BUFFER", "1")
    rep = run(vcpus=600, ram=32 << 20, write_ratio=0.5, inject=["source-stall@0.3:1"])
    assert rep["handler"]["return-path-full"] > 0
    assert rep["recovery"]["injected"][0]["outcome"].startswith("stopped")


@pytest.mark.kernel
@requires_uffd
def test_direct_receive_never_overwrites_a_page_placed_meanwhile(clean_machine, monkeypatch):
    """--place continue receives big frames straight into the page cache over several turns; a page of
    such a frame answered urgently meanwhile, CONTINUEd and written, must keep its store.  Tiny
    buffers spread each frame over many turns and a sequential vCPU faults right at the stream's
    front, where the overlap happens (handler.direct-skipped counts it).  run() asserts that no store
    was lost; the overlap itself is a matter of timing, so a few runs are made until one saw it."""
    monkeypatch.setenv("PCH_SOCKET_BUFFER", "1")
    for _ in range(4):
        rep = run(vcpus=1, ram=32 << 20, workload="sequential", place="continue", write_ratio=1.0)
        if rep["handler"]["direct-skipped"]:
            break
