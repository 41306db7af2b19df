"""The ``fedvideo`` command, run as users run it: the installed console script, in a subprocess."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp import cli
from tests.conftest import fedvideo_command

SUBCOMMANDS = ["run", "deploy", "config", "certs", "predict", "retrieve", "export", "plot", "weights", "synthetic"]


def fedvideo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # One torch thread: the tool subcommands import torch, and the machine has 2 cores.
    return subprocess.run(
        [fedvideo_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_help_lists_every_subcommand_with_a_description() -> None:
    assert list(cli.COMMANDS) == SUBCOMMANDS
    proc = fedvideo("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fedvideo ")
    lines = proc.stdout.splitlines()
    for name in SUBCOMMANDS:
        # One line each: the name, then its one-line description.
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert line.split(None, 1)[1] == cli.COMMANDS[name].help


def test_no_arguments_prints_the_help_and_exits_2() -> None:
    proc = fedvideo()
    assert proc.returncode == 2
    assert "usage: fedvideo" in proc.stderr and all(name in proc.stderr for name in SUBCOMMANDS)


def test_an_unknown_subcommand_exits_2_naming_the_choices() -> None:
    proc = fedvideo("trian", "--help")  # --help after a typo must not hide the typo
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr
    assert all(f"'{name}'" in proc.stderr for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_answers_help_under_its_own_name(name: str) -> None:
    proc = fedvideo(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: fedvideo {name} "), proc.stdout[:200]
    assert "python -m" not in proc.stdout  # the module's docstring shows the command, not the module


# What makes `--help` slow: seconds to import on a busy machine (torch alone ~2-5 s here). The check is
# on what gets imported, not on a time, so it holds on any machine and load.
HEAVY_MODULES = ("torch", "torchvision", "flwr", "av", "ray", "matplotlib")


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_loads_no_heavy_library(name: str) -> None:
    probe = (
        "import sys\n"
        "from fedapp.cli import main\n"
        "try:\n"
        f"    main([{name!r}, '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "[]", f"fedvideo {name} --help imports {proc.stderr}"


def parsers_of(name: str, monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    """The argparse parser a subcommand builds (and its sub-parsers), caught at its parse_args call."""
    caught: list[argparse.ArgumentParser] = []

    def catch(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        caught.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(SystemExit):
        importlib.import_module(cli.COMMANDS[name].module).main([])
    found, todo = [], list(caught)
    while todo:
        parser = todo.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_option_and_argument_has_help_text(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = []
    for parser in parsers_of(name, monkeypatch):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                # each sub-command's line in the listing
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
            elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_synthetic_writes_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "motion"
    proc = fedvideo(
        "synthetic", "--out", str(out), "--classes", "2", "--videos-per-class", "2", "--frames", "8", "--size", "16"
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "UCF-101").rglob("*.avi"))) == 4
    assert (out / "ucfTrainTestlist" / "classInd.txt").is_file()
    assert f"{out}: generated" in proc.stdout


def test_certs_writes_certificates_and_a_refusal_exits_1(tmp_path: Path) -> None:
    proc = fedvideo("certs", str(tmp_path), "--nodes", "1")
    assert proc.returncode == 0, proc.stderr
    for name in ("ca.crt", "ca.key", "server.pem", "server.key", "node-0", "node-0.pub"):
        assert (tmp_path / name).is_file(), name
    before = (tmp_path / "ca.key").read_bytes()
    again = fedvideo("certs", str(tmp_path), "--nodes", "1")  # nothing is overwritten without --force
    assert again.returncode == 1, again.stderr
    assert "would overwrite" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "ca.key").read_bytes() == before


def test_a_subcommand_usage_error_exits_2_under_its_own_name() -> None:
    proc = fedvideo("certs")
    assert proc.returncode == 2
    assert "usage: fedvideo certs" in proc.stderr and "fedvideo certs: error:" in proc.stderr


def test_a_failed_run_exits_non_zero(tmp_path: Path) -> None:
    # Refused before a SuperLink starts (nothing to resume), so this takes seconds, not a run.
    proc = fedvideo("run", "--run-config", f'results-dir="{tmp_path}" resume="latest"', cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED:" in proc.stderr and "no checkpoint" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_main_in_process_returns_the_module_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", str(tmp_path)]) == 0
    assert cli.main(["certs", str(tmp_path)]) == 1
    assert "would overwrite" in capsys.readouterr().err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0


def test_run_help_points_to_the_keys_and_its_examples_pass_the_checks():
    """`fedvideo run --help` says where the keys are; each command it shows is a valid config."""
    import re

    from fedapp.ops.launch import build_parser
    from fedapp.task.config import parse_config, parse_overrides

    text = build_parser().format_help()
    assert "`fedvideo config` lists every key" in text and "docs/config-keys.md" in text
    examples = re.findall(r"--run-config '([^']*)'", text)
    assert len(examples) == 2 and any('dataset="folders"' in e for e in examples)
    for example in examples:
        parse_config(parse_overrides([example]), check_paths=False)
