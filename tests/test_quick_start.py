"""The README's five minutes on your own videos, run as written: its one command on a small folder
of generated videos (the path put in, a second --run-config making it small), then its predict
command on the results folder the run printed. A real launch: marked e2e."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from datasets.video_io import write_video
from tests.conftest import PROJECT_DIR, fedvideo_command

pytestmark = pytest.mark.e2e

SMALL = 'num-server-rounds=2 clip-len=8 resize="32x32" crop-size=32 eval-clips=1 torch-threads=1 tensorboard=false'


def readme_commands() -> list[str]:
    """The lines of the README's bash blocks in the own-videos section."""
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme.split("## Five minutes on your own videos", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def as_run(line: str) -> list[str]:
    """A README line as argv, with the venv's fedvideo (the README's `.venv/bin/fedvideo` from the project root)."""
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/fedvideo"
    return [fedvideo_command(), *argv[1:]]


def test_the_readme_quick_start_on_a_folder_of_videos(tmp_path: Path) -> None:
    (train, predict) = readme_commands()
    assert "/path/to/my_videos" in train and "results/<run>" in predict
    rng = np.random.default_rng(0)
    for name in ("cooking", "juggling", "rowing"):
        for k in range(6):  # file names without _gNN_: each file is its own group
            frames = rng.integers(0, 255, size=(16, 48, 64, 3), dtype=np.uint8)
            write_video(tmp_path / "my_videos" / name / f"clip{k:03d}.mp4", frames, fps=25)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    command = as_run(train.replace("/path/to/my_videos", str(tmp_path / "my_videos")))
    command += ["--run-config", f'{SMALL} results-dir="{tmp_path / "results"}"']
    run = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"^OK: 2 rounds; central test video accuracy \d\.\d{3}", run.stdout, flags=re.MULTILINE)
    (printed,) = re.findall(r"^results: (.+)$", run.stdout, flags=re.MULTILINE)
    results = Path(printed)
    assert results.is_dir() and (results / "model.safetensors").is_file() and (results / "summary.txt").is_file()
    split = (results / "split.csv").read_text().splitlines()
    assert split[0] == "path,class,group,split,site" and len(split) == 1 + 18

    videos = sorted(str(p) for p in (tmp_path / "my_videos" / "rowing").glob("*.mp4"))[:2]
    line = predict.replace("results/<run>", printed).replace("new1.mp4 new2.avi", " ".join(videos))
    predicted = subprocess.run(as_run(line), cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = predicted.stdout.strip().splitlines()
    assert [row.split(":")[0] for row in rows] == videos
    assert all(len(re.findall(r"(cooking|juggling|rowing) \d\.\d{3}", row)) == 3 for row in rows)  # --top-k 3
