"""The README and docs/*.md: every relative link points at a file that exists (and at a heading that
exists, when it names one), and the README stays a short entry page that links every area's page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
AREAS = ["data.md", "training.md", "evaluation.md", "slurm.md", "architecture.md", "PERFORMANCE.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text without code blocks and with inline code blanked (code is not linked)."""
    return re.sub(r"`[^`\n]*`", "code", without_fences(text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", without_fences(path.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading")
    return broken


def test_the_check_finds_links_and_reports_broken_ones(tmp_path):
    assert len(links(ROOT / "README.md")) >= 6
    (tmp_path / "other.md").write_text("# Other page\n\n## `rl` group, GRPO (AM-Thinking-v1 style)\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[a](other.md) [b](other.md#rl-group-grpo-am-thinking-v1-style) [c](#page) [d](https://example.com/x)\n"
                    "[e](missing.md) [f](other.md#nowhere) `[g](in-code.md)`\n```\n[h](in-fence.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no such heading"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == [], page.relative_to(ROOT)


def test_readme_is_short_and_links_every_area():
    text = (ROOT / "README.md").read_text()
    assert len(text) < 10_000, f"README.md has {len(text)} characters; move detail into docs/"
    assert {t.split("#")[0] for t in links(ROOT / "README.md")} >= {f"docs/{a}" for a in AREAS}
    assert "make test" in text  # .ci/run runs the README's test command (make test)
