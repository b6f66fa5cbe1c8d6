"""Output files: never written through a symbolic link, 0600 where they hold guest data, refused up front.

The opener (``postcopy_core.outfile``) on real files, links and FIFOs, then the commands: a ``--json``
or ``--trace`` that cannot be written fails in one line before any migration starts.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from harness.cli import main
from postcopy_core.blocktime.synth import synthetic_run
from postcopy_core.blocktime.trace import TraceWriter
from postcopy_core.outfile import open_output, output_problem
from tests.test_cli_errors import console_script


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_open_output_refuses_a_symlink_and_leaves_its_target(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(OSError):
        open_output(str(link))
    assert target.read_text() == "keep me"
    assert "symbolic link" in output_problem(str(link))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nothing-yet")
    with pytest.raises(OSError):  # would have created the link's target
        open_output(str(dangling))
    assert not (tmp_path / "nothing-yet").exists()


def test_open_output_refuses_hard_links_and_fifos(tmp_path):
    a = tmp_path / "a"
    a.write_text("other name")
    os.link(a, tmp_path / "b")
    with pytest.raises(OSError, match="hard links"):
        open_output(str(tmp_path / "b"))
    assert a.read_text() == "other name"  # not truncated
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert "FIFO" in output_problem(str(fifo))
    with pytest.raises(OSError):
        open_output(str(fifo))
    assert time.monotonic() - t0 < 1  # never waits for a reader


def test_private_outputs_are_0600_even_when_they_existed(tmp_path):
    new = tmp_path / "new"
    with open_output(str(new), private=True) as f:
        f.write("x")
    assert mode(new) == 0o600
    old = tmp_path / "old"
    old.write_text("old content")
    os.chmod(old, 0o644)
    with open_output(str(old), private=True) as f:
        f.write("new")
    assert mode(old) == 0o600 and old.read_text() == "new"
    public = tmp_path / "public"
    with open_output(str(public)) as f:
        f.write("numbers")
    assert mode(public) == 0o644 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("name", ["t.trace", "t.trace.gz"])
def test_traces_are_private(tmp_path, name):
    meta, cols = synthetic_run(2, 5, seed=1)
    path = tmp_path / name
    with TraceWriter(str(path), meta) as w:
        w.write_many(cols.to_events())
    assert mode(path) == 0o600
    from postcopy_core.blocktime.trace import read_trace_columns

    assert len(read_trace_columns(str(path))[1]) == len(cols)  # and still readable (gzip closed properly)
    link = tmp_path / ("l-" + name)
    link.symlink_to(path)
    with pytest.raises(OSError):
        TraceWriter(str(link), meta)


def test_output_problem_leaves_nothing_behind(tmp_path):
    path = tmp_path / "later.json"
    assert output_problem(str(path)) is None
    assert not path.exists()
    existing = tmp_path / "existing.json"
    existing.write_text("content")
    assert output_problem(str(existing)) is None
    assert existing.read_text() == "content"  # checked without truncating


@pytest.mark.parametrize("flag,path,words", [
    ("--json", "/sys/x.json", "is on sysfs"),
    ("--trace", "/proc/version", "is on proc"),
    ("--json", "/proc/self/status", "is on proc"),
])
def test_kernel_filesystems_are_refused_before_the_run(flag, path, words, capsys):
    t0 = time.monotonic()
    assert main(["run", "--vcpus", "1", "--ram", "1M", flag, path]) == 2
    err = capsys.readouterr()
    assert err.err == (f"postcopy-harness run: {flag} {path}: {words}, a kernel filesystem, "
                       "not a place for output files\n")
    assert err.out == "" and time.monotonic() - t0 < 5  # no migration ran


def test_symlinked_json_is_refused_before_the_run(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    p = subprocess.run([console_script(), "run", "--vcpus", "1", "--ram", "1M", "--json", str(link)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (f"postcopy-harness run: --json {link}: is a symbolic link (refused: output files are "
                        "never written through one)\n")
    assert target.read_text() == "keep"


def test_report_folder_that_is_a_symlink_is_refused(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "rep"
    link.symlink_to(real)
    assert main(["replay", "nothing.trace", "--report", str(link)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert not os.listdir(real)


def test_dev_null_is_a_sink(capsys):
    assert output_problem("/dev/null") is None
    with open_output("/dev/null", private=True) as f:
        f.write("nothing kept")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and mode("/dev/null") == 0o666  # untouched


def test_report_folder_with_a_planted_link_inside_is_refused_up_front(tmp_path, capsys):
    folder = tmp_path / "rep"
    folder.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep")
    (folder / "report.json").symlink_to(target)
    assert main(["run", "--vcpus", "1", "--ram", "1M", "--report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == (f"postcopy-harness run: --report {folder}: report.json is a symbolic link (refused: output "
                   "files are never written through one)\n")
    assert target.read_text() == "keep"


def test_the_api_refuses_unwritable_outputs_before_the_run():
    import postcopy_harness as ph

    t0 = time.monotonic()
    for key, path, words in (("json", "/sys/x.json", "is on sysfs"), ("trace", "/proc/version", "is on proc"),
                             ("report", "/proc/pch-report", "is on proc")):
        with pytest.raises(ph.ConfigError, match=f"^--{key} {path}: {words}, a kernel filesystem"):
            ph.run(vcpus=1, ram="1M", **{key: path})
    assert time.monotonic() - t0 < 5
