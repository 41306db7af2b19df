"""history.csv, TensorBoard scalars, the final report and the plotting CLI, on a hand-made history."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from fedapp.server.report import HISTORY_COLUMNS, TensorBoardLog, write_final_report, write_history_csv
from fedapp.server.results import RunResults
from fedapp.server.summary import history_figures, summary_lines, summary_text
from fedapp.tools import plots
from tests.conftest import fedvideo_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["walk", "run", "jump"]


def _client(pid: int | None, node: int, **metrics: float) -> dict:
    out = {"node-id": node, **metrics}
    if pid is not None:
        out["partition-id"] = pid
    return out


def fake_rounds() -> list[dict]:
    """Round 0 (central only), then three rounds of 3 clients with gaps: best accuracy at round 1."""
    return [
        {"round": 0, "central": {"loss": 2.0, "video-accuracy": 0.25, "clip-accuracy": 0.2}, "wall-time-s": 1.5},
        {
            "round": 1,
            "train": {"train-loss": 1.8, "train-accuracy": 0.4, "clips-per-s": 12.0, "num-examples": 30},
            "train-clients": {
                "clients": [
                    _client(p, 100 + p, **{"train-loss": 1.7 + p / 10, "train-accuracy": 0.3 + p / 10})
                    for p in range(3)
                ],
                "rejected": [],
                "failed": [],
                "skipped": "",
            },
            "evaluate": {"loss": 1.6, "video-accuracy": 0.45, "clip-accuracy": 0.4},
            "evaluate-clients": {
                "clients": [_client(p, 100 + p, **{"video-accuracy": 0.4 + p / 20, "loss": 1.6}) for p in range(3)],
                "rejected": [],
                "failed": [],
                "skipped": "",
            },
            "central": {"loss": 1.5, "video-accuracy": 0.6, "clip-accuracy": 0.5},
            "fusion": {},
            "round-time-s": 10.25,
            "wall-time-s": 12.0,
            "bytes-down": 3000,
            "bytes-up": 2900,
        },
        {  # central eval missing, one client rejected and one failed, no client evaluation, no bytes-up
            "round": 2,
            "train": {"train-loss": 1.4, "train-accuracy": 0.5},
            "train-clients": {
                "clients": [_client(0, 100, **{"train-loss": 1.3, "train-accuracy": 0.55})],
                "rejected": [{"node-id": 101, "reason": "NaN weights"}],
                "failed": [{"node-id": 102, "reason": "timeout"}],
                "skipped": "",
            },
            "evaluate": {},
            "evaluate-clients": None,
            "central": {},
            "round-time-s": 9.0,
            "wall-time-s": 21.0,
            "bytes-down": 3000,
        },
        {
            "round": 3,
            "train": {"train-loss": 1.1, "train-accuracy": 0.6},
            "train-clients": {
                "clients": [
                    _client(p, 100 + p, **{"train-loss": 1.0, "train-accuracy": 0.6 + p / 20}) for p in range(3)
                ],
                "rejected": [],
                "failed": [],
                "skipped": "",
            },
            "evaluate": {"loss": 1.2, "video-accuracy": 0.5},
            "evaluate-clients": {
                "clients": [_client(0, 100, **{"video-accuracy": 0.5}), _client(None, 77, **{"video-accuracy": 0.45})],
                "rejected": [],
                "failed": [],
                "skipped": "",
            },
            "central": {"loss": 1.25, "video-accuracy": 0.55, "clip-accuracy": 0.52},
            "round-time-s": 8.5,
            "wall-time-s": 30.0,
            "bytes-down": 3000,
            "bytes-up": 2800,
        },
    ]


def make_run(path: Path, rounds: list[dict], strategy: str | None = None) -> Path:
    results = RunResults(path)
    for record in rounds:
        results.append_round(record)
    if strategy:
        results.write_config({"strategy": strategy})
    return path


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


def test_history_csv_has_one_row_per_round_and_blank_cells_for_missing_values(tmp_path):
    path = write_history_csv(tmp_path, fake_rounds())
    assert path == tmp_path / "history.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == HISTORY_COLUMNS
        rows = list(reader)
    assert [row["round"] for row in rows] == ["0", "1", "2", "3"]
    assert HISTORY_COLUMNS[:3] == ("round", "central-loss", "central-video-accuracy")
    r0, r1, r2, r3 = rows
    assert float(r0["central-video-accuracy"]) == 0.25 and float(r0["wall-time-s"]) == 1.5
    assert r0["train-loss"] == r0["clients-accepted"] == r0["bytes-down"] == r0["round-time-s"] == ""
    assert float(r1["central-clip-accuracy"]) == 0.5 and float(r1["train-accuracy"]) == 0.4
    assert float(r1["evaluate-video-accuracy"]) == 0.45 and float(r1["evaluate-loss"]) == 1.6
    assert (r1["clients-accepted"], r1["clients-rejected"], r1["clients-failed"]) == ("3", "0", "0")
    assert (r1["bytes-down"], r1["bytes-up"], float(r1["round-time-s"])) == ("3000", "2900", 10.25)
    assert r2["central-loss"] == r2["central-video-accuracy"] == r2["evaluate-loss"] == r2["bytes-up"] == ""
    assert (r2["clients-accepted"], r2["clients-rejected"], r2["clients-failed"]) == ("1", "1", "1")
    assert float(r3["central-loss"]) == 1.25 and float(r3["wall-time-s"]) == 30.0
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_tensorboard_log_writes_expected_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    log = TensorBoardLog(log_dir)
    rounds = fake_rounds()
    log.log_round(rounds[0])
    live = EventAccumulator(str(log_dir))
    live.Reload()  # flushed per round: round 0 is readable while the run goes on
    assert "central/video-accuracy" in live.Tags()["scalars"]
    for record in rounds[1:]:
        log.log_round(record)
    log.close()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "central/loss",
        "central/video-accuracy",
        "central/clip-accuracy",
        "train/loss",
        "train/accuracy",
        "evaluate/loss",
        "evaluate/video-accuracy",
        "comm/bytes-down",
        "comm/bytes-up",
        "time/round-s",
        "clients/0/train-accuracy",
        "clients/2/train-loss",
        "clients/1/evaluate-video-accuracy",
        "clients/node-77/evaluate-video-accuracy",
    }
    assert expected <= tags, expected - tags

    def scalars(tag):
        return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)]

    assert scalars("central/video-accuracy") == [(0, 0.25), (1, 0.6), (3, 0.55)]  # round 2 had none
    assert scalars("train/loss") == [(1, 1.8), (2, 1.4), (3, 1.1)]
    assert scalars("clients/0/train-accuracy") == [(1, 0.3), (2, 0.55), (3, 0.6)]
    assert scalars("clients/2/train-accuracy") == [(1, 0.5), (3, 0.7)]
    assert scalars("clients/node-77/evaluate-video-accuracy") == [(3, 0.45)]
    assert scalars("comm/bytes-up") == [(1, 2900), (3, 2800)]
    assert scalars("time/round-s") == [(1, 10.25), (2, 9.0), (3, 8.5)]


def test_final_report_writes_csv_and_figures(tmp_path):
    rounds = fake_rounds()
    confusion = [[5, 1, 0], [2, 3, 1], [0, 0, 6]]
    written = write_final_report(tmp_path, rounds, CLASSES, confusion)
    names = {p.name for p in written}
    assert {"history.csv", "accuracy_loss.png", "client_accuracy.png", "confusion_matrix.png"} <= names
    assert all(p.exists() for p in written)
    for name in ("accuracy_loss.png", "client_accuracy.png", "confusion_matrix.png"):
        assert_png(tmp_path / name)
    assert json.loads((tmp_path / "confusion.json").read_text())["matrix"] == confusion
    assert not (tmp_path / "summary.txt").exists()  # written with summary.json, from its dict

    bare = tmp_path / "no-confusion"
    written = write_final_report(bare, rounds, CLASSES, None)
    assert not (bare / "confusion_matrix.png").exists()
    assert {p.name for p in written} == {"history.csv", "accuracy_loss.png", "client_accuracy.png"}


def test_summary_figures_and_text_come_from_the_history():
    figures = history_figures(fake_rounds())
    assert figures["rounds-completed"] == 3 and figures["rounds-without-update"] == 0
    # Best over the trained rounds, as the best checkpoint is chosen; the initial model beside it.
    assert (figures["best-round"], figures["best-video-accuracy"], figures["initial-video-accuracy"]) == (1, 0.6, 0.25)
    assert figures["final-central"]["video-accuracy"] == 0.55
    assert figures["clients-per-round"] == {"mean": 7 / 3, "min": 1, "max": 3}
    assert (figures["train-rejected"], figures["train-failed"], figures["evaluate-failed"]) == (1, 1, 0)
    summary = {"status": "completed", **figures, "stop-reason": "target accuracy reached", "strategy": "fedavg"}
    text = summary_text(summary)
    assert "best video-acc 0.6000 at round 1 (initial model 0.2500)" in text
    assert "final central: video-acc 0.5500 clip-acc 0.5200 loss 1.2500" in text
    assert "stop reason: target accuracy reached" in text
    assert "train replies rejected: 1, clients failed: 1" in text
    assert "rounds: 3 completed" in text
    assert "clients per round (train, accepted): mean 2.3, min 1, max 3" in text
    # Sites from the last round with client evaluation (round 3: two sites, one without partition id).
    sites = figures["final-sites"]
    assert sites["round"] == 3 and [s["video-accuracy"] for s in sites["sites"]] == [0.5, 0.45]
    assert sites["mean"] == pytest.approx(0.475) and (sites["worst"], sites["worst-site"]) == (0.45, "node 77")
    assert "sites video-acc mean 0.4750, worst 0.4500 (node 77) over 2" in text
    assert "(round 3: partition 0 0.5000, node 77 0.4500)" in text
    assert "worst 0.4500 (node 77)" in " ".join(summary_lines(summary))


def test_summary_copes_with_central_eval_off_and_empty_history():
    rounds = [{k: v for k, v in r.items() if k != "central"} for r in fake_rounds()]
    text = summary_text({"status": "completed", **history_figures(rounds)})
    assert "best video-acc 0.5000 at round 3" in text and "final client-evaluate: video-acc 0.5000" in text
    assert "final central" not in text and "stop reason" not in text
    assert "not measured" in summary_text({"status": "completed", **history_figures([])})
    assert history_figures([])["final-sites"] is None


def test_site_figures_skip_rounds_without_client_evaluation():
    rounds = fake_rounds()
    rounds[-1]["evaluate-clients"] = None  # the last round did not evaluate on the clients
    sites = history_figures(rounds)["final-sites"]
    assert sites["round"] == 1 and sites["worst"] == 0.4 and sites["worst-site"] == "partition 0"
    assert sites["mean"] == pytest.approx((0.4 + 0.45 + 0.5) / 3)


def test_confusion_plot_rejects_a_matrix_that_does_not_match_the_classes(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plots.plot_confusion([[1, 2], [3, 4]], CLASSES, tmp_path / "c.png")


def test_cli_replots_one_run_in_place_or_into_out(tmp_path):
    run = make_run(tmp_path / "run", fake_rounds())
    (run / "confusion.json").write_text(json.dumps({"classes": CLASSES, "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}))
    assert plots.main([str(run)]) == 0
    for name in ("accuracy_loss.png", "client_accuracy.png", "confusion_matrix.png"):
        assert_png(run / name)
    out = tmp_path / "figures"
    assert plots.main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_loss.png", "client_accuracy.png", "confusion_matrix.png"]


def test_cli_compares_runs(tmp_path, capsys):
    a = make_run(tmp_path / "a", fake_rounds(), strategy="fedavg")
    worse = [{**r, "central": {"loss": 2.0, "video-accuracy": 0.3}} for r in fake_rounds()]
    b = make_run(tmp_path / "b", worse, strategy="fedprox")
    out = tmp_path / "cmp" / "compare.png"
    assert plots.main([str(a), str(b), "--out", str(out), "--labels", "FedAvg", "FedProx"]) == 0
    assert_png(out)
    assert str(out) in capsys.readouterr().out
    assert plots.run_label(b) == "b (fedprox)"
    assert plots.main([str(a), str(b), "--out", str(tmp_path / "loss.png"), "--metric", "loss"]) == 0
    assert_png(tmp_path / "loss.png")
    assert plots.main([str(a), str(b), "--labels", "only-one"]) == 2


def test_cli_exits_2_on_a_folder_without_rounds(tmp_path):
    run = make_run(tmp_path / "run", fake_rounds())
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [fedvideo_command(), "plot", str(run), str(empty)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no rounds.jsonl" in proc.stderr and str(empty) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.png"))  # every input is checked before anything is drawn


@pytest.mark.parametrize("rounds", [[1], [1, 2], [0, 1, 2, 3], list(range(0, 41))])
def test_round_axes_tick_whole_rounds_only(rounds):
    """A 1- or 2-round run's per-client figure had ticks at 0.96, 0.98, ... (cosmetic, but misleading)."""
    fig, (ax,) = plots._new_figure()
    ax.plot(rounds, [0.5] * len(rounds), "-o")
    plots._round_axis(ax, "accuracy")
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert set(rounds) <= set(ticks) if len(rounds) <= 12 else len(ticks) >= 3
