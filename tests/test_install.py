"""A plain (non-editable) install, used from inside a checkout: every process runs the installed code.

The checkout is copied without any build output (as a fresh clone is), installed with
``pip install .`` into a throw-away venv that borrows this environment's dependencies, and then
driven from inside the copy, where ``vcpu_workers/`` and ``postcopy_core/`` (without the built
``_uffd``) sit in the current folder.  Once per session: a build takes a few seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import requires_uffd

REPO = Path(__file__).resolve().parent.parent
BUILD_OUTPUT = ("build", "dist", "*.egg-info", "__pycache__", "*.so", ".git", ".pytest_cache", ".hypothesis",
                ".ruff_cache", "venv*", ".venv")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def plain_install(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh checkout, the venv's bin folder) of a ``pip install .`` of this tree."""
    root = tmp_path_factory.mktemp("plain")
    checkout = root / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(*BUILD_OUTPUT))
    venv = root / "venv"
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip"]
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], timeout=120, capture_output=True, text=True)
    if made.returncode:  # no ensurepip (e.g. Debian without python3-venv): drive the venv with our own pip
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                       capture_output=True)
        pip = [sys.executable, "-m", "pip", "--python", str(py)]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # the dependencies (cffi, numpy, psutil, ...) come from this environment, so nothing is downloaded
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    if site.ENABLE_USER_SITE:
        ours.append(site.getusersitepackages())
    Path(purelib, "zz_test_deps.pth").write_text("\n".join(dict.fromkeys(p for p in ours if os.path.isdir(p))))
    # offline first (this environment's setuptools/wheel/cffi), else pip's usual isolated build
    errors = []
    for extra in (["--no-build-isolation"], []):
        p = subprocess.run([*pip, "install", "-q", "--no-deps", *extra, str(checkout)],
                           capture_output=True, text=True, timeout=600, cwd=root)
        if p.returncode == 0:
            break
        errors.append(p.stdout + p.stderr)
    else:
        pytest.fail("pip install . failed:\n" + "\n".join(errors)[-3000:])
    assert not list(checkout.glob("postcopy_core/_uffd*.so")), "a plain install must not build in place"
    return checkout, venv / "bin"


def test_version_of_the_plain_install(plain_install):
    checkout, bin_dir = plain_install
    p = subprocess.run([str(bin_dir / "postcopy-harness"), "--version"], cwd=checkout, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("postcopy-harness 0."), (p.stdout, p.stderr)


@pytest.mark.kernel
@requires_uffd
def test_run_from_inside_the_checkout(plain_install, clean_machine):
    """The issue's case: the zygote used to import the checkout's vcpu_workers and die on the missing _uffd."""
    checkout, bin_dir = plain_install
    out = checkout / "report.json"
    p = subprocess.run([str(bin_dir / "postcopy-harness"), "run", "--vcpus", "2", "--ram", "16M", "--quiet",
                        "--json", str(out)], cwd=checkout, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert rep["status"] == "completed" and rep["pages"]["placed"] == rep["pages"]["total"]


# the scripts that import the package at start (soak.py imports it only once it runs)
BENCHES = ["bench/compare_ref.py", "bench/bench_replay.py", "bench/stream_faults.py", "bench/accuracy.py",
           "bench/tls_cost.py"]


@pytest.mark.parametrize("script", BENCHES + ["bench/soak.py"])
def test_benchmarks_use_the_plain_install(plain_install, script):
    checkout, bin_dir = plain_install
    p = subprocess.run([str(bin_dir / "python"), script, "--help"], cwd=checkout, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout


@pytest.mark.parametrize("script", BENCHES)
def test_benchmark_without_any_install_says_so_in_one_line(tmp_path, script):
    """Outside every install (an interpreter that cannot import the package), one line, no traceback."""
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    p = subprocess.run([sys.executable, "-S", str(REPO / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and "needs postcopy-harness installed" in p.stderr, p.stderr


@pytest.mark.kernel
@requires_uffd
def test_what_the_readme_shows_works_from_anywhere(plain_install, tmp_path, clean_machine):
    """From a folder far from any checkout: the demo's QEMU capture and the C reference come with the
    package (the reference is built with the system compiler), nothing is looked up beside a checkout."""
    _, bin_dir = plain_install
    exe = str(bin_dir / "postcopy-harness")
    p = subprocess.run([exe, "demo", "overcount", "--fast"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "smp4" in p.stdout and "seed (and QEMU) total" in p.stdout
    out = tmp_path / "lt.csv"
    p = subprocess.run([exe, "loadtest", "--vcpus", "1", "--workload", "sequential", "--ram", "4M",
                        "--no-background", "--reference", "--csv", str(out)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    [row] = list(csv.DictReader(out.open()))
    assert float(row["ref-faults-per-s"]) > 0 and row["ref-error"] == ""
    shipped = subprocess.run([str(bin_dir / "python"), "-c", "from harness import reference; "
                              "print(reference.default_source())"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60).stdout.strip()
    assert "site-packages" in shipped and shipped.endswith("harness/data/uffd_ref.c")


def test_the_qemu_guest_ships_in_the_plain_install(plain_install, tmp_path):
    """`postcopy-harness qemu` boots the sector the package carries, with its source beside it."""
    _checkout, bin_dir = plain_install
    code = ("from postcopy_core import guest; "
            "print(guest.BINARY.is_file(), guest.SOURCE.is_file(), 'site-packages' in str(guest.BINARY))")
    p = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.split() == ["True", "True", "True"], p.stderr
