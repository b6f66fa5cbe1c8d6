"""run --handler / restore: the example handlers, good and broken, through the real console script.

The good ones must complete with every page verified at 1 and 256 vCPUs; each broken one must be
caught with its fault named (the stall watch's words, or the checker's kind). A handler that stops
answering, dies, or leaves a child behind is named / cleaned up too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = ROOT / "examples" / "handlers"
TIMEOUT = 300


def console_script() -> str:
    beside = Path(sys.executable).with_name("postcopy-harness")
    found = str(beside) if beside.exists() else shutil.which("postcopy-harness")
    assert found, "the postcopy-harness console script is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """Every C example built with plain ``cc -O2 FILE.c``, as the README says."""
    out = tmp_path_factory.mktemp("handlers")
    exe = {}
    for src in sorted(HANDLERS.glob("*.c")):
        target = out / src.stem
        subprocess.run(["cc", "-O2", "-o", str(target), str(src)], check=True, timeout=120)
        exe[src.stem] = str(target)
    return exe


def run(tmp_path: Path, *argv: str, command: str = "run") -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    p = subprocess.run([console_script(), command, *argv, "--quiet", "--json", str(report)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=TIMEOUT)
    rep = json.loads(report.read_text()) if report.exists() else {}
    return p.returncode, rep, p.stderr


def assert_verified(rep: dict, vcpus: int) -> None:
    assert rep["status"] == "completed", rep.get("error")
    v = rep["verification"]
    assert v["mismatches"] == 0 and v["ram-bad-pages"] == 0 and v["lost-writes"] == 0
    assert v["pages-checked"] > 0 and v["ram-pages-verified"] == rep["pages"]["placed"] > 0
    assert rep["faults"]["total"] > 0 and rep["latency-us"]["p99"] > 0
    assert len(rep["workers"]["vcpu-stall-ms"]) == vcpus
    assert rep["engines"]["truth"]["postcopy-vcpu-blocktime"]  # from the vCPUs' own clocks
    for name in ("seed", "modern", "exact"):  # the handler's own events: never invented
        assert rep["engines"][name] == {"available": False, "why": rep["engines"][name]["why"]}
    assert rep["handler"]["kind"] == "external"


def no_handler_left(marker: str) -> None:
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in (p.info["cmdline"] or ()))]
    assert not left, f"handler processes left behind: {left}"


@pytest.mark.parametrize("vcpus", [1, 256])
def test_c_handler_firecracker_handoff(tmp_path, built, vcpus):
    code, rep, err = run(tmp_path, "--handler", built["uffd_handler"], "--handoff", "firecracker",
                         "--vcpus", str(vcpus), "--ram", "8M", "--workload", "sequential")
    assert code == 0, err
    assert_verified(rep, vcpus)
    assert rep["pages"]["placed"] == rep["pages"]["total"]  # sequential: every page touched
    assert rep["handler"]["handoff"] == "firecracker" and rep["handler"]["ended"] == "terminated"
    no_handler_left(built["uffd_handler"])
    assert not os.path.exists(os.path.dirname(rep["mem-file"]))  # the written file and the sockets' folder


@pytest.mark.parametrize("vcpus", [1, 256])
def test_python_handler_pch_handoff(tmp_path, vcpus):
    cmd = f"{sys.executable} {HANDLERS / 'py_handler.py'}"
    code, rep, err = run(tmp_path, "--handler", cmd, "--vcpus", str(vcpus), "--ram", "4M", "--workload", "shared")
    assert code == 0, err
    assert_verified(rep, vcpus)
    assert rep["handler"]["ended"] == "quit"
    said = rep["handler"]["reported"]  # the handler's own words, next to what the vCPUs measured
    assert said["type"] == "stats" and said["faults"] >= said["placed"] > 0


def test_only_accesses_that_found_their_page_missing_count_as_faults(tmp_path, built):
    """The external handler keeps no received map: the workers ask mincore whether an access
    will fault, so a page read again after it came in is not counted (or timed) as a fault."""
    code, rep, err = run(tmp_path, "--handler", built["uffd_handler"], "--handoff", "firecracker",
                         "--vcpus", "1", "--ram", "8M", "--workload", "hotset")
    assert code == 0, err
    assert_verified(rep, 1)
    faulting, accesses = rep["workers"]["faulting-accesses"][0], rep["workers"]["accesses"][0]
    assert accesses > rep["pages"]["placed"]  # hotset reads pages again
    assert 0 < faulting <= rep["pages"]["placed"]


def test_one_connection_handlers_run_one_per_uffd(tmp_path, built):
    code, rep, err = run(tmp_path, "--handler", built["uffd_handler"], "--handoff", "firecracker",
                         "--handler-per-uffd", "--vcpus", "6", "--ram", "4M", "--workload", "shared")
    assert code == 0, err
    assert_verified(rep, 6)
    assert len(rep["handler"]["pids"]) == 6


def test_restore_from_a_users_memory_file_both_handlers(tmp_path, built):
    mem = tmp_path / "guest.mem"
    mem.write_bytes(os.urandom(4 << 20))
    code, rep, err = run(tmp_path, "--mem-file", str(mem), "--handler", built["uffd_handler"], "--handoff",
                         "firecracker", "--vcpus", "4", command="restore")
    assert code == 0, err
    assert_verified(rep, 4)
    assert rep["mode"] == "restore" and rep["ram-bytes"] == 4 << 20
    code, rep, err = run(tmp_path, "--mem-file", str(mem), "--vcpus", "4", command="restore")
    assert code == 0, err
    assert rep["status"] == "completed" and rep["handler"]["kind"] == "built-in"
    assert rep["verification"]["ram-bad-pages"] == 0 and rep["verification"]["pages-checked"] > 0


@pytest.mark.parametrize("which", ["c", "python"])
def test_remove_and_fork_events_served_by_the_good_handlers(tmp_path, built, which):
    handler = (["--handler", built["uffd_handler"], "--handoff", "firecracker"] if which == "c"
               else ["--handler", f"{sys.executable} {HANDLERS / 'py_handler.py'}"])
    code, rep, err = run(tmp_path, *handler, "--vcpus", "8", "--ram", "8M", "--remove-rate", "0.2", "--fork-events")
    assert code == 0, err
    assert_verified(rep, 8)
    assert rep["pages-removed"] > 0 and rep["forks"] == 8


@pytest.mark.parametrize("vcpus", [1, 32])
@pytest.mark.parametrize("which", ["c", "python"])
def test_unmap_and_remap_events_served_by_the_good_handlers(tmp_path, built, which, vcpus):
    handler = (["--handler", built["uffd_handler"], "--handoff", "firecracker"] if which == "c"
               else ["--handler", f"{sys.executable} {HANDLERS / 'py_handler.py'}"])
    code, rep, err = run(tmp_path, *handler, "--vcpus", str(vcpus), "--ram", "8M", "--workload", "random",
                         "--unmap-events", "--stall-timeout", "20")
    assert code == 0, err
    assert_verified(rep, vcpus)
    # each vCPU unmapped a piece and mapped it back, and moved another (random: its next page is elsewhere)
    assert rep["pieces-unmapped"] == 2 * vcpus
    assert rep["piece-faults"] > 0  # faults there afterwards reached the handler, at the new mappings
    if which == "python":  # what the kernel delivered, as the handler counted it
        said = rep["handler"]["reported"]
        assert said["remaps"] == vcpus  # one per mremap
        assert said["unmaps"] >= vcpus  # the munmap's, and (on this kernel) mremap's of the old range


def test_unmap_events_with_remove_and_fork_events(tmp_path, built):
    code, rep, err = run(tmp_path, "--handler", built["uffd_handler"], "--handoff", "firecracker", "--vcpus", "8",
                         "--ram", "8M", "--unmap-events", "--fork-events", "--remove-rate", "0.2")
    assert code == 0, err
    assert_verified(rep, 8)
    assert rep["pieces-unmapped"] == 16 and rep["forks"] == 8 and rep["pages-removed"] > 0


# broken handler -> (extra flags, words the error must hold)
BROKEN = {
    "broken_eexist": (["--workload", "shared", "--vcpus", "16"], ["was never woken", "EEXIST"]),
    "broken_offset": (["--vcpus", "4"], ["verification failed", "foreign"]),
    "broken_eagain": (["--vcpus", "8", "--ram", "32M", "--remove-rate", "0.3"], ["never placed", "EAGAIN"]),
    "broken_remove": (["--vcpus", "4", "--remove-rate", "0.2"], ["verification failed", "stale"]),
    "broken_fork": (["--vcpus", "4", "--fork-events"], ["the child it forked mid-run waited", "UFFD_EVENT_FORK"]),
    "broken_unmap": (["--vcpus", "4", "--unmap-events"], ["never placed", "is in the piece this vCPU"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_handler_is_caught_and_named(tmp_path, built, name):
    flags, words = BROKEN[name]
    argv = ["--handler", built[name], "--handoff", "firecracker", "--stall-timeout", "2", "--ram", "8M", *flags]
    code, rep, err = run(tmp_path, *argv)
    assert code == 1
    assert rep["status"] == "failed"
    for w in words:
        assert w in rep["error"], rep["error"]
    assert err.count("\n") == 1 and "Traceback" not in err
    no_handler_left(built[name])


SILENT = r"""
import json, os, signal, socket, subprocess, sys, time
subprocess.Popen(["sleep", "300", "pch-test-grandchild"])  # teardown must stop the whole group
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(os.environ["PCH_HANDLER_SOCKET"])
keep = []
while True:
    data, fds, _, _ = socket.recv_fds(s, 65536, 1)
    keep += fds
    if json.loads(data)["type"] == "end":
        break
