"""Bad command lines through the real console script: exit 2, one line on stderr, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 60
UNITS = ("tc units: bit, kbit, mbit, gbit, tbit = bits/s; bps, kbps, mbps, gbps, tbps = bytes/s; "
         "kibit, mibit, gibit, tibit, kibps, mibps, gibps, tibps = powers of 1024; a bare number = bit")


def console_script() -> str:
    beside = Path(sys.executable).with_name("postcopy-harness")
    found = str(beside) if beside.exists() else shutil.which("postcopy-harness")
    assert found, "the postcopy-harness console script is not installed (pip install -e .)"
    return found


# (argv, exit code, the one stderr line (exact), whether argparse prints its usage block first)
CASES = {
    "vcpus": (["run", "--vcpus", "0"], 2, "postcopy-harness run: --vcpus 0: must be 1..4096", False),
    "ram": (["run", "--ram", "12Q"], 2,
            "postcopy-harness run: error: argument --ram: bad size '12Q': "
            "use a number with an optional K/M/G/T suffix, e.g. 256M",
            True),
    "link": (["run", "--link", "fast"], 2,
             "postcopy-harness run: --link 'fast': bad bandwidth 'fast' (" + UNITS + ")", False),
    # rich markup in a user-supplied value must be printed as is, not interpreted (or crash)
    "link-markup-close": (["run", "--link", "[/x]"], 2,
                          "postcopy-harness run: --link '[/x]': bad bandwidth '[/x]' (" + UNITS + ")",
                          False),
    "link-markup-open": (["run", "--link", "[bold]x"], 2,
                         "postcopy-harness run: --link '[bold]x': bad bandwidth '[bold]x' "
                         "(" + UNITS + ")", False),
    "workload": (["run", "--workload", "nope"], 2,
                 "postcopy-harness run: error: argument --workload: invalid choice: 'nope' "
                 "(choose from 'sequential', 'random', 'stride', 'hotset', 'shared')", True),
    "image": (["run", "--image", "/nonexistent"], 2,
              "postcopy-harness run: cannot read image '/nonexistent': No such file or directory", False),
    "timeout-nan": (["run", "--timeout", "nan"], 2, "postcopy-harness run: --timeout must be positive", False),
    "seed": (["run", "--seed", "-1"], 2, "postcopy-harness run: --seed -1: must be 0 .. 2^63-1", False),
    "replay": (["replay", "/nonexistent"], 2,
               "postcopy-harness replay: /nonexistent: cannot open: No such file or directory", False),
    "command": (["frobnicate"], 2, None, True),
    # the bare command is run
    "bare-options": (["--vcpus", "0"], 2, "postcopy-harness run: --vcpus 0: must be 1..4096", False),
    # output paths are checked before the run, so its results are not lost at the end
    "json-no-folder": (["run", "--json", "/nonexistent/dir/x.json"], 2,
                       "postcopy-harness run: --json /nonexistent/dir/x.json: no folder /nonexistent/dir", False),
    "json-folder": (["run", "--json", "/"], 2, "postcopy-harness run: --json /: is a folder; give a file name", False),
    "trace-folder": (["run", "--trace", "/"], 2, "postcopy-harness run: --trace /: is a folder; give a file name",
                     False),
    "image-folder": (["run", "--image", "/"], 2,
                     "postcopy-harness run: image '/' is a folder: give a raw RAM image file", False),
    "link-tc-units": (["run", "--link", "100Mb"], 2,
                      "postcopy-harness run: --link '100Mb': bad bandwidth '100mb' (" + UNITS + ")", False),
    "check-vcpus": (["check", "--vcpus", "0"], 2, "postcopy-harness check: --vcpus 0: must be 1..4096", False),
    "dirty-rate-alone": (["run", "--dirty-rate", "100"], 2,
                         "postcopy-harness run: --dirty-rate needs --precopy SECONDS "
                         "(the guest dirties RAM during precopy)", False),
    "precopy-negative": (["run", "--precopy", "-1"], 2, "postcopy-harness run: --precopy -1: must be 0..3600 seconds",
                         False),
    "dirty-rate-negative": (["run", "--precopy", "1", "--dirty-rate", "-5"], 2,
                            "postcopy-harness run: --dirty-rate -5: must be a number of pages per second >= 0", False),
}


@pytest.fixture(scope="module")
def results():
    """Start every case at once (each is a fresh interpreter), then collect them."""
    exe = console_script()
    env = dict(os.environ, COLUMNS="60", LINES="20", PYTHONWARNINGS="ignore")  # narrow: wrapping would show
    env.pop("FORCE_COLOR", None)
    procs = {
        name: subprocess.Popen([exe, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        for name, (argv, *_rest) in CASES.items()
    }
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            out[name] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_command_line(results, name):
    argv, code, line, usage = CASES[name]
    rc, stdout, stderr = results[name]
    assert "Traceback" not in stdout + stderr, stderr
    assert rc == code, (rc, stderr)
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    if usage:
        # argparse: its usage block, then exactly one line with the error
        assert lines[0].startswith("usage: postcopy-harness")
        assert sum("error:" in x for x in lines) == 1
        assert lines[-1].startswith("postcopy-harness") and "error:" in lines[-1]
    else:
        assert len(lines) == 1, lines
    if line is not None:
        assert lines[-1] == line
    else:
        assert "invalid choice: 'frobnicate'" in lines[-1]
    assert stdout == ""  # nothing ran, so no report table


def test_direct_main_agrees_with_console_script(capsys):
    # the in-process entry point reports a config error the same way
    from harness.cli import main

    assert main(["run", "--vcpus", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == CASES["vcpus"][2]
    assert captured.out == ""


def test_help_exits_zero():
    p = subprocess.run([console_script(), "run", "--help"], capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0
    assert "--vcpus" in p.stdout and "--link" in p.stdout
    assert "Traceback" not in p.stderr
