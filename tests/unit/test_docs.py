"""The documentation documents this repository: generated pages are current, links stay inside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlp3d
from vlp3d.cli import build_parser, main
from vlp3d.jobs import config_docs

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    """Targets of the Markdown links of a page, code blocks left out."""
    return _LINK.findall(_FENCE.sub("", page.read_text()))


def test_configuration_page_is_generated():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_docs.render(), f"docs/configuration.md is stale: run {config_docs.COMMAND}"


def test_configuration_page_lists_every_key():
    text = config_docs.render()
    for key, _default, _help in vlp3d.config.describe():
        assert f"| `{key}` |" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(page):
    assert page.is_file(), f"{page} is missing"
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points into ../shared, outside the repository"
    for target in links(page):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE), f"{page.name}: external link {target}"
        path = target.split("#", 1)[0]
        if not path:  # an anchor on the same page
            continue
        assert not path.startswith("/"), f"{page.name}: absolute link {target}"
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: broken link {target}"


def test_docs_are_linked_from_the_readme():
    readme = set(links(ROOT / "README.md"))
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlp3d {vlp3d.__version__}"


def test_help_lists_exit_codes():
    epilog = build_parser().epilog
    for code in ("0  success", "1  the work failed", "2  bad input", "3  an internal error"):
        assert code in epilog


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_exists(page):
    """Every `file.md#anchor` and `#anchor` link of the docs names a heading of its page."""
    for target in links(page):
        path, _, anchor = target.partition("#")
        if not anchor or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue
        linked = (page.parent / path).resolve() if path else page
        if linked.suffix != ".md":
            continue
        assert anchor in _anchors(linked), f"{page.name}: {target}: no heading '#{anchor}' in {linked.name}"


def test_readme_figures_come_from_benchmarks():
    """README.md's measured figures are benchmarks/README.md's (benchmarks/readme_figures.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    readme, source = (ROOT / "README.md").read_text(), (ROOT / "benchmarks" / "README.md").read_text()
    assert set(figures.blocks(readme)) == {"demo", "probe", "promotion"}
    assert figures.render(readme, source) == readme, "README.md is stale: run python benchmarks/readme_figures.py"
    assert "0.853 [95% CI" not in readme and "225–248 s" not in readme  # the figures it used to carry
