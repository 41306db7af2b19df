"""What a run prints: the launcher's console filter, the round line and the final summary lines."""

from __future__ import annotations

import sys
from pathlib import Path

from fedapp.ops.console import ConsoleFilter, wants_colour, without_colour
from fedapp.ops.flwr_run import stream_run
from fedapp.server.rounds import round_line
from fedapp.server.summary import summary_lines
from fedapp.task.config import parse_config

INFO, WARNING, ACTOR = (
    "\x1b[92mINFO \x1b[0m:      ",
    "\x1b[93mWARNING \x1b[0m:   ",
    "\x1b[36m(ClientAppActor pid=1)\x1b[0m ",
)
RAY = "/work/main/.venv/lib/python3.11/site-packages/ray/_private/worker.py:2051"

# As `flwr run --stream` printed them in a real `fedvideo run` (flwr 1.42, Ray 2.x), noise marked.
STREAM: list[tuple[str, bool]] = [
    ("Successfully started run 44601485691195623", False),
    (f"{INFO}Starting Flower Simulation", False),
    (f"{WARNING}Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.", True),
    (f"{INFO}Federation `@none/default` (3 simulated SuperNodes)", False),
    (f"{INFO}To change federation size, use the following command:", True),
    (f"{INFO}\tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>", True),
    (f"{INFO}[ROUND 1/1]", False),
    (f"{RAY}: FutureWarning: Tip: In future versions of Ray, Ray will no longer override accelerator ...", True),
    ("  warnings.warn(", True),
    (f"{ACTOR}{INFO}[partition 0 round 1] epoch 1/1 step 1/1 loss 1.9963", False),
    (f"{ACTOR}{RAY}: DeprecationWarning: some Ray deprecation", True),
    (f"{ACTOR}  warnings.warn(", True),
    (f"{INFO}partition summary (videos per class):", False),
    ("client  MoveRight  MoveLeft  videos", False),
    ("     0          0         1       6", False),  # indented like a warning's source line: kept
    (" total          2         2      16", False),
    ("/work/main/fedapp/task/models.py:12: FutureWarning: our own code's warning", False),  # not Ray's or Flower's
    ("  warnings.warn(", False),
    (f"{INFO}round 1/1 · fedavg · train loss 2.091 acc 0.125 · 3 clients (0 rejected, 0 failed) · 6.9 s", False),
    (f"{ACTOR}{WARNING}Manually terminating ClientAppActor", True),
    (f"{INFO}", True),
]


def test_the_console_filter_drops_only_the_listed_noise():
    console = ConsoleFilter()
    shown = [line for line, _ in STREAM if console.shows(line + "\n")]
    assert shown == [line for line, noise in STREAM if not noise]


def test_stream_run_filters_the_console_and_keeps_every_line_in_its_log(tmp_path: Path, capsys):
    source = tmp_path / "lines.txt"
    source.write_text("".join(line + "\n" for line, _ in STREAM))
    log = tmp_path / "flwr-run.log"
    cmd = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(source)!r}).read())"]
    run_id = stream_run(cmd, {"PATH": "/usr/bin:/bin"}, log, timeout=60)
    assert run_id == 44601485691195623
    # The log keeps every line, without colour codes (a file is never a terminal).
    assert log.read_text() == "".join(without_colour(line) + "\n" for line, _ in STREAM)
    assert "\x1b" not in log.read_text()
    out = capsys.readouterr().out  # not a terminal: no colour codes either
    assert out == "".join(without_colour(line) + "\n" for line, noise in STREAM if not noise)
    assert "SuperNodes changed" not in out and "FutureWarning: Tip" not in out and "warnings.warn(" in out


def test_colour_codes_reach_a_terminal_only(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert wants_colour(Terminal()) and not wants_colour(open(__file__))  # noqa: SIM115
    monkeypatch.setenv("NO_COLOR", "1")
    assert not wants_colour(Terminal())
    line = f"{INFO}[ROUND 1/3]\n"
    assert ConsoleFilter(colour=True).render(line) == line
    assert ConsoleFilter(colour=False).render(line) == "INFO :      [ROUND 1/3]\n"


def test_a_clients_steps_are_debug_lines_not_console_lines(caplog):
    """The console's progress is the server's one line per round; per-step losses are debug."""
    import logging

    import torch

    from fedapp.task.train import train_epochs

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))

    class Batches(list):  # what train_epochs reads of a DataLoader: its batches and its dataset
        dataset = None

    batches = Batches((torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]), None, []) for _ in range(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.DEBUG, logger="fedapp.task.train"):
        train_epochs(model, batches, optimizer, 1, torch.device("cpu"), log_prefix="[partition 0 round 1] ")
    steps = [r for r in caplog.records if "step 3/3 loss" in r.getMessage()]
    assert steps and all(r.levelno == logging.DEBUG for r in steps)


