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
