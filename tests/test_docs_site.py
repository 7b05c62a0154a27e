"""The manual: the docs site builds with `mkdocs build --strict`, the README stays short, links resolve.

The site's link and anchor checks are mkdocs' own (`validation:` in mkdocs.yml); a planted broken
link and a planted broken anchor show that they stay fatal. The Markdown files outside the site
(README, CONTRIBUTING, CHANGELOG) are checked here with the heading anchors mkdocs' table of
contents computes, which match GitHub's for the plain headings the manual uses.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from conftest import PYTHON, ROOT

from mmggem.config.run import RunConfig

TOP_LEVEL_PAGES = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")
HISTORY_PHRASES = ("current main", "earlier main", "not re-measured", "this session", "earlier session")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of CONFIG into SITE, in a real process."""
    return subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def manual_pages() -> list[Path]:
    return [ROOT / name for name in TOP_LEVEL_PAGES] + sorted((ROOT / "docs").glob("*.md"))


def anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as mkdocs' table of contents makes them."""
    text = FENCE.sub("", page.read_text())
    return {slugify(match, "-") for match in re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return [first or second for first, second in LINK.findall(text)]


def test_site_builds_strict(tmp_path: Path) -> None:
    result = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("mmggem.model.pooling") > 0


@pytest.mark.parametrize("planted, named", [("[gone](no-such-page.md)", "no-such-page.md"),
                                            ("[gone](training.md#no-such-section)", "#no-such-section")])
def test_site_build_fails_on_a_broken_link(tmp_path: Path, planted: str, named: str) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "data.md"
    page.write_text(page.read_text() + f"\nSee {planted}.\n")
    result = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert named in result.stderr


def test_readme_is_at_most_400_lines() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", manual_pages(), ids=lambda page: page.name)
def test_no_page_narrates_history(page: Path) -> None:
    text = page.read_text().lower()
    found = [phrase for phrase in HISTORY_PHRASES if phrase in text]
    assert not found, f"{page.name} narrates history ({found}); that belongs in CHANGELOG.md"


@pytest.mark.parametrize("page", [ROOT / name for name in TOP_LEVEL_PAGES], ids=lambda page: page.name)
def test_top_level_links_resolve_inside_the_repository(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.name} has no heading with anchor #{anchor}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_configuration_reference_lists_every_key() -> None:
    def keys(config: type, prefix: str = "") -> set[str]:
        found = set()
        for field in dataclasses.fields(config):
            if dataclasses.is_dataclass(field.default_factory):
                found |= keys(field.default_factory, f"{prefix}{field.name}.")
            else:
                found.add(prefix + field.name)
        return found

    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", (ROOT / "docs" / "configuration.md").read_text(), re.MULTILINE))
    actual = keys(RunConfig)
    assert not actual - documented, f"keys missing from docs/configuration.md: {sorted(actual - documented)}"
    assert not documented - actual, f"docs/configuration.md documents keys that do not exist: {sorted(documented - actual)}"
