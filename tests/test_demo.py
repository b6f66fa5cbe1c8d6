"""``postcopy-harness demo``: the list, and every demo in ``--fast`` mode with its pictures."""

from __future__ import annotations

import json
import os

import pytest

from harness.cli import main
from harness.demo import DEMOS
from postcopy_core.probe import free_huge_pages
from tests.conftest import HUGEPAGES, requires_uffd
from tests.test_report_dir import assert_png, check_trace


def test_list_prints_one_demo_a_line_name_first(capsys):
    assert main(["demo", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(DEMOS)
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # and what it shows


@pytest.mark.parametrize("argv, says", [
    (["demo", "nosuch"], "no demo 'nosuch'"),
    (["demo"], "give a demo NAME"),
    (["demo", "overcount", "--fast", "--capture", "/nonexistent"], "no QEMU capture at /nonexistent"),
])
def test_demos_that_cannot_run_say_why_in_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_reentrant(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "reentrant", "--fast", "--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "seed charges vCPU 1 20 ms" in text and "exact and truth charge 25 ms" in text
    for name in ("timeline.png", "latency.png", "placements.png"):
        assert_png(str(out / name))
    check_trace(str(out / "trace.json"), 2, [0, 1], "truth")
    rep = json.loads((out / "report.json").read_text())
    assert rep["engines"]["seed"]["postcopy-blocktime"] < rep["engines"]["truth"]["postcopy-blocktime"]
    # the trace it leaves replays to the same numbers
    assert main(["replay", str(out / "reentrant.trace"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["engines"] == rep["engines"]


def test_overcount_on_the_project_capture(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "overcount", "--fast", "--report", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    seed, exact = rep["engines"]["seed"]["postcopy-blocktime"], rep["engines"]["exact"]["postcopy-blocktime"]
    assert seed > exact and f"over by {seed - exact} ms" in text
    assert "seed total 17 ms > seed's own vCPU 0 blocktime 8 ms" in text
    assert_png(str(out / "overcount.png"))
    check_trace(str(out / "trace.json"), 4, [0, 1, 2, 3], "exact")


@pytest.mark.kernel
@requires_uffd
def test_overlap(tmp_path, clean_machine, capsys):
    out = tmp_path / "d"
    assert main(["demo", "overlap", "--fast", "--report", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["vcpus"] == 3 and rep["status"] == "completed"
    truth = rep["engines"]["truth"]
    assert 0 < truth["postcopy-blocktime"] <= min(truth["postcopy-vcpu-blocktime"])
    assert_png(str(out / "timeline.png"))
    check_trace(str(out / "trace.json"), 3, [0, 1, 2], "truth")
    assert "what each engine counted" in capsys.readouterr().out


@pytest.mark.kernel
@requires_uffd
def test_hugepages_without_free_huge_pages_says_so(tmp_path, capsys, monkeypatch):
    if free_huge_pages() >= 2:
        pytest.skip("huge pages are free here: the refusal cannot be shown")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: it may not reserve them itself
    assert main(["demo", "hugepages", "--fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs 2 free 2 MiB huge pages" in err[0] and "as root" in err[0]


@pytest.mark.kernel
@requires_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="reserving huge pages needs root")
def test_hugepages_as_root_reserves_and_restores_them_itself(tmp_path, clean_machine, capsys):
    if free_huge_pages() >= 2:
        pytest.skip("huge pages are free here: the demo has nothing to reserve")
    with open(HUGEPAGES) as f:
        before = f.read()
    # too few free: the demo raises the pool itself (no --reserve-hugepages) and puts it back
    assert main(["demo", "hugepages", "--fast", "--report", str(tmp_path / "d")]) == 0
    with open(HUGEPAGES) as f:
        assert f.read() == before
    huge = json.loads((tmp_path / "d" / "hugetlb" / "report.json").read_text())
    assert huge["status"] == "completed" and huge["page-size"] == 2 << 20


@pytest.mark.kernel
@requires_uffd
def test_hugepages(tmp_path, hugepages, clean_machine, capsys):
    hugepages(2 + max(0, int(open("/proc/sys/vm/nr_hugepages").read())))
    out = tmp_path / "d"
    assert main(["demo", "hugepages", "--fast", "--report", str(out)]) == 0
    small = json.loads((out / "shmem" / "report.json").read_text())
    huge = json.loads((out / "hugetlb" / "report.json").read_text())
    assert huge["faults"]["total"] < small["faults"]["total"]  # 512 small pages per huge one
    assert huge["latency-us"]["p50"] > small["latency-us"]["p50"]  # each fault waits for 2 MiB
    assert_png(str(out / "hugepages.png"))
    assert os.path.exists(out / "hugetlb" / "trace.json")


@pytest.mark.kernel
@requires_uffd
def test_preempt(tmp_path, clean_machine, capsys):
    out = tmp_path / "d"
    assert main(["demo", "preempt", "--fast", "--report", str(out)]) == 0
    vanilla = json.loads((out / "vanilla" / "report.json").read_text())
    pre = json.loads((out / "preempt" / "report.json").read_text())
    assert (vanilla["strategy"], pre["strategy"]) == ("vanilla", "preempt")
    assert pre["latency-us"]["p50"] < vanilla["latency-us"]["p50"]  # not queued behind the stream
    assert_png(str(out / "preempt.png"))
    assert "preempt's fault p50 is" in capsys.readouterr().out
