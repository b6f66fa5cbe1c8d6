"""The tree stays ruff-clean, functions stay small, and the facade stays a facade.

ruff comes with the test extras (``pip install -e '.[test]'``): where it is missing this fails
instead of skipping, so a lint that does not run can never pass.
"""

import ast
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("postcopy_core", "harness", "vcpu_workers", "postcopy_harness.py")


def ruff() -> str:
    exe = shutil.which("ruff")
    assert exe, "ruff is not installed: it is in the test extras (pip install -e '.[test]')"
    return exe


def test_ruff_clean():
    r = subprocess.run([ruff(), "check", "--quiet", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_function_of_the_package_is_over_complexity_15():
    """mccabe complexity at most 15 (pyproject's [tool.ruff.lint.mccabe]), said again here so that a
    change to the config cannot lift the limit unnoticed."""
    r = subprocess.run([ruff(), "check", "--quiet", "--select", "C901", "--config", "lint.mccabe.max-complexity=15",
                        *PACKAGES], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_package_module_imports_the_facade():
    """The facade ``postcopy_harness`` depends on ``harness`` and ``postcopy_core``, never the other way."""
    offenders = sorted(str(p.relative_to(ROOT)) for d in PACKAGES[:3] for p in (ROOT / d).rglob("*.py")
                       if "postcopy_harness" in imports_of(p))
    assert offenders == []


def test_the_facade_only_re_exports():
    """postcopy_harness.py defines no function or class of its own: the work lives in harness."""
    tree = ast.parse((ROOT / "postcopy_harness.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert defined == []
