"""docs/architecture.md stays true: every file and function it names exists, and the path it walks
fits in five files.

The doc names files as `name.py` / `name.c` / `name.h` and functions as `name()` or
`Class.method()`, in backticks.  Each numbered step's functions must be defined in a file that the
same step names, so a function moved to another file fails here as surely as one renamed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SOURCE_DIRS = ("postcopy_core", "harness", "vcpu_workers")
MAX_FILES = 5

FILE_RE = re.compile(r"`([\w/]+\.(?:py|c|h))`")
FUNC_RE = re.compile(r"`((?:[A-Za-z_]\w*\.)?[A-Za-z_]\w*)\(\)`")
STEP_RE = re.compile(r"^\d+\. ", re.M)


def find_source(name: str) -> Path:
    """The one source file of the package called `name` (a bare name or a path from the root)."""
    if "/" in name:
        path = ROOT / name
        if not path.is_file():
            raise LookupError(f"{name}: no such file")
        return path
    hits = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob(name)]
    if len(hits) != 1:
        raise LookupError(f"{name}: {len(hits)} files of that name in {', '.join(SOURCE_DIRS)} (want 1)")
    return hits[0]


def defines(path: Path, func: str) -> bool:
    """Whether `path` defines function `func` (C: a definition at the start of a line; Python: a
    top-level function, or `Class.method`)."""
    text = path.read_text()
    if path.suffix == ".py":
        tree = ast.parse(text)
        cls, _, name = func.rpartition(".")
        scopes = [tree] if not cls else [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
                   for scope in scopes for n in scope.body)
    if "." in func:
        return False
    # a C definition: return type and name at the start of a line, the body's brace after the arguments
    return re.search(rf"^[A-Za-z_][\w \*]*\b{re.escape(func)}\([^;{{]*\)\s*\{{", text, re.M) is not None


def path_steps(doc: str) -> list[str]:
    """The numbered steps of the section "## The path" (up to the next section)."""
    start = doc.find("## The path")
    if start < 0:
        return []
    end = doc.find("\n## ", start + 1)
    return STEP_RE.split(doc[start:end if end >= 0 else len(doc)])[1:]


def problems(doc: str) -> list[str]:
    """Everything in the doc text that is not true of the tree (empty: all true)."""
    found: list[str] = []
    files: dict[str, Path] = {}
    for name in dict.fromkeys(FILE_RE.findall(doc)):
        try:
            files[name] = find_source(name)
        except LookupError as e:
            found.append(str(e))
    if len(files) > MAX_FILES:
        found.append(f"the path names {len(files)} files (at most {MAX_FILES}): {', '.join(files)}")
    for func in dict.fromkeys(FUNC_RE.findall(doc)):
        if not any(defines(p, func) for p in files.values()):
            found.append(f"{func}() is not defined in any file the doc names")
    steps = path_steps(doc)
    if not steps:
        found.append("no numbered steps under '## The path'")
    for i, step in enumerate(steps, 1):
        step_files = [files[n] for n in dict.fromkeys(FILE_RE.findall(step)) if n in files]
        if not step_files:
            found.append(f"step {i} names no file")
        for func in dict.fromkeys(FUNC_RE.findall(step)):
            if not any(defines(p, func) for p in step_files):
                where = ', '.join(p.name for p in step_files) or 'any file'
                found.append(f"step {i}: {func}() is not defined in {where}")
    return found


def test_every_name_in_the_architecture_doc_exists():
    assert problems(DOC.read_text()) == []


def test_the_doc_names_functions_in_every_step():
    steps = path_steps(DOC.read_text())
    assert len(steps) >= 5
    assert all(FUNC_RE.search(s) for s in steps)


@pytest.mark.parametrize("change, expected", [
    (("`read_faults()`", "`read_fault()`"), "read_fault() is not defined"),
    (("`Destination.ship_events()`", "`Destination.send_events()`"), "Destination.send_events() is not defined"),
    (("`source.c`", "`source_lane.c`"), "source_lane.c: 0 files"),
    (("`add_page()`", "`place()`"), "place() is not defined in source.c"),  # defined, but in another file
    (("## The path", "## The path\n\nAlso `run.py`, `cli.py`, `board.py`."), "names 8 files"),
    (("`Destination.run()` pauses", "`Destination.loop()` pauses"), "Destination.loop() is not defined in any"),
])
def test_the_check_catches_a_wrong_name(change, expected):
    """The checker is not vacuous: a renamed function, a moved one, a missing file, too many files."""
    old, new = change
    doc = DOC.read_text()
    assert old in doc
    assert any(expected in p for p in problems(doc.replace(old, new, 1))), problems(doc.replace(old, new, 1))
