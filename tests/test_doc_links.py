"""Every relative link in the README and docs/ points at a file that exists, and every anchor at a
heading of the page it names (in-page or on another page). Slugs are GitHub's, which the site's
mkdocs.yml reproduces (pymdownx.slugs.slugify, lower case), so one anchor works in both."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a `# comment` there is no heading, `](x)` no link)."""
    return FENCE.sub("", page.read_text())


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page), flags=re.MULTILINE)}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_slugs_are_githubs_and_the_sites():
    assert slug("Attack × rule over seeds") == "attack--rule-over-seeds"
    assert slug("Plain `flwr run .`") == "plain-flwr-run-"
    assert slug("Security: what is and is not protected") == "security-what-is-and-is-not-protected"


def test_relative_links_and_anchors_resolve():
    broken, checked, across = [], 0, 0
    for page in pages():
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md":
                across += bool(path)
                if anchor not in anchors(linked):
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
    assert checked >= 100 and across >= 20  # the pattern finds the links there are


def test_the_readme_links_into_docs_by_file():
    """On GitHub the README's links open docs/<page>.md; none points at a heading of its own."""
    targets = [t for t in LINK.findall(prose(ROOT / "README.md")) if not re.match(r"[a-z]+:", t)]
    assert targets and all(t.startswith("docs/") and ".md" in t for t in targets), targets
