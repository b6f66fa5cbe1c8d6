"""Source strategies end to end (real uffd, processes, sockets): every strategy completes with every
page verified, and each one does what it says: vanilla queues behind the stream, prepage pushes
neighbours, prefetch sends the working set first; `compare` and bad input through the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from harness.config import ConfigError, RunConfig
from harness.report import build_report
from harness.run import execute
from postcopy_core.link import parse_link
from postcopy_core.source import BACKGROUND_AHEAD
from postcopy_core.strategies import STRATEGIES, Prepage, read_working_set
from tests.conftest import requires_uffd
from tests.test_cli_errors import console_script

SMALL = dict(vcpus=2, ram=16 << 20)


def run(**kw) -> dict:
    cfg = RunConfig(**{**SMALL, **kw}).validate()
    rep = build_report(cfg, execute(cfg))
    assert rep["status"] == "completed", rep.get("error")
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0
    assert v["ram-pages-verified"] == cfg.npages == rep["pages"]["placed"]
    assert rep["strategy"] == cfg.strategy
    return rep


@pytest.fixture(scope="module")
def working_set(tmp_path_factory) -> str:
    """A trace of an earlier run (hotset workload, demand paging: every page it touched faulted)."""
    path = str(tmp_path_factory.mktemp("ws") / "ws.trace")
    run(workload="hotset", strategy="demand", trace=path)
    return path


@pytest.mark.kernel
@requires_uffd
@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("link", ["unlimited", "1gbit,1ms"])
def test_every_strategy_completes_verified(name, link, working_set, clean_machine):
    rep = run(strategy=name, link=link, working_set=working_set if name == "prefetch" else None)
    p = rep["pages"]
    assert p["urgent"] + p["background"] == p["total"]
    if name == "demand":
        assert p["background"] == 0  # the stream only starts once the workload is over
    if name != "prepage":
        assert p["prepaged"] == 0


def _p50s(link: str, **kw) -> tuple[float, float]:
    """Fault p50 of vanilla and preempt, alternated, medians of 3 (the machine is shared)."""
    got: dict[str, list[float]] = {"vanilla": [], "preempt": []}
    for _ in range(3):
        for name in got:
            got[name].append(run(strategy=name, link=link, workload="random", **kw)["latency-us"]["p50"])
    return float(np.median(got["vanilla"])), float(np.median(got["preempt"]))


@pytest.mark.kernel
@requires_uffd
def test_vanilla_queues_behind_the_stream_on_a_modelled_link(clean_machine):
    """One channel: an answer waits for the stream already on the wire (BACKGROUND_AHEAD of it);
    preempt's answer waits for one message at most.  The difference must be most of that queue."""
    link = "1gbit,1ms"
    vanilla, preempt = _p50s(link)
    queue_us = parse_link(link).wire_ns(BACKGROUND_AHEAD) / 1e3
    assert vanilla - preempt > 0.4 * queue_us, (vanilla, preempt, queue_us)
    assert vanilla > 2 * preempt


@pytest.mark.kernel
@requires_uffd
def test_vanilla_answers_go_into_the_stream_socket(clean_machine):
    """Unlimited link: vanilla's answers queue in the stream socket behind the queued stream
    frames; preempt's take the urgent channel (p50 far below)."""
    vanilla, preempt = _p50s("unlimited", vcpus=1)
    assert vanilla > 2 * preempt, (vanilla, preempt)


@pytest.mark.kernel
@requires_uffd
# On a modelled link the stream is slower than a walk, so preempt has to ask for ~27 pages at 16 MiB
# and prepage for 1 or 2.  On an unlimited link the stream races the walk and at 16 MiB both ask for
# between 7 and 150 pages, run to run (a CI run gave medians 38 vs 20); at 128 MiB the medians of 7
# stay apart (preempt 260-606, prepage 109-148, also with a CPU hog on one of the two cores).
@pytest.mark.parametrize(("link", "ram", "repeat"), [("unlimited", 128 << 20, 7), ("1gbit,1ms", 16 << 20, 5)])
def test_prepage_pushes_neighbours(link, ram, repeat, clean_machine):
    """Sequential walks: the neighbours pushed after a fault are the pages touched next, so fewer
    pages arrive as urgent answers (``pages.urgent``) than under preempt.  Neither the fault count
    nor the pages asked for (``pages.requested``) is asserted: a vCPU often walks faster than the
    pushes arrive and still faults on them, briefly, and asks for them (the source does not answer
    a page it pushed already).  Medians, alternated: the machine is shared, and how far the stream runs ahead
    of the vCPUs (so how many pages preempt must ask for) varies from run to run."""
    got: dict[str, list[dict]] = {"preempt": [], "prepage": []}
    for _ in range(repeat):
        for name in got:
            got[name].append(
                run(strategy=name, link=link, ram=ram, workload="sequential", prepage_window=32)
            )
    assert all(r["pages"]["prepaged"] > 0 for r in got["prepage"])

    def median(name: str, *keys: str) -> float:
        return float(np.median([r[keys[0]][keys[1]] for r in got[name]]))

    assert median("prepage", "pages", "urgent") < median("preempt", "pages", "urgent")


