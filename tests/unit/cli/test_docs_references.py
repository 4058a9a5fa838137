"""The repository's pointers into docs/ lead somewhere: every section named after a mention of a document
exists in it, and every markdown link to a document's #anchor matches one of its headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from interceptd.cli import docs

ROOT = Path(__file__).resolve().parents[3]
DOCUMENTS = ("docs/istio-compatibility.md", "docs/architecture.md")
SEARCHED = ("daemon", "tests", "config", "docs", "README.md", "Makefile")
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ""}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def _headings(document: str) -> set[str]:
    text = (ROOT / document).read_text(encoding="utf-8")
    return {m.group(1).strip() for m in re.finditer(r"^#{1,4} (.+)$", text, re.MULTILINE)}


def _files() -> list[Path]:
    out: list[Path] = []
    for name in SEARCHED:
        path = ROOT / name
        out += [p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and ".egg-info" not in str(p)] \
            if path.is_dir() else [path]
    return out


def _joined(text: str) -> str:
    """Lines joined, without comment markers and indentation, so a pointer broken over lines reads as one."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_named_sections_exist(document: str) -> None:
    headings = _headings(document)
    mention = re.compile(re.escape(document) + r'[^"\n]{0,4}((?:"[A-Z][^"]*"(?:,? and |, )?)+)')
    missing = []
    for path in _files():
        for match in mention.finditer(_joined(path.read_text(encoding="utf-8", errors="replace"))):
            missing += [(str(path.relative_to(ROOT)), name) for name in re.findall(r'"([^"]+)"', match.group(1))
                        if name not in headings]
    assert not missing, f"sections named but not in {document}: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_anchors_exist(document: str) -> None:
    anchors = {_slug(h) for h in _headings(document)}
    name = Path(document).name
    missing = []
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        link = re.compile(r"\]\((?:[\w./-]*/)?" + re.escape(name) + r"#([\w-]+)\)" if path.name != name
                          else r"\]\(#([\w-]+)\)")
        missing += [(str(path.relative_to(ROOT)), a) for a in link.findall(text) if a not in anchors]
    assert not missing, f"links to missing anchors of {document}: {missing}"


def test_compat_reference_is_current() -> None:
    text = (ROOT / docs.COMPAT_PATH).read_text(encoding="utf-8")
    assert text == docs.splice(text, docs.compat_reference(), docs.COMPAT_PATH), \
        f"{docs.COMPAT_PATH}'s option tables are out of date: run `make docs`"
    assert all(f"`{o.flag}`" in text for o in docs.OPTIONS if o.scope in ("capture", "compat"))
