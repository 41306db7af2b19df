"""``fedvideo config``: every run-config key with its default, allowed values, owner and help,
written from the declarations; also the two files generated from them (the key reference
docs/config-keys.md and pyproject.toml's ``[tool.flwr.app.config]``; tests fail when either is stale).

    fedvideo config                  # every key, grouped by the stage or module that reads it
    fedvideo config fusion-fn krum-malicious
    fedvideo config --write          # regenerate docs/config-keys.md and pyproject's key section
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from fedapp.config.keys import Key, Owner, toml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "config-keys.md"
PYPROJECT = ROOT / "pyproject.toml"
SECTION = "[tool.flwr.app.config]"


def key_owners() -> list[tuple[Owner, list[Key]]]:
    """Each owner with the keys it declares, in the reference's order (owners without keys left out)."""
    from fedapp.task.config import owners

    return [(owner, list(owner.keys)) for owner in owners() if owner.keys]


def when(owner: Owner, key: Key) -> str:
    """When the key acts, in words ("always" when its owner is always in use)."""
    return key.needs or owner.needs or "always"


def reference_markdown() -> str:
    """docs/config-keys.md: one table per owner."""
    lines = [
        "# Run-config keys",
        "",
        "Generated from the keys' declarations by `fedvideo config --write`; do not edit by hand.",
        "Set them in `pyproject.toml` `[tool.flwr.app.config]` or per run with",
        "`fedvideo run --run-config 'key=value ...'` (strings in TOML quotes). A key you set that the",
        "chosen stages do not read is refused at start, naming the stage it belongs to.",
        "",
    ]
    for owner, keys in key_owners():
        lines += [f"## {owner.name}", ""]
        lines += ["| key | default | allowed | acts with | what it does |", "|---|---|---|---|---|"]
        for key in keys:
            allowed = key.describe().replace("|", "\\|")
            acts = when(owner, key).replace("|", "\\|")
            lines.append(f"| `{key.name}` | `{toml(key.default)}` | {allowed} | {acts} | {key.help} |")
        lines.append("")
    return "\n".join(lines)


def pyproject_section() -> str:
    """The ``[tool.flwr.app.config]`` section: every key at its default, grouped by owner."""
    lines = [
        SECTION,
        "# Generated from the keys' declarations by `fedvideo config --write`; docs/config-keys.md says",
        "# what each does. Flower lets --run-config override only keys listed here.",
    ]
    for owner, keys in key_owners():
        lines.append(f"# --- {owner.name}" + (f" ({owner.needs})" if owner.needs else ""))
        lines += [f"{key.name} = {toml(key.default)}" for key in keys]
    return "\n".join(lines) + "\n"


def pyproject_text(current: str) -> str:
    """``current`` pyproject.toml with its key section replaced by :func:`pyproject_section`; the
    section runs to the next table header or the end of the file."""
    start = current.index(SECTION)
    following = re.search(r"^\[", current[start + len(SECTION) :], flags=re.MULTILINE)
    end = start + len(SECTION) + following.start() if following else len(current)
    tail = current[end:]
    return current[:start] + pyproject_section() + ("\n" + tail if tail else "")


def describe_key(owner: Owner, key: Key) -> str:
    allowed = key.describe()
    lines = [f"{key.name} = {toml(key.default)}" + (f"   allowed: {allowed}" if allowed else "")]
    lines.append(f"    {key.help}")
    lines.append(f"    owner: {owner.name}; acts: {when(owner, key)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedvideo config", description=__doc__.split("\n\n")[0])
    parser.add_argument("keys", nargs="*", help="only these keys")
    parser.add_argument("--write", action="store_true", help="regenerate docs/config-keys.md and pyproject's keys")
    args = parser.parse_args(argv)
    if args.write:
        REFERENCE.write_text(reference_markdown())
        PYPROJECT.write_text(pyproject_text(PYPROJECT.read_text()))
        print(f"wrote {REFERENCE.relative_to(ROOT)} and the {SECTION} section of pyproject.toml")
        return 0
    pairs = [(owner, key) for owner, keys in key_owners() for key in keys]
    known = {key.name for _, key in pairs}
    unknown = [k for k in args.keys if k not in known]
    if unknown:
        print(f"unknown key(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    current = None
    for owner, key in pairs:
        if args.keys and key.name not in args.keys:
            continue
        if owner is not current and not args.keys:
            print(f"\n# {owner.name}" + (f" ({owner.needs})" if owner.needs else ""))
            current = owner
        print(describe_key(owner, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
