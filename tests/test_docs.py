"""The README stays a ten-minute read, and every relative link of the README and docs/ leads somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 350, f"README.md has {lines} lines: move details to docs/ (at most 350)"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    bad = []
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S))  # not code
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    assert bad == []


def test_the_dated_measurements_left_the_readme():
    """Measured tables live in docs/performance.md (each with its command), not in the README."""
    text = (ROOT / "README.md").read_text()
    assert not re.search(r"20\d\d-\d\d-\d\d", text), "a dated measurement in the README"
    perf = (ROOT / "docs" / "performance.md").read_text()
    assert "python bench/" in perf and "postcopy-harness " in perf
