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


# (argv, exit code, the one stderr line (exact), whether it is argparse's (then ending in a --help hint))
CASES = {
    "vcpus": (["run", "--vcpus", "0"], 2, "postcopy-harness run: --vcpus 0: must be 1..4096", False),
    "ram": (["run", "--ram", "12Q"], 2,
            "postcopy-harness run: argument --ram: bad size '12Q': "
            "use a number with an optional K/M/G/T suffix, e.g. 256M (see 'postcopy-harness run --help')",
            True),
    "vcpus-abc": (["run", "--vcpus", "abc"], 2,
                  "postcopy-harness run: argument --vcpus: invalid int value: 'abc' "
                  "(see 'postcopy-harness run --help')",
                  True),
    "ram-1P": (["--ram", "1P"], 2,
               "postcopy-harness run: argument --ram: bad size '1P': use a number with an optional K/M/G/T suffix, "
               "e.g. 256M (see 'postcopy-harness run --help')", True),
    # a size is echoed as it was typed, not in bytes
    "ram-100T": (["run", "--ram", "100T"], 2, "postcopy-harness run: --ram 100T: more than 2^32 pages", False),
    "ram-odd": (["run", "--ram", "4097"], 2,
                "postcopy-harness run: --ram 4097: must be a positive multiple of the page size 4096", False),
    "stall-timeout-inf": (["run", "--stall-timeout", "inf"], 2,
                          "postcopy-harness run: --stall-timeout inf: give a finite number of seconds > 0, or off",
                          False),
    "stall-timeout-nan": (["run", "--stall-timeout", "nan"], 2,
                          "postcopy-harness run: --stall-timeout nan: give a finite number of seconds > 0, or off",
                          False),
    "stall-timeout-word": (["run", "--stall-timeout", "never"], 2,
                           "postcopy-harness run: argument --stall-timeout: 'never' is neither a number of seconds "
                           "nor off (see 'postcopy-harness run --help')", True),
    # kernel filesystems take no output files: refused before the migration runs
    "json-sys": (["run", "--json", "/sys/x.json"], 2,
                 "postcopy-harness run: --json /sys/x.json: is on sysfs, a kernel filesystem, not a place for "
                 "output files", False),
    "trace-proc": (["run", "--trace", "/proc/version"], 2,
                   "postcopy-harness run: --trace /proc/version: is on proc, a kernel filesystem, not a place for "
                   "output files", False),
    "report-proc": (["run", "--report", "/proc/pch-report"], 2,
                    "postcopy-harness run: --report /proc/pch-report: is on proc, a kernel filesystem, not a place "
                    "for reports", False),
    "replay-json-proc": (["replay", "--json", "/proc/version", "/nonexistent"], 2,
                         "postcopy-harness replay: --json /proc/version: is on proc, a kernel filesystem, not a "
                         "place for output files", False),
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
                 "postcopy-harness run: argument --workload: invalid choice: 'nope' "
                 "(choose from 'sequential', 'random', 'stride', 'hotset', 'shared') "
                 "(see 'postcopy-harness run --help')", True),
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
    assert len(lines) == 1, lines  # argparse's errors too: no usage block
    if usage:
        assert lines[0].startswith("postcopy-harness") and lines[0].endswith(" --help')"), lines
    if line is not None:
        assert lines[-1] == line
    else:
        assert "invalid choice: 'frobnicate'" in lines[-1] and lines[-1].endswith("(see 'postcopy-harness --help')")
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


@pytest.mark.parametrize("command", ["run", "replay", "loadtest", "compare", "demo", "source", "check", ""])
def test_version_on_every_subcommand(command):
    p = subprocess.run([console_script(), *([command] if command else []), "--version"], capture_output=True,
                       text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("postcopy-harness ") and p.stdout.count("\n") == 1 and p.stderr == ""
