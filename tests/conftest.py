"""Shared fixtures. Every test runs with a project-local FLWR_HOME so ~/.flwr is never touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
os.environ["FLWR_HOME"] = str(PROJECT_DIR / ".flwr_home" / "tests")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def fedvideo_command() -> str:
    """The installed ``fedvideo`` console script (``[project.scripts]``): the one beside this
    interpreter (the venv's), else the one on PATH. Tests of the user path run it as a subprocess."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "fedvideo"
    found = str(beside) if beside.is_file() else shutil.which("fedvideo")
    if found is None:  # a failure, not a skip: the command is what users run
        pytest.fail("the fedvideo command is not installed: run `make setup` (pip install -e .)")
    return found


# A small synthetic dataset: enough videos for 3 partitions, small enough to write in a second.
SMALL_SYNTHETIC = {
    "synthetic-classes": 4,
    "synthetic-videos-per-class": 10,
    "synthetic-frames": 12,
    "synthetic-size": 32,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_run_config(cache_dir: Path) -> dict:
    """A run config (TOML key names) for fast tests on the small synthetic dataset."""
    return small_config(cache_dir)


def small_config(cache_dir: str | Path) -> dict:
    """What :func:`small_run_config` gives, for code that runs outside a fixture."""
    return {
        **SMALL_SYNTHETIC,
        "cache-dir": str(cache_dir),
        "clip-len": 8,
        "resize": "32x32",
        "crop-size": 32,
        "eval-clips": 2,
        "batch-size": 4,
        "local-epochs": 1,
        "torch-threads": 1,
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first: the longest start while the test workers are fresh, and the suite
    ends on short tests that share the cores evenly (a long one last leaves a core idle)."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)
