"""What a newcomer meets at start: every config mistake refused before anything starts, naming the
key, the value and the fix, by the same validation the ServerApp runs; nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedapp.ops.start_checks import check_run_config, federation_size
from fedapp.task.config import (
    ConfigError,
    config_keys,
    parse_config,
    parse_overrides,
)
from tests.conftest import PROJECT_DIR, fedvideo_command


def refused(overrides: dict, *, federation: str = "num-supernodes=3") -> str:
    texts = [" ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    with pytest.raises(ConfigError) as info:
        check_run_config(texts, federation)
    return str(info.value)


# ------------------------------------------------------------------ 1. a key whose stage is not selected


@pytest.mark.parametrize(
    ("overrides", "key", "needs"),
    [
        ({"data-dir": "/my/videos"}, "data-dir", 'dataset="ucf101"'),  # the tester's silent ignore
        ({"fusion-fn": "krum"}, "fusion-fn", 'strategy="fusion"'),
        ({"krum-malicious": 2}, "krum-malicious", 'fusion-fn="krum"'),
        ({"strategy": "fusion", "krum-selected": 2}, "krum-selected", 'fusion-fn="krum"'),
        ({"trim-beta": 0.1}, "trim-beta", 'fusion-fn="trimmed-mean"'),
        ({"feddf-steps": 5}, "feddf-steps", 'fusion-fn="feddf"'),
        ({"dp-noise-multiplier": 0.5}, "dp-noise-multiplier", 'dp="server-side"'),
        ({"dp-clipping-norm": 2.0}, "dp-clipping-norm", 'dp="server-side"'),
        ({"weight-source": "inverse-loss"}, "weight-source", 'strategy="weighted"'),
        ({"strategy": "weighted", "staleness-decay": 0.9}, "staleness-decay", 'weight-source="staleness"'),
        ({"topk-fraction": 0.1}, "topk-fraction", 'compression="topk"'),
        ({"dirichlet-alpha": 0.1}, "dirichlet-alpha", 'partitioning="dirichlet"'),
        ({"classes-per-client": 3}, "classes-per-client", 'partitioning="k-classes"'),
        ({"pooling": "attention"}, "pooling", "framepool_"),
        ({"momentum": 0.5}, "momentum", 'optimizer="sgd"'),
        ({"early-stop-min-delta": 0.01}, "early-stop-min-delta", "early-stop-patience > 0"),
        ({"test-fraction": 0.3}, "test-fraction", 'dataset="folders"'),
        (
            {"server-optimizer": "adam", "server-lr": 0.1, "server-momentum": 0.9},
            "server-momentum",
            'server-optimizer="sgd"',
        ),
        ({"server-beta1": 0.8}, "server-beta1", 'server-optimizer="adam"'),
        ({"server-optimizer": "adagrad", "server-lr": 0.1, "server-beta2": 0.9}, "server-beta2", '"yogi"'),
        ({"server-tau": 0.01}, "server-tau", 'server-optimizer="adam"'),
    ],
)
def test_a_key_set_where_it_has_no_effect_is_refused(overrides, key, needs):
    """Named with the stage or module it belongs to and what would select it (fedapp/config/keys.py)."""
    message = refused(overrides)
    assert message.startswith(f"{key}=") and needs in message
    assert "which this config does not use: it acts only with" in message or "does nothing here:" in message
    with pytest.raises(ConfigError, match=f"{key}=.*(does not use|does nothing here)"):
        parse_config(overrides, check_paths=False)  # the ServerApp refuses it the same way


def test_the_same_keys_pass_where_they_act(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for overrides in (
        {"dataset": "folders", "data-dir": str(videos), "test-fraction": 0.3},
        {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.1},
        {"dp": "server-side", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0},
        {"strategy": "weighted", "weight-source": "staleness", "staleness-decay": 0.9},
        {"compression": "topk", "topk-fraction": 0.1},
        {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
        {"model": "framepool_resnet18", "pooling": "attention"},
        {"optimizer": "sgd", "momentum": 0.5},
        {"early-stop-patience": 3, "early-stop-min-delta": 0.01},
        {"server-optimizer": "yogi", "server-lr": 0.01, "server-beta1": 0.8, "server-tau": 0.01},
        {"server-optimizer": "adagrad", "server-lr": 0.1, "server-tau": 0.01},
    ):
        parse_config(overrides)


def test_scaffold_refuses_what_would_make_its_control_variates_wrong_or_silently_off():
    message = refused({"scaffold": True, "strategy": "fusion", "compression": "fp16"})
    assert message.startswith("scaffold=true does not work with")
    assert 'set optimizer="sgd" momentum=0.0' in message and 'strategy="fusion"' in message
    assert 'compression="fp16"' in message
    parse_config({"scaffold": True, "optimizer": "sgd", "momentum": 0.0, "strategy": "weighted"})


def test_an_adaptive_server_optimizer_refuses_a_learning_rate_of_one():
    message = refused({"server-optimizer": "adam", "server-lr": 1.0})
    assert "server-lr=1.0 is out of range with server-optimizer='adam'" in message and "adam's default 0.1" in message
    assert check_run_config(['server-optimizer="adam"'], "num-supernodes=3").server_lr == 0.1  # follows it


def test_every_conflicting_key_is_named_at_once():
    message = refused({"krum-malicious": 2, "dp-delta": 0.001})
    assert "krum-malicious=2" in message and "dp-delta=0.001" in message


def test_feddf_without_unlabeled_videos_of_the_task_is_refused(tmp_path):
    """FedDF on a user's dataset must not distil on the synthetic generator's clips (another task)."""
    videos = tmp_path / "videos"
    (videos / "walk").mkdir(parents=True)
    feddf = {"dataset": "folders", "data-dir": str(videos), "strategy": "fusion", "fusion-fn": "feddf"}
    message = refused(feddf)
    assert "feddf-data-dir=''" in message and "dataset='folders'" in message and "unlabeled videos" in message
    with pytest.raises(ConfigError, match="feddf-data-dir=''"):
        parse_config(feddf)
    parse_config({**feddf, "feddf-data-dir": str(videos)})  # named: accepted
    parse_config({"strategy": "fusion", "fusion-fn": "feddf"}, check_paths=False)  # synthetic: its own task


# ------------------------------------------------------------------ 2. a misspelled key


def test_an_unknown_key_names_the_closest_valid_one():
    assert "did you mean 'num-server-rounds'?" in refused({"num-server-round": 2})
    assert "did you mean 'fusion-fn'?" in refused({"fusion_fn": "krum"})
    message = refused({"colour": 1})
    assert "unknown key 'colour'" in message and "did you mean" not in message


# ------------------------------------------------------------------ 3. values Flower would choke on


def test_an_unquoted_string_is_refused_with_the_quoted_form():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["num-server-rounds=2 model=r3d_18"])
    assert """strings need TOML quotes: model="r3d_18\"""" in str(info.value)


