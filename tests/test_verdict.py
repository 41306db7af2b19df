"""The launcher's verdict (fedapp/ops/verdict.py): Flower's run status asked through a fake ``flwr``
that answers late, answers garbage, times out or is not final yet, and the rule that judges a run
by that status and the app's summary. The real launcher under load: tests/test_load.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedapp.ops.verdict import COMPLETED, FlowerStatus, judge, parse_ls_answer, wait_final_status

RUN_ID = 4242

# A stand-in for Flower's CLI: each call takes the next scripted answer (the last one repeats),
# sleeps as told, prints it and exits with its code. Every call's argv is recorded.
FAKE_FLWR = """#!{python}
import json, os, sys, time
script = os.environ["FAKE_FLWR_SCRIPT"]
answers = json.load(open(script))
calls = os.environ["FAKE_FLWR_SCRIPT"] + ".calls"
n = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
answer = answers[min(n, len(answers) - 1)]
time.sleep(answer.get("sleep", 0))
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("rc", 0))
"""


def flower_json(status: str, run_id: int = RUN_ID) -> str:
    """What Flower 1.42's ``flwr ls --format json`` prints for one run (its own serializer)."""
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import RunRow

    values = {"run_id": run_id, "status_text": status}
    for field in dataclasses.fields(RunRow):
        if field.name not in values:
            values[field.name] = 0 if field.type in ("int", "float", int, float) else ""
    return _to_json([RunRow(**values)])


