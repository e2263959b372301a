"""The README stays short and every link in it leads somewhere (the docs/ pages are checked by
`mkdocs build --strict` in CI; the README is outside that site, so its links are checked here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_readme_links_lead_to_files_and_headings():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links its docs pages"
    for link in local:
        path, _, anchor = link.partition("#")
        target = (README.parent / path) if path else README
        assert target.exists(), f"README links {link}: no such file"
        if anchor:
            assert anchor in _anchors(target), f"README links {link}: no such heading in {target.name}"