def test_prepage_neighbours_order_and_bounds():
    s = Prepage(2)
    assert s.on_request(np.array([10], dtype=np.uint32), 100).tolist() == [11, 12, 8, 9]
    assert s.on_request(np.array([0, 99], dtype=np.uint32), 100).tolist() == [1, 2, 97, 98]


@pytest.mark.kernel
@requires_uffd
def test_prefetch_streams_the_working_set_first(working_set, tmp_path, clean_machine):
    """On a slow link, the first pages placed by the stream are the working set's, in its order."""
    ps = 4096
    pages = read_working_set(working_set, ps, (16 << 20) // ps)
    trace = str(tmp_path / "prefetch.trace")
    run(strategy="prefetch", working_set=working_set, link="200mbit,1ms", workload="hotset", trace=trace)
    from postcopy_core.blocktime.events import KIND_PLACED
    from postcopy_core.blocktime.trace import read_trace_columns

    _, cols = read_trace_columns(trace)
    placed = cols.addr[cols.kind == KIND_PLACED] // ps
    head = placed[: len(pages) // 2]
    # the same workload again: its faults are working-set pages too, so the head is all of them
    assert np.isin(head, pages).mean() > 0.9
    seq = run(strategy="preempt", link="200mbit,1ms", workload="hotset", trace=trace)
    assert seq["strategy"] == "preempt"
    _, cols = read_trace_columns(trace)
    placed = cols.addr[cols.kind == KIND_PLACED] // ps
    assert np.isin(placed[: len(pages) // 2], pages).mean() < 0.9  # the check above can fail


def test_bad_strategy_config():
    with pytest.raises(ConfigError, match="--strategy 'fast': choose from demand, vanilla, preempt"):
        RunConfig(strategy="fast").validate()
    with pytest.raises(ConfigError, match="--no-background is --strategy demand"):
        RunConfig(strategy="prepage", background=False).validate()
    assert RunConfig(background=False).validate().strategy == "demand"
    assert RunConfig().validate().strategy == "preempt"
    assert RunConfig(strategy="demand").validate().background is False


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, line", [
    (["run", "--strategy", "fast"], "postcopy-harness run: --strategy 'fast': choose from "),
    (["run", "--strategy", "prefetch"], "postcopy-harness run: --strategy prefetch needs --working-set FILE"),
    (["run", "--strategy", "prefetch", "--working-set", "/nonexistent/x"],
     "postcopy-harness run: --working-set /nonexistent/x: No such file or directory"),
    (["run", "--strategy", "prefetch", "--working-set", "/etc/passwd"],
     "postcopy-harness run: --working-set /etc/passwd: not a trace: "),
    (["run", "--working-set", "/etc/passwd"], "postcopy-harness run: --working-set is for --strategy prefetch"),
    (["run", "--strategy", "prepage", "--prepage-window", "0"], "postcopy-harness run: --prepage-window 0: must"),
    (["compare", "--strategy", "vanilla,nope"], "postcopy-harness compare: --strategy 'nope': choose from "),
    (["compare", "--strategy", "vanilla,vanilla"], "postcopy-harness compare: --strategy 'vanilla,vanilla': "),
])
def test_bad_strategy_flags_one_line_exit_2(argv, line):
    r = _cli(*argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.stderr


def test_working_set_outside_ram_is_refused(working_set):
    with pytest.raises(ConfigError, match="faults outside --ram"):
        RunConfig(ram=1 << 20, strategy="prefetch", working_set=working_set).validate()


@pytest.mark.kernel
@requires_uffd
def test_compare_tiny_with_json(tmp_path, clean_machine):
    out = tmp_path / "cmp.json"
    r = _cli("compare", "--strategy", "vanilla,preempt,prepage", "--vcpus", "2", "--ram", "4M",
             "--link", "1gbit,1ms", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("vanilla", "preempt", "prepage", "p50 µs", "blocktime truth ms", "requested / streamed / prepaged"):
        assert name in r.stdout
    doc = json.loads(out.read_text())
    reps = doc["strategies"]
    assert [rep["strategy"] for rep in reps] == ["vanilla", "preempt", "prepage"]
    for rep in reps:
        assert rep["status"] == "completed" and rep["verification"]["mismatches"] == 0
        assert rep["pages"]["placed"] == rep["pages"]["total"] == 1024
        assert {"seed", "modern", "exact", "truth"} <= set(rep["engines"])
    assert reps[2]["pages"]["prepaged"] > 0


@pytest.mark.kernel
@requires_uffd
@pytest.mark.parametrize("link", ["unlimited", "1gbit,1ms"])
def test_one_channel_and_pushes_with_huge_pages(link, hugepages, clean_machine):
    """2 MiB frames: vanilla's answers wait for the whole frame in flight on the stream socket
    (never inside it), and prepage's pushes are whole huge pages; every page verified."""
    hugepages(4 + max(0, int(open("/proc/sys/vm/nr_hugepages").read())))
    for name in ("vanilla", "prepage"):
        rep = run(strategy=name, backing="hugetlb", ram=8 << 20, link=link, workload="random", prepage_window=1)
        assert rep["page-size"] == 2 << 20
