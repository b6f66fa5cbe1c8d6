"""run --link-mode netns: the source in its own network namespace behind a tc-shaped veth pair.

Real namespaces, veth pairs and qdiscs (root and iproute2 needed, else skipped with the reason);
every test checks afterwards, with ``ip netns list`` and ``ip link``, that the run removed both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import postcopy_harness
from harness.netns import NetnsLink, probe_support, sweep_stale_netns
from postcopy_core.link import Link, parse_link
from tests.conftest import requires_uffd

pytestmark = [pytest.mark.kernel, requires_uffd]

SUPPORT = probe_support() if os.geteuid() == 0 else {"netns": False, "detail": {"netns": "needs root"}}
requires_netns = pytest.mark.skipif(
    not (SUPPORT.get("netns") and SUPPORT.get("tbf")),
    reason=f"network namespaces + tc tbf unavailable: {SUPPORT['detail']}")


def _ours(pid: int) -> tuple[list[str], list[str]]:
    """The namespaces of orchestrator ``pid`` (``ip netns list``) and every pch veth (``ip link``)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    devs = [w.split("@")[0] for w in links.split() if w.startswith("pch") and w.rstrip(":").split("@")[0][-1] in "hs"]
    return [n for n in names if n.startswith(f"pch-{pid}-")], devs


def _nothing_left(pid: int, devs_before: list[str]) -> None:
    netns, devs = _ours(pid)
    assert netns == [], f"left behind: {netns}"
    assert [d for d in devs if d not in devs_before] == [], f"veth left behind: {devs}"


@requires_netns
def test_netns_bandwidth_is_shaped_and_every_page_verified(clean_machine):
    """tbf (or netem rate) really limits the stream: the migration takes at least bytes / rate."""
    before = _ours(os.getpid())[1]
    rep = postcopy_harness.run(vcpus=2, ram="4M", link="20mbit", link_mode="netns")
    v = rep["verification"]
    assert rep["status"] == "completed" and v["mismatches"] == 0 and v["ram-pages-verified"] == rep["pages"]["total"]
    assert rep["config"]["transport"] == "tcp"  # netns implies TCP
    assert rep["netns"]["qdisc"] == "tbf" and rep["netns"]["name"].startswith(f"pch-{os.getpid()}-")
    wire_s = rep["source"]["bytes-sent"] * 8 / 20e6
    assert rep["duration-s"]["postcopy"] >= 0.8 * wire_s, (rep["duration-s"], wire_s)
    # unshaped, the same migration takes a fraction of that (it is the shaping, not the machine)
    fast = postcopy_harness.run(vcpus=2, ram="4M", link_mode="netns")
    assert fast["duration-s"]["postcopy"] < 0.5 * rep["duration-s"]["postcopy"]
    _nothing_left(os.getpid(), before)


@requires_netns
def test_netns_latency_needs_netem(clean_machine, tmp_path):
    """``--link 100mbit,5ms``: with sch_netem every fault costs >= one 10 ms round trip; a kernel
    without it refuses in one line, non-zero, and leaves nothing (found after the namespace was made)."""
    before = _ours(os.getpid())[1]
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--vcpus", "2", "--ram", "2M",
                          "--no-background", "--link", "100mbit,5ms", "--link-mode", "netns", "--quiet",
                          "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stderr_text = p.communicate(timeout=120)[1]
    if SUPPORT["netem"]:
        assert p.returncode == 0, p.stderr_text
        import json

        rep = json.loads(out.read_text())
        assert rep["latency-us"]["p50"] >= 10_000 * 0.95
    else:
        assert p.returncode != 0
        lines = p.stderr_text.strip().splitlines()
        assert len(lines) == 1 and "sch_netem" in lines[0], p.stderr_text
    _nothing_left(p.pid, before)


@requires_netns
def test_netns_removed_when_the_run_fails(clean_machine):
    """--inject handler-crash fails the run mid-migration; the namespace and veth still go."""
    before = _ours(os.getpid())[1]
    rep = postcopy_harness.run(check=False, vcpus=2, ram="8M", link="10mbit", link_mode="netns",
                               inject=["handler-crash@0.3"])
    # the cause (the SIGKILLed handler), not the source's connection reset that followed it
    assert rep["status"] == "failed" and rep["error"].startswith("the fault handler"), rep["error"]
    _nothing_left(os.getpid(), before)


