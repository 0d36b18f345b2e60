"""The documents a fresh clone ships: every relative link in them resolves inside it."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("docs/*.md"))]
# [text](target) outside code spans; targets with a scheme (https:, mailto:) are not files.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # fenced code is not prose
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve_inside_the_repository(document):
    source = REPO / document
    links = _links(source.read_text())
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        if not target.is_relative_to(REPO):
            broken.append(f"{link} (outside the repository)")
        elif not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{document}: broken links: {broken}"


def test_the_walker_sees_links_and_outside_targets():
    """The walker itself: it finds links, skips code and URLs, and judges ../ as outside."""
    text = "[a](docs/DESIGN.md) `[b](x.md)` [c](https://x.org) [d](../shared/DESIGN.md)"
    assert _links(text) == ["docs/DESIGN.md", "../shared/DESIGN.md"]
    assert not (REPO / "../shared/DESIGN.md").resolve().is_relative_to(REPO)
    assert "long-context" in _anchors("## Long context\n")