def test_text_that_is_not_a_pair_is_refused_not_dropped():
    # Flower's own parser silently drops "num-server-rounds 5" and runs 10 rounds.
    with pytest.raises(ConfigError, match="is not a key=value pair"):
        parse_overrides(["num-server-rounds 5"])
    assert parse_overrides(['a=1 b="x y" c=true', "a=2"]) == {"a": 2, "b": "x y", "c": True}


def test_types_ranges_and_choices_are_checked_before_start():
    assert "wrong type" in refused({"num-server-rounds": "5"})
    assert "out of range" in refused({"lr": -1.0})
    assert "choose one of" in refused({"strategy": "fedsgd"})


# ------------------------------------------------------------------ the federation's size


def test_node_counts_are_checked_against_the_federation():
    assert federation_size("num-supernodes=5 client-resources-num-cpus=1") == 5
    assert federation_size("client-resources-num-cpus=1") == 2  # Flower's default
    message = refused({"min-available-nodes": 4, "min-train-nodes": 4})
    assert "the federation has 3 SuperNodes" in message and "num-supernodes=4" in message
    krum = {"strategy": "fusion", "fusion-fn": "krum", "min-train-nodes": 5, "min-available-nodes": 5}
    assert "num-supernodes=5" in refused(krum)  # fine by itself, too big for 3 nodes
    check_run_config([" ".join(f"{k}={json.dumps(v)}" for k, v in krum.items())], "num-supernodes=5")
    assert "needs min-train-nodes > 2·1+2" in refused({"strategy": "fusion", "fusion-fn": "krum"})


def test_every_key_of_the_app_is_known():
    assert config_keys() == list(parse_config({}).to_dict())


# ------------------------------------------------------------------ through the command, as users run it