@requires_netns
def test_netns_removed_after_sigint(clean_machine):
    before = _ours(os.getpid())[1]
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--vcpus", "2", "--ram", "8M",
                          "--link", "5mbit", "--link-mode", "netns", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _ours(p.pid)[0]:  # the run's namespace exists: the migration is under way
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "postcopy-harness run: failed: interrupted"
    _nothing_left(p.pid, before)


@requires_netns
def test_namespace_of_a_sigkilled_orchestrator_is_swept_by_the_next_run(clean_machine):
    """SIGKILL leaves no teardown: the namespace stays until a later run sweeps what dead pids left."""
    before = _ours(os.getpid())[1]
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--vcpus", "1", "--ram", "8M",
                          "--link", "5mbit", "--link-mode", "netns", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _ours(p.pid)[0]:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        p.kill()
        p.wait()
    [left] = _ours(p.pid)[0]
    rep = postcopy_harness.run(vcpus=1, ram="1M", link_mode="netns")  # the next run sweeps it
    assert rep["status"] == "completed"
    _nothing_left(p.pid, before)
    assert left not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@requires_netns
def test_stale_namespace_of_a_dead_run_is_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = NetnsLink(parse_link("10mbit"), pid=dead.pid).create()
    try:
        assert _ours(dead.pid)[0] == [stale.name]
        assert stale.name in sweep_stale_netns()
        netns, devs = _ours(dead.pid)
        assert netns == [] and stale.host_dev not in devs
    finally:
        stale.remove()


def test_netem_and_tbf_arguments_follow_the_link():
    from harness.netns import netem_args, tbf_args

    args = netem_args(parse_link("100mbit,5ms,jitter=1ms,loss=0.5%"))
    assert args[args.index("delay") + 1 : args.index("delay") + 3] == ["5000us", "1000us"]
    assert args[args.index("loss") + 2] == "0.5%"
    assert args[args.index("rate") + 1] == "100000000bit"
    assert "delay" not in netem_args(Link(bytes_per_s=1e6, loss=0.01))
    assert tbf_args(parse_link("20mbit"))[:3] == ["tbf", "rate", "20000000bit"]


def test_check_reports_netns_support():
    import json

    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "check", "--netns", "--json"],
                         stdout=subprocess.PIPE, text=True)
    doc = json.loads(p.communicate(timeout=120)[0])
    assert p.returncode == (0 if doc["can-run"] else 1)
    rows = {c["name"]: c for c in doc["checks"] if c["name"].startswith("netns:")}
    row = rows["netns: namespace + veth (--link-mode netns)"]
    assert row["required"] and row["ok"] == bool(SUPPORT.get("netns"))
    if SUPPORT.get("netns"):
        netem = rows["netns: tc netem (latency, jitter, loss)"]
        assert netem["ok"] == SUPPORT["netem"] and not netem["required"]
    if SUPPORT.get("tools"):
        assert _ours(p.pid)[0] == []  # the probe's throwaway namespace is gone


@requires_netns
def test_tc_accepts_our_netem_arguments():
    """tc parses netem's arguments itself before the kernel sees them: ours must pass its parser (on a
    kernel without sch_netem the only error left is the kernel's unknown qdisc)."""
    from harness.netns import netem_args

    ns = NetnsLink(Link()).create()
    try:
        for spec in ("100mbit,5ms,jitter=1ms,loss=0.5%", "unlimited,5ms", "1gbit,1ms,loss=2%", "10mbit,0,loss=1%"):
            r = subprocess.run(["tc", "-n", ns.name, "qdisc", "replace", "dev", ns.source_dev, "root",
                                *netem_args(parse_link(spec))], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 or "qdisc kind is unknown" in r.stderr, (spec, r.stderr)
            assert (r.returncode == 0) == SUPPORT["netem"]
    finally:
        ns.remove()
