"""The launcher's verdict on a machine deliberately oversubscribed: CPU-burning processes (two per
core, at least 4: load 6-8 on 2 cores with the launch's own processes, as when CI failed) run
through two real `fedvideo run` launches at once, and the completed run must be judged completed
and the run made to fail judged failed: 0 false verdicts. The completed run has a client with only corrupt
videos, which must fail alone while the others train. Before the verdict waited for
Flower's final status, a completed run on a machine at load 6-8 was reported `FAILED: Flower
reports status 'unknown'`. Slow (a few minutes): marked e2e. The fake-`flwr` unit tests of the
same rule: tests/test_verdict.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.test_e2e import launch

pytestmark = pytest.mark.e2e

# Each burner stops by itself after this long, whatever happens to the test (which stops them first).
BURN_LIMIT_S = 1200
BURN = f"import time\nend = time.monotonic() + {BURN_LIMIT_S}\nwhile time.monotonic() < end:\n    pass\n"


def burner_count() -> int:
    return max(4, 2 * len(os.sched_getaffinity(0)))


@pytest.fixture
def oversubscribed() -> Iterator[list[psutil.Process]]:
    """CPU burners, two per core available to this process; stopped (SIGKILL) when the test ends."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True) for _ in range(burner_count())]
    burners = [psutil.Process(p.pid) for p in procs]
    try:
        yield burners
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def write_manifest(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def site_c_corrupt_manifest(small_run_config: dict, folder) -> str:
    """The small synthetic videos in three groups, partitioned by group; every file of site-c is
    undecodable: that client fails alone, the other two train, and the run completes."""
    from fedapp.task.config import parse_config
    from fedapp.task.data import load_video_index

    index = load_video_index(parse_config(small_run_config))
    rows = []
    for split, samples in (("train", index.train), ("test", index.test)):
        for i, sample in enumerate(samples):
            group = ["site-a", "site-b", "site-c"][i % 3]
            path = folder / "videos" / split / sample.path.split("/")[-1]
            path.parent.mkdir(parents=True, exist_ok=True)
            if group == "site-c":
                path.write_bytes(b"\x00" * 100)  # corrupt
            else:
                shutil.copy(sample.path, path)
            rows.append({"path": str(path), "label": index.classes[sample.label], "split": split, "group": group})
    return write_manifest(folder / "manifest.csv", rows)


def all_corrupt_manifest(folder) -> str:
    """Every video undecodable: every client fails, no round updates the model, and the app fails
    the run (NoUpdateError) after Flower started it."""
    rows = []
    for i in range(16):
        path = folder / "videos" / f"v{i}.avi"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00" * 100)
        rows.append({"path": str(path), "label": f"c{i % 2}", "split": "train" if i < 12 else "test"})
    return write_manifest(folder / "manifest.csv", rows)


def test_verdicts_hold_on_an_oversubscribed_machine(oversubscribed, small_run_config, tmp_path):
    own = {k: v for k, v in small_run_config.items() if not k.startswith("synthetic-")}  # synthetic-only keys
    for name in ("completed", "failed"):
        (tmp_path / name).mkdir()
    launches = {  # name: (run config, federation size, the verdict it must get)
        "completed": (
            {
                **own,
                "dataset": "manifest",
                "data-dir": site_c_corrupt_manifest(small_run_config, tmp_path / "completed"),
                "partitioning": "groups",
                "num-server-rounds": 1,
            },
            3,
            True,
        ),
        "failed": (
            {
                **own,
                "dataset": "manifest",
                "data-dir": all_corrupt_manifest(tmp_path / "failed"),
                "num-server-rounds": 1,
            },
            2,
            False,
        ),
    }
    # Both at once: the two launches load the machine too, and each must read its own SuperLink.
    with ThreadPoolExecutor(len(launches)) as pool:
        futures = {
            name: pool.submit(launch, config, tmp_path / name, f"num-supernodes={nodes} client-resources-num-cpus=1")
            for name, (config, nodes, _) in launches.items()
        }
        answers = {name: future.result() for name, future in futures.items()}
    # Under load as meant: the burners ran throughout both launches.
    assert all(b.is_running() and b.status() != psutil.STATUS_ZOMBIE for b in oversubscribed)
    verdicts = {}
    for name, (config, _, completes) in launches.items():
        rc, output, summary = answers[name]
        run_dir = tmp_path / name / "results" / "run"
        # The run's own truth, from the app's files: did it finish its rounds?
        really_completed = (
            summary.get("status") == "completed" and summary.get("rounds-completed") == (config["num-server-rounds"])
        )
        assert really_completed == completes, (name, summary, output[-3000:])
        verdicts[name] = rc == 0
        if completes:
            assert rc == 0 and "\nOK: " in output, (name, output[-3000:])
        else:
            assert rc == 1 and "FAILED: run failed: NoUpdateError" in output, (name, output[-3000:])
        if name == "completed":  # the client with only corrupt videos failed alone, the others trained
            record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[1])
            assert len(record["train-clients"]["clients"]) == 2
            assert len(record["train-clients"]["failed"]) == 1
            # Stored as one readable line (Ray's colour-coded traceback stays in the SuperLink's log).
            reason = record["train-clients"]["failed"][0]["reason"]
            assert (
                reason.startswith("error code 2: NoUsableVideoError: partition ")
                and "no usable training video" in reason
            )
            assert "\n" not in reason and "\x1b" not in reason and len(reason) <= 300
        # Every answer Flower's CLI gave is in the launch's log folder, about this launch's run.
        (ls_log,) = run_dir.glob("logs/launch-*/flwr-ls.log")
        assert f"--run-id {summary['run-id']} --format json" in ls_log.read_text()
    assert verdicts == {name: completes for name, (_, _, completes) in launches.items()}  # 0 false verdicts
    burned = sum(b.cpu_times().user + b.cpu_times().system for b in oversubscribed)
    assert burned > 60, f"the burners used only {burned:.0f} CPU-seconds: the machine was not loaded"
    print(json.dumps({"burners": len(oversubscribed), "burner-cpu-s": round(burned), "verdicts": verdicts}))
