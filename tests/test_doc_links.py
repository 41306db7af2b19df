"""Every relative link in the README and docs/ points at a file that exists, and every in-page
anchor of the README at one of its headings (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken, checked = [], 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            if path and not (page.parent / path).exists():
                broken.append(f"{page.name}: {target}")
            elif not path and anchor and anchor not in anchors:
                broken.append(f"{page.name}: #{anchor}")
    assert broken == [] and checked >= 20  # the pattern finds the links there are