def test_fedvideo_run_refuses_a_misspelled_key_before_anything_starts(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [fedvideo_command(), "run", "--run-config", f'num-server-round=2 results-dir="{results}"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # a hang guard, not a speed claim (README: about 0.4 s on this machine)
        env={**os.environ, "FEDVIDEO_FLWR_HOME": str(tmp_path / "flwr_home")},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "FAILED: config: unknown key 'num-server-round': did you mean 'num-server-rounds'?"
    ]
    assert proc.stdout == ""  # one line, no traceback, no Flower output
    assert list(tmp_path.iterdir()) == []  # no results folder, no Flower home: nothing started


def test_the_check_needs_neither_torch_nor_a_flower_process():
    """Why it answers in well under a second: validating imports no torch and starts nothing."""
    code = (
        "import sys; from fedapp.ops.launch import main\n"
        "rc = main(['--run-config', 'model=r3d_18'])\n"
        "print(rc, 'torch' in sys.modules, 'flwr.simulation' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert 'strings need TOML quotes: model="r3d_18"' in proc.stderr


def test_a_resume_that_cannot_train_is_refused_before_start(tmp_path):
    """Resuming a finished run, or a checkpoint of another model, fails in the launcher from the
    checkpoint's manifest alone (no weights read, nothing started), leaving the folder as it was."""
    import numpy as np

    from fedapp.ops.start_checks import run_location
    from fedapp.server.checkpoint import CheckpointError, save_checkpoint

    run_dir = tmp_path / "results" / "run"
    save_checkpoint(run_dir, 2, {"w": np.zeros(3, np.float32)}, {"model": "tiny3d"}, ["a", "b"], {}, [])
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    resume = f'results-dir="{tmp_path / "results"}" resume="{run_dir}"'
    for extra, message in (
        ("num-server-rounds=2", "at round 2: num-server-rounds=2 leaves nothing to train"),
        ('num-server-rounds=5 model="mc3_18"', "is for model 'tiny3d', this run uses 'mc3_18'"),
    ):
        texts = [f"{resume} {extra}"]
        cfg = check_run_config(texts, "num-supernodes=3")
        with pytest.raises(CheckpointError, match=message):
            run_location(texts, cfg)
    assert (
        run_location([f"{resume} num-server-rounds=5"], check_run_config([f"{resume} num-server-rounds=5"], None))
        == run_dir
    )
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# Each Troubleshooting row quotes the start of a real message: the message a case produces.
TROUBLESHOOTING = [
    ({"num-server-round": 2}, "unknown key 'num-server-round': did you mean 'num-server-rounds'?"),
    ("model=r3d_18", "--run-config model=r3d_18: the value is not a number, true/false or a quoted string"),
    ("num-server-rounds 5", "is not a key=value pair"),
    ({"num-server-rounds": "5"}, "has the wrong type: expected int"),
    ({"lr": -1.0}, "is out of range: allowed"),
    ({"strategy": "fedsgd"}, "is not allowed: choose one of"),
    ({"data-dir": "/my/videos"}, "does nothing here: the data reads it only with"),
    ({"strategy": "fedavg", "fusion-fn": "median"}, "belongs to the fusion family, which this config does not use"),
    ({"strategy": "fusion", "fusion-fn": "krum"}, "needs min-train-nodes > 2·1+2 = 4"),
    ({"min-available-nodes": 4, "min-train-nodes": 4}, "but the federation has 3 SuperNodes"),
    ({"min-available-nodes": 1}, "is smaller than min-train-nodes"),
    ({"dataset": "folders"}, "data-dir='' is not allowed with dataset="),
    ({"dataset": "folders", "data-dir": "/no/such/folder"}, "does not exist"),
    ({"pretrained-path": "/no/such/file.pt"}, "is not a file"),
    (
        {"model": "r3d_18", "pretrained": "KINETICS400_V1"},
        "pretrained='KINETICS400_V1': torchvision's file for r3d_18 is not at",
    ),
    ({"clip-cache-dir": "cache"}, "is not allowed: give an absolute path"),
    ({"resize": "big"}, "is invalid: expected 'HxW'"),
    ({"strategy": "fusion", "fusion-fn": "bulyan"}, "needs min-train-nodes >= 4·1+3 = 7"),
    (
        {"strategy": "fusion", "fusion-fn": "krum", "bucket-size": 3, "min-train-nodes": 5, "min-available-nodes": 5},
        "buckets, fewer than the 3",
    ),
    (
        {"dataset": "folders", "data-dir": "/my/videos", "strategy": "fusion", "fusion-fn": "feddf"},
        "feddf-data-dir='' is not allowed with fusion-fn=\"feddf\"",
    ),
]


@pytest.mark.parametrize(("case", "quoted"), TROUBLESHOOTING)
def test_troubleshooting_quotes_the_real_messages(case, quoted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache: no weights file
    page = (PROJECT_DIR / "docs" / "troubleshooting.md").read_text()
    assert quoted in page
    text = case if isinstance(case, str) else " ".join(f"{k}={json.dumps(v)}" for k, v in case.items())
    with pytest.raises(ConfigError) as info:
        check_run_config([text], "num-supernodes=3")
    assert quoted in str(info.value)


def test_every_run_config_the_readme_shows_passes_the_checks():
    """Every `--run-config '...'` of the README and of the documentation's pages (docs/*.md)."""
    import re

    pages = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    examples = [m.replace('\\"', '"') for m in re.findall(r"--run-config '([^']*)'", text) if "..." not in m]
    assert len(examples) >= 8
    for example in examples:
        parse_config(parse_overrides([example]), check_paths=False)
