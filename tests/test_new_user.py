"""What a new user runs into (issue 8): bad input in one line, the CLI's conventions, report keys.

The runs here are real (real uffd, processes, shared memory); the command lines go through the
installed console script where what matters is what a user sees (exit code, stderr, stdout).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from harness import cli
from harness import replay as replay_cmd
from harness import run as run_module
from harness.config import RunConfig
from harness.progress import RunProgress
from harness.supervise import RunFailed
from postcopy_core.blocktime import Fault, Placed, TraceMeta
from postcopy_core.blocktime.trace import TraceWriter
from tests.conftest import requires_uffd
from tests.test_cli_errors import console_script

TIMEOUT = 120
KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # kebab-case (QEMU's query-migrate names are too)


def cli_run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, COLUMNS="60", PYTHONWARNINGS="ignore")
    return subprocess.run([console_script(), *argv], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, env=env)


def bad_keys(obj: object, where: str = "") -> list[str]:
    """Every dict key below ``obj`` that is not kebab-case (lists of dicts included)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if where.endswith(".units"):  # the units map is keyed by dotted report paths
                continue
            if not KEY.match(str(k)):
                out.append(f"{where}.{k}")
            out += bad_keys(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for v in obj:
            out += bad_keys(v, where + "[]")
    return out


def assert_provenance(doc: dict, argv_has: str) -> None:
    assert doc["tool-version"] and doc["tool-version"] != "unknown"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["started-at"])
    assert doc["host"]["name"] and doc["host"]["cpus"] >= 1 and doc["host"]["kernel"]
    assert any(argv_has in a for a in doc["argv"])
    assert doc["units"]["postcopy-blocktime"] == "ms" and doc["units"]["postcopy-latency"] == "ns"


# ------------------------------------------------------------------ command-line conventions


def test_version():
    p = cli_run("--version")
    assert p.returncode == 0
    assert re.fullmatch(r"postcopy-harness \d+\.\d+\.\d+\S*\n", p.stdout), p.stdout


@pytest.mark.parametrize("command", ["run", "check", "replay", "loadtest", "qemu"])
def test_help_shows_defaults_and_units_and_no_outside_paths(command):
    p = cli_run(command, "--help")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    text = " ".join(p.stdout.split())
    assert "../" not in text and "/work/" not in text and "shared/" not in text
    assert "default" in text
    if command in ("run", "loadtest"):
        for words in ("KiB/MiB/GiB/TiB", "bits/s", "bytes/s", "one-way", "(default unlimited)",
                      "seconds (default 600)"):
            assert words in text, (words, text)
    import argparse

    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in sub.choices[command]._actions:
        if action.option_strings and action.nargs != 0:  # every option that takes a value
            assert "default" in (action.help or ""), action.option_strings


def test_top_help_says_the_bare_command_is_run():
    p = cli_run("--help")
    assert p.returncode == 0 and "'postcopy-harness --vcpus 2' is 'postcopy-harness run --vcpus 2'" in \
        " ".join(p.stdout.split())


def test_ram_beyond_available_memory_is_refused_up_front():
    p = cli_run("run", "--ram", "1T")
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    # the size as typed, then what it needs
    assert lines[0].startswith("postcopy-harness run: --ram 1T needs about 2,048.0 GiB of memory")
    assert "available (MemAvailable" in lines[0]


def test_hugetlb_ram_beyond_free_huge_pages_is_refused_up_front():
    from postcopy_core.probe import free_huge_pages

    if free_huge_pages() >= 512 or free_huge_pages() < 0:
        pytest.skip("enough free huge pages (or no count) here")
    p = cli_run("run", "--backing", "hugetlb", "--ram", "1G")
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "hugetlbfs needs 512 free huge pages for --ram 1G," in lines[0], lines


