"""The app bundle (FAB) `flwr run` sends to every node holds the app and nothing else, wherever
deployment state, results or nodes' unpacked apps lie under the project folder."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from tests.conftest import PROJECT_DIR

PACKAGES = ("fedapp", "strategies", "datasets")


def fab_files(project: Path) -> tuple[list[str], int]:
    """What Flower's own builder (the one `flwr run` calls) puts in the FAB, and its size."""
    fab = build_fab_from_disk(project)
    return sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()), len(fab)


def litter(project: Path, k: int) -> None:
    """What a deployment under ``--dir deploy`` and a run under ``results/`` leave in the project."""
    deploy = project / "deploy"
    (deploy / "flwr_home").mkdir(parents=True, exist_ok=True)
    (deploy / "state.json").write_text('{"nodes": []}\n' * k)
    (deploy / "flwr_home" / "config.toml").write_text('[superlink]\ndefault = "x"\n')
    app = deploy / "nodes" / "node-0" / "apps" / f"fedvideo.fedvideo.{k}"
    shutil.copytree(project / "fedapp", app / "fedapp", dirs_exist_ok=True)
    (app / "pyproject.toml").write_text((project / "pyproject.toml").read_text())
    (project / "results" / f"run{k}").mkdir(parents=True, exist_ok=True)
    (project / "results" / f"run{k}" / "summary.json").write_text("{}")
    (project / "bench" / f"notes{k}.md").write_text("# a note")


def test_fab_holds_only_the_app_however_much_lies_around(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT_DIR / "pyproject.toml", project)
    shutil.copy(PROJECT_DIR / "README.md", project)
    for name in (*PACKAGES, "bench", "docs", "tests"):
        shutil.copytree(PROJECT_DIR / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    expected = sorted(
        [".info/CONTENT", "pyproject.toml"]
        + [str(p.relative_to(project)) for name in PACKAGES for p in (project / name).rglob("*.py")]
        + [str(p.relative_to(project)) for p in (project / "docs" / "examples").glob("*.py")]  # the plug-in examples
    )
    clean, clean_size = fab_files(project)
    assert clean == expected
    litter(project, 1)  # after one run
    first, first_size = fab_files(project)
    litter(project, 2)  # and another
    second, second_size = fab_files(project)
    assert first == second == clean
    assert first_size == second_size == clean_size
