"""The ``fedvideo`` command: one entry point for everything a user does with the app.

Each subcommand hands the rest of the command line to its module's own ``main(argv)``, so every
module keeps its own parser (``python -m <module>`` still works, and is what internal spawns use)
and fedvideo exits with the module's exit status.

    fedvideo run [--run-config "k=v ..."]      # a federated run (what `make run` calls)
    fedvideo <command> --help                  # a command's options
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand: the module whose ``main(argv) -> int`` it runs, and its one-line help."""

    module: str
    help: str


# Order is the order of `fedvideo --help`: a run first, deployment next, then the tools on its results.
COMMANDS: dict[str, Command] = {
    "run": Command("fedapp.ops.launch", "a federated run in Flower's simulation engine (`make run`)"),
    "deploy": Command("fedapp.ops.deploy", "deploy on real processes: up, run, stop-node, start-node, down"),
    "config": Command("fedapp.config.reference", "every run-config key: default, allowed values, the stage reading it"),
    "certs": Command("fedapp.ops.certs", "certificates and SuperNode keys for a TLS deployment"),
    "predict": Command("fedapp.tools.predict", "classify videos with a trained checkpoint"),
    "retrieve": Command("fedapp.tools.retrieve", "find the videos of a folder most similar to a query video"),
    "export": Command("fedapp.tools.export", "export a checkpoint as TorchScript (float and int8)"),
    "plot": Command("fedapp.tools.plots", "re-plot a run's figures, or compare runs"),
    "weights": Command("fedapp.tools.weights", "pretrained torchvision weights: list, locate, --download once"),
    "synthetic": Command("datasets.synthetic", "write the synthetic motion dataset (UCF-101 layout)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedvideo")
    except PackageNotFoundError:  # run from a checkout that was never installed (python -m fedapp.cli)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it only picks the subcommand (its help lists them all)."""
    width = max(map(len, COMMANDS))
    # The list is written here rather than by argparse subparsers, whose help layout wraps long names
    # onto a line of their own; and the rest of the command line is never parsed here, it is the module's.
    listing = "\n".join(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fedvideo",
        usage="%(prog)s [-h] [--version] <command> [ARGS ...]",
        description=f"Federated video classification with Flower.\n\ncommands:\n{listing}",
        epilog="Run 'fedvideo <command> --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", metavar="<command>", choices=COMMANDS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``fedvideo <command> ARGS...`` to the command's module; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return 2
    # Only the first word is ours: the rest (including --help) goes untouched to the module. argparse
    # exits 0 on --help/--version here, and 2 with the list of choices on an unknown command.
    command = COMMANDS[parser.parse_args(args[:1]).command]
    # Imported only now: `fedvideo --help` need not load torch or Flower.
    module = importlib.import_module(command.module)
    return module.main(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