def test_image_and_ram_that_disagree(tmp_path, capsys):
    img = tmp_path / "ram.img"
    img.write_bytes(os.urandom(1 << 20))
    assert cli.main(["run", "--image", str(img), "--ram", "4M"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"postcopy-harness run: --image '{img}' is {1 << 20} bytes but --ram is {4 << 20} "
                   "(leave --ram out to take the image's size)")


# ------------------------------------------------------------------ real runs


@pytest.mark.kernel
@requires_uffd
def test_image_without_ram_takes_its_size(tmp_path, capsys, clean_machine):
    img = tmp_path / "ram.img"
    img.write_bytes(os.urandom(3 << 20))
    out = tmp_path / "r.json"
    assert cli.main(["run", "--image", str(img), "--vcpus", "2", "--quiet", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["ram-bytes"] == 3 << 20 and rep["status"] == "completed"
    assert rep["verification"]["ram-pages-verified"] == (3 << 20) // 4096


@pytest.mark.kernel
@requires_uffd
def test_bare_options_are_a_run_and_piped_output_never_wraps(tmp_path, clean_machine):
    out = tmp_path / "r.json"
    p = cli_run("--vcpus", "2", "--ram", "8M", "--link", "10gbit", "--json", str(out))
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert rep["vcpus"] == 2 and rep["status"] == "completed"
    # the parsed link, in the report and the summary's title (COLUMNS=60, piped: one line each)
    assert rep["link"] == "10 Gbit/s (1.25 GB/s)"
    lines = p.stdout.splitlines()
    assert any("link 10 Gbit/s (1.25 GB/s)" in line for line in lines), p.stdout
    [pages] = [line for line in lines if "pages total" in line]
    assert "2,048 / " in pages  # thousands separators, the summary's one number format
    for line in lines:
        assert len(line) > 60 or not line.startswith("│ "), "a table row was wrapped"
    assert "pages placed" not in p.stdout + p.stderr  # no progress line when not on a terminal


@pytest.mark.kernel
@requires_uffd
def test_report_keys_are_kebab_case_with_provenance(tmp_path, clean_machine):
    out = tmp_path / "r.json"
    assert cli.main(["run", "--vcpus", "2", "--ram", "4M", "--quiet", "--json", str(out),
                     "--write-ratio", "0.5", "--zero-share", "0.2"]) == 0
    rep = json.loads(out.read_text())
    assert bad_keys(rep) == []
    assert_provenance(rep, "--json")
    assert rep["config"]["write-ratio"] == 0.5 and rep["config"]["zero-share"] == 0.2
    assert rep["verification"]["pages-checked"] > 0
    assert rep["engines"]["exact"]["postcopy-blocktime"] >= 0  # QEMU's names stay


@pytest.mark.kernel
@requires_uffd
def test_loadtest_report_keys_and_provenance(tmp_path, clean_machine):
    from harness import loadtest

    out = tmp_path / "l.json"
    assert loadtest.main(["--vcpus", "1", "--workload", "sequential", "--ram", "4M", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert bad_keys(doc) == []
    assert_provenance(doc, "")
    assert doc["points"][0]["faults-per-s"] > 0 and doc["sweep"]["wake-policies"] == ["waiters"]


@pytest.mark.kernel
@requires_uffd
def test_a_dead_service_says_why(monkeypatch, clean_machine):
    def broken_source(*_args, **_kw):
        raise ValueError("the page source is broken")

    monkeypatch.setattr(run_module, "source_main", broken_source)  # the forked source runs this
    with pytest.raises(RunFailed) as ei:
        run_module.execute(RunConfig(vcpus=1, ram=1 << 20).validate())
    msg = str(ei.value)
    assert "source" in msg and msg.endswith(": ValueError: the page source is broken"), msg
    assert "\n" not in msg


@pytest.mark.kernel
@requires_uffd
def test_a_dead_zygote_says_why(monkeypatch, clean_machine):
    monkeypatch.setattr(run_module, "zygote_command",
                        lambda: [sys.executable, "-c", "import postcopy_core._no_such_module"])
    with pytest.raises(RunFailed) as ei:
        run_module.execute(RunConfig(vcpus=1, ram=1 << 20).validate())
    msg = str(ei.value)
    assert msg.startswith("the vCPU zygote (pid ") and "exited with status 1" in msg, msg
    assert msg.endswith(": ModuleNotFoundError: No module named 'postcopy_core._no_such_module'"), msg


def test_zygote_command_does_not_import_from_the_current_folder(tmp_path):
    """A decoy vcpu_workers in the current folder must not be what the zygote imports."""
    decoy = tmp_path / "vcpu_workers"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "zygote.py").write_text("def main():\n    print('decoy')\n    return 3\n")
    cmd = run_module.zygote_command()
    code = cmd[-1].replace("sys.exit(main())", "import vcpu_workers.zygote as z; print(z.__file__)")
    p = subprocess.run([*cmd[:-1], code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not p.stdout.strip().startswith(str(tmp_path)), p.stdout
    assert p.stdout.strip().endswith(os.path.join("vcpu_workers", "zygote.py"))


@pytest.mark.kernel
@requires_uffd
def test_progress_line_on_a_terminal(clean_machine):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    cfg = RunConfig(vcpus=2, ram=4 << 20, workload="sequential", background=False, link="1gbit,1ms").validate()
    run_module.execute(cfg, RunProgress(cfg.npages, delay=0.0, console=console, enabled=True))
    text = buf.getvalue()
    assert "pages placed" in text and f"/{cfg.npages}" in text and "faults/s" in text
    counts = [int(m) for m in re.findall(rf"(\d+)/{cfg.npages}", text)]
    assert counts == sorted(counts) and counts[-1] > 0  # it moves forward


def test_no_progress_line_when_not_a_terminal():
    buf = io.StringIO()
    progress = RunProgress(100, delay=0.0, console=Console(file=buf))
    assert not progress.enabled and not progress.due()
    assert buf.getvalue() == ""


# ------------------------------------------------------------------ replay


def make_trace(path: Path, vcpus: int = 2) -> None:
    ms = 1_000_000
    with TraceWriter(path, TraceMeta(vcpus=vcpus, page_size=4096)) as w:
        w.write_many([Fault(10 * ms, 0x1000, 0), Fault(20 * ms, 0x2000, 1), Placed(30 * ms, 0x1000),
                      Placed(45 * ms, 0x2000)])


def replay_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    replay_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", *argv])
    return args.func(args)


def test_replay_compare_with_a_binary_file(tmp_path, capsys):
    trace = tmp_path / "t.trace.gz"
    make_trace(trace)
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 4)
    assert replay_main([str(trace), "--compare", str(blob)]) == 2
    err = capsys.readouterr().err
    assert err == f"postcopy-harness replay: {blob}: not a query-migrate JSON file (not UTF-8 text)\n"


def test_replay_vcpus_smaller_than_the_trace_uses(tmp_path, capsys):
    trace = tmp_path / "t.trace.gz"
    make_trace(trace, vcpus=4)
    assert replay_main([str(trace), "--vcpus", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"postcopy-harness replay: --vcpus 1 is smaller than the 2 vCPUs the trace {trace} uses "
                   "(vCPU 1 faults)\n")


@pytest.mark.parametrize("fmt", ["auto", "native"])
def test_replay_report_names_the_format_and_has_provenance(tmp_path, capsys, fmt):
    trace = tmp_path / "t.trace"
    make_trace(trace)
    out = tmp_path / "r.json"
    assert replay_main([str(trace), "--format", fmt, "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["format"] == "native" and rep["recorded-by"] == "harness"
    assert bad_keys(rep) == []
    assert_provenance(rep, "")


def test_replay_of_a_qemu_log_has_kebab_case_meta(tmp_path):
    data = Path(__file__).parent / "data" / "qemu" / "smp2"
    logs = sorted(p for p in data.iterdir() if "log" in p.name)
    if not logs:
        pytest.skip("no QEMU capture")
    out = tmp_path / "r.json"
    assert replay_main([str(logs[0]), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["format"] == "qemu-log" and "begin-lines" in rep["meta"]["qemu"]
    assert bad_keys(rep) == []


# ------------------------------------------------------------------ check


def check_as_nobody(*argv: str) -> tuple[int, str]:
    """``postcopy-harness check ARGV`` in a forked child whose effective uid is nobody's (which also
    drops its capabilities, as for a real non-root user): (exit code, stdout)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            sys.stdout = open(1, "w", closefd=False)  # not pytest's capture, which the parent would not see
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            cli.main(["check", *argv])  # once as root: every module it needs gets imported (nobody may
            sys.stdout.flush()  # not be able to read this Python's files)
            os.dup2(w, 1)
            os.setegid(65534)
            os.seteuid(65534)
            code = cli.main(["check", *argv])
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def test_check_as_a_user_without_userfaultfd():
    """As nobody, with vm.unprivileged_userfaultfd = 0: that row says so, and the one real failure
    (userfaultfd) is one FAIL row; the checks that depend on it are skipped, not failed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is not 0 here")
    code, out = check_as_nobody("--json")
    doc = json.loads(out)
    rows = {c["name"]: c for c in doc["checks"]}
    if rows["userfaultfd"]["ok"]:
        pytest.skip("nobody can open a userfaultfd here (/dev/userfaultfd)")
    assert code == 1 and doc["can-run"] is False
    unpriv = rows["vm.unprivileged_userfaultfd"]
    assert not unpriv["ok"] and "non-root users may not use userfaultfd" in unpriv["detail"]
    failed = [c["name"] for c in doc["checks"] if c["required"] and not c["ok"] and not c["skipped"]]
    assert failed == ["userfaultfd"]
    assert rows["feature THREAD_ID"]["skipped"] and rows["shmem memfd + uffd"]["skipped"]
    code, table = check_as_nobody()
    assert code == 1 and table.count("FAIL") == 1, table
    assert "postcopy cannot run here" in table


def test_check_as_root_marks_unprivileged_userfaultfd_not_needed():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from postcopy_core.probe import probe

    [row] = [c for c in probe(1) if c.name == "vm.unprivileged_userfaultfd"]
    assert row.ok and "root does not need it" in row.detail


def test_readme_says_what_the_install_and_linux_need():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert text.startswith("# postcopy-harness\n\n```\npip install -e '.[test]' && postcopy-harness\n"
                           "python3 -m pytest -q\n```\n")
    flat = " ".join(text.split())
    for words in ("a C compiler and the Python headers", "vm.unprivileged_userfaultfd=1", "free huge pages",
                  "plain `pip install .`", "postcopy-harness check"):
        assert words in flat, words
