"""The documentation site (mkdocs.yml, pages in docs/) builds strictly, lists every page, and
fetches nothing; the README stays one screen that starts with the two commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The README's one command for a folder of videos, a line of its own in a bash block.
OWN_VIDEOS = """.venv/bin/fedvideo run --run-config 'dataset="folders" data-dir="/path/to/my_videos"'"""


class _Loader(yaml.SafeLoader):
    """mkdocs.yml names a Python callable (the slug function) with a !!python tag: read it as None."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)  # a SafeLoader subclass


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_the_site_builds_strictly(tmp_path):
    """Strict: a broken link, a missing anchor (validation.anchors), a nav entry without its file fail it."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard: about 2 s here
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    built = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {"index.html", "getting-started/index.html", "config-keys/index.html", "BENCHMARKS/index.html"} <= built
    # Nothing fetched when the pages are viewed: no web fonts (theme.font: false), no CDN.
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html


def test_the_config_is_strict_and_offline():
    config = mkdocs_config()
    assert config["docs_dir"] == "docs" and config["strict"] is True
    assert config["theme"]["name"] == "material" and config["theme"]["font"] is False
    assert config["validation"]["anchors"] == "warn"  # strict turns the warning into a failure
    assert config["plugins"] == ["search"]  # the built-in search runs in the browser; no plugin that fetches


def test_every_page_is_in_the_nav():
    """mkdocs reports a page left out of the nav only as INFO, so check it here."""
    listed = nav_pages(mkdocs_config()["nav"])
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))


def test_the_readme_is_one_screen_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = re.search(r"^```\w*\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    # The five-minute start on one's own folder of videos, as one command.
    assert OWN_VIDEOS in readme.splitlines()


def test_the_readme_links_every_page():
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", (ROOT / "README.md").read_text()))
    assert linked == {p.name for p in DOCS.glob("*.md")}