s.send(b'{"type": "ready"}')
if sys.argv[1] == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
if sys.argv[1] == "die":
    time.sleep(0.2)
    print("handler: giving up on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["silent", "stop", "die"])
def test_a_handler_that_stops_answering_or_dies_is_named(tmp_path, how):
    script = tmp_path / "silent_handler.py"
    script.write_text(SILENT)
    code, rep, err = run(tmp_path, "--handler", f"{sys.executable} {script} {how}", "--vcpus", "3", "--ram", "4M",
                         "--stall-timeout", "1.5")
    assert code == 1 and rep["status"] == "failed"
    if how == "silent":
        assert "stopped answering" in rep["error"] and "never read" in rep["error"], rep["error"]
    elif how == "stop":
        assert "is stopped: no fault is answered" in rep["error"], rep["error"]
    else:
        assert "exited with status 3" in rep["error"] and "giving up on purpose" in rep["error"], rep["error"]
    assert rep["handler"]["command"].endswith(how)
    no_handler_left("pch-test-grandchild")
    no_handler_left(str(script))


def test_a_non_vcpu_process_left_waiting_is_named(tmp_path):
    script = tmp_path / "vcpus_only.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(HANDLERS)!r})
import py_handler
serve_all = py_handler.read_events
def vcpus_only(port, *rest):  # serves the vCPUs' uffds only (pch hand-off: vcpu -1 is a non-vCPU process)
    if port.msg["vcpu"] < 0:
        time.sleep(0.005)
        return True
    return serve_all(port, *rest)
py_handler.read_events = vcpus_only
sys.exit(py_handler.main())
""")
    code, rep, err = run(tmp_path, "--handler", f"{sys.executable} {script}", "--vcpus", "2", "--non-vcpu", "1",
                         "--ram", "4M", "--stall-timeout", "1.5")
    assert code == 1 and rep["status"] == "failed"
    assert "stopped answering: non-vCPU process 0" in rep["error"] and "never read" in rep["error"], rep["error"]


@pytest.mark.parametrize("argv, line", [
    (["run", "--handler="], "postcopy-harness run: --handler: empty command"),
    (["run", "--handler", "/nonexistent/h"],
     "postcopy-harness run: --handler: '/nonexistent/h' is not a command here (not found, or not executable)"),
    (["run", "--handoff", "firecracker"], "postcopy-harness run: --handoff and --handler-per-uffd need --handler CMD"),
    (["run", "--handler", "true", "--handler-per-uffd"],
     "postcopy-harness run: --handler-per-uffd needs --handoff firecracker"),
    (["run", "--remove-rate", "0.1"],
     "postcopy-harness run: --remove-rate needs --handler: the built-in handler does not serve UFFD_EVENT_REMOVE"),
    (["run", "--handler", "true", "--remove-rate", "0.1", "--workload", "shared"],
     "postcopy-harness run: --remove-rate needs a workload where each page has one vCPU (sequential, random, stride)"),
    (["run", "--handler", "true", "--precopy", "1"],
     "postcopy-harness run: --precopy is not for --handler (a restore from a memory file: no source, no migration "
     "link, no built-in handler)"),
    (["run", "--handler", "true", "--link", "1gbit"],
     "postcopy-harness run: --link is not for --handler (a restore from a memory file: no source, no migration "
     "link, no built-in handler)"),
    (["loadtest", "--handler", "true", "--reference"],
     "postcopy-harness loadtest: --reference is not for --handler (a restore from a memory file: no source, no "
     "migration link, no built-in handler)"),
    (["compare", "--handler", "true", "--strategy", "vanilla"],
     "postcopy-harness compare: --strategy is not for --handler (a restore from a memory file: no source, no "
     "migration link, no built-in handler)"),
    (["loadtest", "--remove-rate", "0.1"], None),
    (["run", "--fork-events"],
     "postcopy-harness run: --fork-events needs --handler: the built-in handler does not serve UFFD_EVENT_FORK"),
    (["run", "--unmap-events"],
     "postcopy-harness run: --unmap-events needs --handler: the built-in handler does not serve "
     "UFFD_EVENT_UNMAP/REMAP"),
    (["restore", "--mem-file", "/nonexistent"],
     "postcopy-harness restore: cannot read image '/nonexistent': No such file or directory"),
])
def test_bad_handler_flags_one_line(argv, line):
    p = subprocess.run([console_script(), *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    if line is None:  # argparse's own refusal: the flag does not exist there
        assert "unrecognized arguments" in p.stderr
    else:
        assert p.stderr.strip() == line


@pytest.mark.parametrize("command", ["loadtest", "compare"])
def test_side_by_side_with_the_builtin_handler(tmp_path, built, command):
    doc = tmp_path / "sweep.json"
    vcpus = "1,4" if command == "loadtest" else "4"
    p = subprocess.run([console_script(), command, "--handler", built["uffd_handler"], "--handoff", "firecracker",
                        "--vcpus", vcpus, "--ram", "4M", "--workload", "random", "--json", str(doc)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    rows = json.loads(doc.read_text())["rows"]
    assert [(r["handler"], r["vcpus"]) for r in rows] == [
        (h, int(n)) for n in vcpus.split(",") for h in ("built-in", built["uffd_handler"])]
    for r in rows:
        assert r["status"] == "completed" and r["faults-per-s"] > 0 and r["p99-us"] >= r["p50-us"] > 0
    assert "faults/s" in p.stdout and built["uffd_handler"][-24:] in p.stdout


# PCH_TEST_HANDLER=CMD (and PCH_TEST_HANDOFF) runs these with your own handler; by default they run
# with the Python example, so they never skip
YOURS = os.environ.get("PCH_TEST_HANDLER") or f"{sys.executable} {HANDLERS / 'py_handler.py'}"


@pytest.mark.parametrize("flags", [
    ["--vcpus", "1", "--workload", "sequential"],
    ["--vcpus", "256", "--workload", "sequential"],
    ["--vcpus", "32", "--workload", "shared"],
    ["--vcpus", "8", "--workload", "random", "--remove-rate", "0.2"],
    ["--vcpus", "8", "--workload", "random", "--fork-events"],
    ["--vcpus", "8", "--workload", "random", "--unmap-events"],
], ids=["1-vcpu", "256-vcpus", "shared-pages", "remove-events", "fork-events", "unmap-events"])
def test_your_handler(tmp_path, flags):
    handoff = os.environ.get("PCH_TEST_HANDOFF", "pch")
    code, rep, err = run(tmp_path, "--handler", YOURS, "--handoff", handoff, "--ram", "8M", "--stall-timeout", "10",
                         *flags)
    assert code == 0, err
    assert_verified(rep, int(flags[1]))


def test_stale_handler_folders_of_dead_runs_are_swept(tmp_path):
    from harness.handler_process import sweep_stale_workdirs, workdir_prefix

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{workdir_prefix(dead.pid)}abc"
    stale.mkdir()
    (stale / "guest-ram.mem").write_bytes(b"x")
    live = tmp_path / f"{workdir_prefix()}def"  # this process's own: a run of ours may be under way
    live.mkdir()
    assert sweep_stale_workdirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists()


def test_python_api_runs_a_handler(built):
    import postcopy_harness as ph

    rep = ph.run(handler=built["uffd_handler"], handoff="firecracker", vcpus=2, ram="4M", workload="shared")
    assert_verified(rep, 2)
    with pytest.raises(ph.ConfigError, match="^link is not for handler="):
        ph.run(handler=built["uffd_handler"], link="1gbit")
    with pytest.raises(ph.ConfigError, match="--handoff and --handler-per-uffd need --handler CMD"):
        ph.run(handoff="firecracker")
