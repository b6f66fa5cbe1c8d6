"""``run --non-vcpu N`` on the real kernel: processes that fault on guest RAM but are not vCPUs (like
a device model doing DMA).  Their faults are served like any other, verified like a vCPU's reads, and
counted as non-vCPU faults (vcpu -1) by the handler and by every engine."""

from __future__ import annotations

import pytest

import postcopy_harness as ph
from harness.cli import main
from tests.conftest import requires_uffd

pytestmark = [pytest.mark.kernel, requires_uffd]


def field(d: dict, name: str):
    """A report field under its snake_case or kebab-case name (the report moves to kebab-case)."""
    return d[name] if name in d else d[name.replace("_", "-")]


def check_complete(rep: dict) -> None:
    assert rep["status"] == "completed", rep["error"]
    v = rep["verification"]
    assert v["mismatches"] == 0 and field(v, "ram_bad_pages") == 0
    assert field(v, "ram_pages_verified") == rep["pages"]["total"]
    assert rep["pages"]["placed"] == rep["pages"]["total"]


def test_one_non_vcpu_process_faults_and_is_measured(tmp_path, clean_machine):
    trace = tmp_path / "run.trace"
    rep = ph.run(vcpus=2, non_vcpu=1, ram="4M", workload="sequential", background=False, trace=trace)
    check_complete(rep)
    npages = rep["pages"]["total"]
    nv = rep["non-vcpu-processes"]
    assert nv["count"] == 1 and nv["faulting-accesses"][0] > 0
    # the device walks vCPU 0's half: every page it read was checked, as were the vCPUs' pages
    assert nv["pages-checked"] == [npages // 2]
    assert field(rep["verification"], "pages_checked") == npages + npages // 2
    faults = rep["faults"]
    assert faults["non-vcpu"] > 0 and faults["vcpu"] > 0
    assert faults["total"] == faults["vcpu"] + faults["non-vcpu"]
    # demand paging: each page is faulted on by the first toucher (vCPU or device) and requested once
    assert rep["pages"]["requested"] == npages
    modern, exact = rep["engines"]["modern"], rep["engines"]["exact"]
    for eng in (modern, exact):
        assert eng["non-vcpu-faults"] > 0 and eng["postcopy-non-vcpu-latency"] > 0
        assert len(eng["vcpu-faults"]) == 2  # the device is no vCPU
        assert eng["non-vcpu-faults"] + sum(eng["vcpu-faults"]) <= faults["total"]
    assert modern["non-vcpu-faults"] == exact["non-vcpu-faults"]
    assert len(rep["engines"]["seed"]["postcopy-vcpu-blocktime"]) == 2
    assert len(rep["workers"]["vcpu-stall-ms"]) == 2
    # the trace keeps them apart too: the device's pid is not in the tid map; the replay agrees
    meta, cols = ph.read_trace(trace)
    assert len(meta.tid_map) == 2
    assert int((cols.vcpu[cols.kind == 0] == -1).sum()) == faults["non-vcpu"]
    assert ph.replay(trace) == rep["engines"]


def test_several_non_vcpu_processes_with_a_shared_workload(clean_machine):
    rep = ph.run(vcpus=2, non_vcpu=3, ram="4M", workload="shared", background=True, write_ratio=0.3)
    check_complete(rep)
    assert rep["non-vcpu-processes"]["count"] == 3
    npages = rep["pages"]["total"]
    # each vCPU walks all pages; the three devices walk halves (owners 0, 0, 1)
    assert field(rep["verification"], "pages_checked") == 2 * npages + 3 * (npages // 2)


def test_without_non_vcpu_processes_there_are_no_non_vcpu_faults(clean_machine):
    rep = ph.run(vcpus=2, ram="2M", workload="random", background=False)
    check_complete(rep)
    assert rep["faults"]["non-vcpu"] == 0 and "non-vcpu-processes" not in rep
    assert rep["engines"]["modern"]["non-vcpu-faults"] == 0


def test_bad_non_vcpu_count_is_one_line(capsys):
    assert main(["run", "--non-vcpu", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "postcopy-harness run: --non-vcpu -1: must be 0..4096"