def record(**fields) -> dict:
    base = {
        "round": 3,
        "train": {"train-loss": 0.8123, "train-accuracy": 0.7},
        "train-clients": {"clients": [{}, {}, {}], "rejected": [{"reason": "x"}], "failed": [], "skipped": ""},
        "evaluate": {"loss": 0.5, "video-accuracy": 0.8},
        "central": {"loss": 0.421, "video-accuracy": 0.875},
        "round-time-s": 12.14,
    }
    return {**base, **fields}


def test_the_round_line_names_the_strategy_and_the_accuracy():
    cfg = parse_config({"num-server-rounds": 10})
    assert round_line(record(), cfg) == (
        "round 3/10 · fedavg · train loss 0.812 acc 0.700 · central video-acc 0.875 loss 0.421 · "
        "3 clients (1 rejected, 0 failed) · 12.1 s"
    )
    fusion = parse_config({"num-server-rounds": 10, "strategy": "fusion", "fusion-fn": "trimmed-mean"})
    no_central = record(central={})
    assert round_line(no_central, fusion).startswith("round 3/10 · fusion (trimmed-mean) · train loss")
    assert "· client-evaluate video-acc 0.800 loss 0.500 ·" in round_line(no_central, fusion)
    private = parse_config({"num-server-rounds": 10, "strategy": "average", "dp": "server-side"})
    assert "· average + dp server-side (epsilon 1.500) ·" in round_line(record(privacy={"epsilon": 1.5}), private)
    kept = record(train={}, **{"train-clients": {"clients": [], "rejected": [], "failed": [{}], "skipped": "too few"}})
    assert "· no update: too few · central video-acc" in round_line(kept, cfg)


def test_the_final_lines_say_how_the_run_went_in_words():
    summary = {
        "status": "completed",
        "rounds-completed": 4,
        "strategy": "fedavg",
        "stop-reason": "round budget spent (num-server-rounds)",
        "final-central": {"video-accuracy": 0.875, "clip-accuracy": 0.8, "loss": 0.42},
        "best-round": 3,
        "best-video-accuracy": 0.9,
        "initial-video-accuracy": 0.125,
        "wall-time-s": 173.04,
        "results-dir": "/r/run",
    }
    assert summary_lines(summary) == [
        "run completed: 4 rounds · fedavg · stop: round budget spent (num-server-rounds) · 173.0 s",
        "final central video-acc 0.8750 clip-acc 0.8000 loss 0.4200 · best video-acc 0.9000 at round 3 "
        "(initial model 0.1250)",
        "results: /r/run",
    ]
    failed = {"status": "failed", "error": "ConfigError: x", "rounds-completed": 0, "wall-time-s": 1.0}
    assert summary_lines(failed) == ["run failed after 0 rounds (1.0 s): ConfigError: x"]


def test_the_launchers_ok_line_says_what_was_measured():
    from fedapp.ops.launch import ok_line

    central = {"rounds-completed": 1, "final-central": {"video-accuracy": 0.5, "clip-accuracy": 0.25}}
    assert ok_line(central) == "OK: 1 round; central test video accuracy 0.500, clip accuracy 0.250"
    clients = {"rounds-completed": 3, "final-central": {}, "final-evaluate": {"video-accuracy": 0.75}}
    assert ok_line(clients) == "OK: 3 rounds; clients' test video accuracy 0.750 (central-eval is off)"
    assert "no accuracy measured" in ok_line({"rounds-completed": 2, "final-central": {}, "final-evaluate": {}})
    assert "nan" not in ok_line(clients)


def test_flowers_debug_switch_shows_the_apps_debug_lines(monkeypatch):
    """FLWR_LOG_LEVEL=DEBUG (Flower's own switch) lets the clients' per-step lines through too."""
    import logging

    from fedapp.logs import app_log_level

    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    assert app_log_level() == logging.INFO
    monkeypatch.setenv("FLWR_LOG_LEVEL", "debug")
    assert app_log_level() == logging.DEBUG