@pytest.fixture
def fake_flwr(tmp_path):
    """``(env, set_answers, calls)``: an environment whose ``flwr`` is the fake, a setter for its
    scripted answers, and a reader of the argv of every call it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "flwr"
    exe.write_text(FAKE_FLWR.format(python=sys.executable))
    exe.chmod(0o755)
    script = tmp_path / "answers.json"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_FLWR_SCRIPT": str(script)}

    def set_answers(*answers: dict) -> None:
        script.write_text(json.dumps(list(answers)))

    def calls() -> list[list[str]]:
        path = Path(f"{script}.calls")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return env, set_answers, calls


def wait(env, log: Path, **kwargs) -> FlowerStatus:
    options = {"wait": 3.0, "call_timeout": 5.0, "first_backoff": 0.05, **kwargs}
    return wait_final_status(RUN_ID, env, "conn", log, **options)


def test_parser_reads_what_flower_prints():
    assert parse_ls_answer(RUN_ID, 0, flower_json("finished:completed")) == ("finished:completed", None)
    assert parse_ls_answer(RUN_ID, 0, flower_json("running")) == ("running", None)
    coloured = Console(file=io.StringIO(), force_terminal=True)  # Rich's print_json, as with FORCE_COLOR
    coloured.print_json(flower_json("finished:failed"))
    assert "\x1b[" in coloured.file.getvalue()
    assert parse_ls_answer(RUN_ID, 0, coloured.file.getvalue()) == ("finished:failed", None)
    status, problem = parse_ls_answer(RUN_ID, 0, flower_json("finished:completed", run_id=7))
    assert status is None and f"lists no run {RUN_ID}" in problem  # another run's status is not this one's
    error = json.dumps({"success": False, "error-message": "\nRun ID 4242 not found"})
    assert parse_ls_answer(RUN_ID, 1, error) == (None, "flwr ls failed: Run ID 4242 not found")
    status, problem = parse_ls_answer(RUN_ID, 1, "Traceback (most recent call last):\n  grpc ...")
    assert status is None and "exited 1 and answered no JSON" in problem
    assert parse_ls_answer(RUN_ID, 0, "")[1] == "flwr ls exited 0 and answered no JSON: 'nothing'"


def test_a_late_answer_is_waited_for(fake_flwr, tmp_path):
    env, set_answers, calls = fake_flwr
    set_answers({"sleep": 1.5, "stdout": flower_json(COMPLETED)})
    flower = wait(env, tmp_path / "ls.log")
    assert flower == FlowerStatus(COMPLETED, None, 1)
    assert calls() == [["ls", "conn", "--run-id", str(RUN_ID), "--format", "json"]]


def test_a_status_not_yet_final_is_asked_again_until_it_is(fake_flwr, tmp_path):
    env, set_answers, calls = fake_flwr
    set_answers(
        {"stdout": flower_json("running")}, {"stdout": flower_json("running")}, {"stdout": flower_json(COMPLETED)}
    )
    flower = wait(env, tmp_path / "ls.log", wait=20.0)
    assert flower.final and flower.status == COMPLETED and flower.asks == 3 == len(calls())


def test_garbage_then_the_status_is_read_once_it_comes(fake_flwr, tmp_path):
    env, set_answers, _ = fake_flwr
    set_answers({"stdout": "\x1b[31mnot json"}, {"stdout": "", "rc": 1}, {"stdout": flower_json("finished:failed")})
    flower = wait(env, tmp_path / "ls.log", wait=20.0)
    assert flower == FlowerStatus("finished:failed", None, 3)


def test_a_cli_that_times_out_is_could_not_ask_and_every_answer_is_logged(fake_flwr, tmp_path):
    env, set_answers, calls = fake_flwr
    set_answers({"sleep": 30, "stdout": flower_json(COMPLETED)})
    log = tmp_path / "ls.log"
    began = time.monotonic()
    flower = wait(env, log, wait=2.0, call_timeout=1.0)
    assert time.monotonic() - began < 20  # bounded: the wait plus one call's time-out, not the CLI's 30 s
    assert flower.status is None and not flower.final
    assert flower.problem == "flwr ls did not answer within 1 s" and flower.asks == len(calls()) >= 2
    assert log.read_text().count("$ flwr ls conn --run-id 4242") == flower.asks
    assert "did not answer within 1 s" in log.read_text()


def test_garbage_is_logged_raw(fake_flwr, tmp_path):
    env, set_answers, _ = fake_flwr
    set_answers({"stdout": "<html>502 Bad Gateway</html>", "stderr": "grpc: UNAVAILABLE", "rc": 1})
    log = tmp_path / "ls.log"
    flower = wait(env, log, wait=0.5)
    assert flower.status is None and "answered no JSON" in flower.problem
    text = log.read_text()
    assert "<html>502 Bad Gateway</html>" in text and "grpc: UNAVAILABLE" in text and "exit: 1" in text


def test_a_status_stuck_before_final_keeps_flowers_word(fake_flwr, tmp_path):
    env, set_answers, _ = fake_flwr
    set_answers({"stdout": flower_json("running")})
    flower = wait(env, tmp_path / "ls.log", wait=1.0)
    assert flower.status == "running" and not flower.final and flower.asks >= 2
    assert "still 'running'" in flower.describe()


def test_a_fake_clock_shows_the_back_off_and_the_bound():
    now = [0.0]
    slept = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    def never_final(*_):
        now[0] += 1.0  # each question takes a second
        return None, "flwr ls did not answer"

    flower = wait_final_status(RUN_ID, {}, "c", None, wait=60.0, ask=never_final, clock=lambda: now[0], sleep=sleep)
    assert slept[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and max(slept) == 8.0  # doubling, capped
    assert 60.0 <= now[0] <= 61.0 and flower.asks == len(slept) + 1  # stops at the bound


SUMMARY = {"status": "completed", "run-id": RUN_ID, "rounds-completed": 2}


def test_judge_completed_needs_the_apps_summary_of_this_run(tmp_path):
    flower = FlowerStatus(COMPLETED)
    assert judge(flower, SUMMARY, tmp_path, RUN_ID).ok and judge(flower, SUMMARY, tmp_path, RUN_ID).warning is None
    none = judge(flower, None, tmp_path, RUN_ID)  # every client failed: no summary
    assert not none.ok and f"no summary for run {RUN_ID}" in none.message
    # A resume refused at start leaves the earlier run's completed summary: not this run's verdict.
    earlier = judge(flower, {**SUMMARY, "run-id": RUN_ID - 1}, tmp_path, RUN_ID)
    assert not earlier.ok and f"no summary for run {RUN_ID}" in earlier.message
    failed = judge(
        FlowerStatus("finished:failed"), {**SUMMARY, "status": "failed", "error": "ConfigError: x"}, tmp_path, RUN_ID
    )
    assert not failed.ok and "ConfigError: x" in failed.message
    assert not judge(flower, SUMMARY, tmp_path, None).ok  # no run started: never judged by an old summary


def test_judge_fails_what_flower_says_failed_even_with_a_completed_summary(tmp_path):
    for status in ("finished:failed", "finished:stopped"):
        outcome = judge(FlowerStatus(status), SUMMARY, tmp_path, RUN_ID)
        assert not outcome.ok and outcome.message == f"Flower reports status {status!r} for run {RUN_ID}"


def test_judge_without_flowers_final_word_follows_the_summary_with_a_warning(tmp_path):
    log = tmp_path / "flwr-ls.log"
    for flower in (
        FlowerStatus(None, "flwr ls did not answer within 30 s", 4),
        FlowerStatus("running", "not final after 60 s", 9),
    ):
        outcome = judge(flower, SUMMARY, tmp_path, RUN_ID, log)
        assert outcome.ok and outcome.warning.startswith("warning: ")
        assert "\n" not in outcome.warning and str(log) in outcome.warning and "says completed" in outcome.warning
        # "could not ask" never turns a failed run into a success
        failed = judge(flower, {**SUMMARY, "status": "failed", "error": "RuntimeError: boom"}, tmp_path, RUN_ID, log)
        assert not failed.ok and "boom" in failed.message and flower.describe() in failed.message
        assert not judge(flower, None, tmp_path, RUN_ID, log).ok


def test_each_launch_points_its_cli_at_its_own_superlink(small_run_config, tmp_path, monkeypatch):
    """Two launches in one project: each one's `flwr run` / `flwr ls` read a connection of their own
    (FLWR_HOME in the launch's log folder), so one started meanwhile never redirects the other."""
    import subprocess as sp

    from fedapp.ops import launch as launcher
    from fedapp.ops.flwr_run import config_text
    from fedapp.ops.start_checks import check_run_config

    seen = []

    def fake_superlink(flwr_home, log_dir, port, env, **_):
        seen.append({"port": port, "superlink-home": env["FLWR_HOME"]})
        return sp.Popen(["sleep", "30"], start_new_session=True)

    def fake_run(run_config, run_dir, env, timeout, **kwargs):
        config = Path(env["FLWR_HOME"], "config.toml").read_text()
        seen[-1].update(cli_home=env["FLWR_HOME"], config=config, log_dir=kwargs["log_dir"])
        return judge(FlowerStatus(COMPLETED), SUMMARY, run_dir, RUN_ID)

    monkeypatch.setenv("FEDVIDEO_FLWR_HOME", str(tmp_path / "shared"))
    monkeypatch.setattr(launcher, "start_superlink", fake_superlink)
    monkeypatch.setattr(launcher, "run_and_judge", fake_run)
    for name in ("a", "b"):
        texts = [config_text({**small_run_config, "results-dir": str(tmp_path / "results"), "run-name": name})]
        assert launcher.launch(texts, "num-supernodes=2", 60, check_run_config(texts, "num-supernodes=2")).ok
    assert seen[0]["port"] != seen[1]["port"]
    for launch in seen:
        assert launch["superlink-home"] == str((tmp_path / "shared").resolve())  # apps unpacked once
        assert Path(launch["cli_home"]) == launch["log_dir"] / "flwr-cli"
        assert f'address = "127.0.0.1:{launch["port"]}"' in launch["config"]
    # The first launch's connection still names its own SuperLink after the second one started.
    assert f'127.0.0.1:{seen[0]["port"]}"' in Path(seen[0]["cli_home"], "config.toml").read_text()
