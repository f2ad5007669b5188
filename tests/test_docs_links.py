"""Every relative link and image in the README, docs/, CONTRIBUTING.md and CHANGELOG.md resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    p
    for p in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
    if p.exists()
)
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_documents_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/methods.md", "docs/findings.md", "docs/reproducing.md", "docs/performance.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document: Path) -> None:
    broken = []
    for target in _links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{document.relative_to(ROOT)}: broken links: {broken}"


def test_readme_is_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_readme_test_command_is_what_ci_runs() -> None:
    command = (
        'pip install torch==2.13.0 && pip install -e ".[test]" -c tests/constraints.txt'
        ' && python -m pytest -m "not slow and not gpu"'
    )
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / ".ci" / "run").read_text()


MARKDOWN_NAME = re.compile(r"[\w./-]*?([A-Za-z0-9_-]+\.md)\b")


def _tracked_names() -> set[str]:
    return {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}


def _named_markdown(text: str) -> set[str]:
    return {m.group(1) for m in MARKDOWN_NAME.finditer(text)}


def test_no_reference_outside_the_repository() -> None:
    """Every Markdown file that the docs or the package code name is one a user has: it is in the repo."""
    sources = [
        *DOCUMENTS,
        *(
            p
            for package in ("benchmark", "attacks", "defenses", "leaderboard")
            for p in ROOT.joinpath(package).rglob("*.py")
        ),
    ]
    known = _tracked_names()
    missing = {str(p.relative_to(ROOT)): sorted(_named_markdown(p.read_text()) - known) for p in sources}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_the_reference_check_can_fail() -> None:
    assert _named_markdown("see NOTES-ELSEWHERE.md and docs/methods.md") == {"NOTES-ELSEWHERE.md", "methods.md"}
    assert "NOTES-ELSEWHERE.md" not in _tracked_names() and "methods.md" in _tracked_names()
