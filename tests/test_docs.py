"""The docs site builds strict, the README stays a short front door, and every page is reachable.

The build test can fail: with a link to a missing page (`[x](nothere.md)`) planted in
docs/serve.md, `mkdocs build --strict` exited 1 naming the link and the test failed with mkdocs'
message; the plant was then removed. A missing anchor (`export.md#nope`) and a link out of docs/
(`../configs/quickstart.yaml`) fail it the same way (mkdocs.yml makes both warnings, and --strict
makes warnings errors), and so does a page left out of the nav; a README link to a missing page
fails the README test. The whole file takes about a second (three with pytest's start-up).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 220
TWO_COMMANDS = ("make demo", "make test")


def nav_pages(nav: list) -> list[str]:
    """The page paths in an mkdocs `nav`, in order.

    >>> nav_pages(["index.md", {"Stages": [{"Data": "data.md"}, "speed.md"]}])
    ['index.md', 'data.md', 'speed.md']
    """
    pages = []
    for entry in nav:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def read_nav() -> list[str]:
    return nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life notice
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    body = [line for line in lines[1:] if line.strip()]
    assert lines[0].startswith("# ") and body[0] == "```", "the first thing after the title must be a code block"
    block = body[1:body.index("```", 1)]
    assert [line.split("#")[0].strip() for line in block] == list(TWO_COMMANDS), block


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = read_nav()
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist: {missing}"
    on_disk = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    unlisted = [page for page in on_disk if page not in nav]
    assert not unlisted, f"pages under docs/ that mkdocs.yml nav does not list: {unlisted}"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"


def test_readme_links_every_page_and_only_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README.read_text())
    broken = [link for link in links if not (ROOT / link).is_file()]
    assert not broken, f"README.md links to docs pages that do not exist: {broken}"
    unlinked = [page for page in read_nav() if f"docs/{page}" not in links]
    assert not unlinked, f"README.md's 'Read on' list does not link: {unlinked}"
