"""``run --live``: the dashboard renders, and a real run prints plain lines when not on a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from harness.cli import main
from harness.config import RunConfig
from harness.live import LiveView
from tests.conftest import requires_uffd


def test_dashboard_shows_each_vcpus_state():
    cfg = RunConfig(vcpus=20, ram=1 << 20).validate()
    buf = io.StringIO()
    view = LiveView(cfg, console=Console(file=buf, width=120), terminal=True)
    states = [("stalled", 7, 12.5), ("running", 9, 0.0), ("idle", -1, 0.0), ("stalled", 3, 0.0)] + \
        [("stalled", 1, 1.0)] * 16
    view.console.print(view.render(100, 50, states, 1.0))
    text = buf.getvalue()
    assert "pages received 100/256" in text and "faults 50" in text
    row0 = next(line for line in text.splitlines() if line.strip().startswith("0 "))
    assert "stalled" in row0 and "7" in row0 and "12.5 ms" in row0
    assert "new" in next(line for line in text.splitlines() if line.strip().startswith("3 "))
    assert "4 more vCPUs: 4 stalled" in text
    assert "with --live-engines" in text


@pytest.mark.kernel
@requires_uffd
def test_live_run_on_a_non_terminal_prints_plain_lines(clean_machine):
    from postcopy_harness import run_config

    cfg = RunConfig(vcpus=2, ram=1 << 20, workload="random", link="20mbit,5ms", background=False,
                    live_engines=True).validate()
    buf = io.StringIO()
    view = LiveView(cfg, console=Console(file=buf, width=200))
    assert not view.terminal
    rep = run_config(cfg, progress=view)
    assert rep["status"] == "completed"
    lines = buf.getvalue().splitlines()
    assert view.lines == len(lines) >= 1 and "\x1b[" not in buf.getvalue()
    assert all(line.startswith("live ") and "pages" in line and "vCPUs stalled" in line for line in lines)
    assert any("blocktime so far: seed" in line for line in lines)


@pytest.mark.kernel
@requires_uffd
def test_run_live_flag(clean_machine, capsys):
    assert main(["run", "--vcpus", "1", "--ram", "1M", "--link", "20mbit,5ms", "--no-background", "--live"]) == 0
    cap = capsys.readouterr()
    assert "live " in cap.err and "vCPUs stalled" in cap.err
    assert "postcopy run" in cap.out  # the summary table still follows
