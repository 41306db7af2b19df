"""Pretrained torchvision weights by name (``pretrained``), without network: the table matches
torchvision's enums, the file is found where torchvision caches it and loaded strictly with a new
head, only the server loads it, the preset follows the weights, and a missing file stops the start."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

from bench.inprocess import run_inprocess
from datasets.transforms import KINETICS_MEAN, KINETICS_STD, EvalClipTransform
from fedapp.client.video_client import VideoClient
from fedapp.server.app import initial_model
from fedapp.task import models
from fedapp.task.config import ConfigError, parse_config, parse_resize
from fedapp.task.models import ModelError, build_model
from fedapp.task.pretrained import MODEL_NAMES, PRETRAINED, torch_hub_dir, weights_for, weights_path
from fedapp.tools import weights as weights_tool
from tests.conftest import fedvideo_command

_TORCHVISION_NAME = {"framepool_resnet18": "resnet18", "framepool_resnet50": "resnet50"}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache of this test's own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def place_random_weights(model: str, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision state dict of the right architecture with random values, where torchvision keeps it."""
    arch = _TORCHVISION_NAME.get(model, model)
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    path = weights_path(model, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


# ---------------------------------------------------------------- the table is torchvision's own


@pytest.mark.parametrize("model", [m for m in PRETRAINED if m != "tiny3d"])
def test_every_weights_entry_matches_torchvision(model):
    enum = get_model_weights(_TORCHVISION_NAME.get(model, model))
    assert set(PRETRAINED[model]) == set(enum.__members__)  # every name torchvision has, no other
    for name, ours in PRETRAINED[model].items():
        theirs = enum[name]
        assert ours.file == theirs.url.rsplit("/", 1)[-1]
        transforms = theirs.transforms()
        resize = parse_resize(ours.preset.resize, "resize")
        # torchvision: two numbers resize exactly, one number resizes the short side
        assert (list(resize) if isinstance(resize, tuple) else [resize]) == list(transforms.resize_size)
        assert [ours.preset.crop_size] * 2 == list(transforms.crop_size) or [ours.preset.crop_size] == list(
            transforms.crop_size
        )
        assert list(ours.preset.mean) == list(transforms.mean) and list(ours.preset.std) == list(transforms.std)
        top1 = next(iter(theirs.meta["_metrics"].values()))["acc@1"]
        assert ours.accuracy.endswith(f"top-1 {top1}")


def test_the_table_names_every_built_in_model_without_importing_torch():
    assert MODEL_NAMES == tuple(PRETRAINED) and "s3d" in MODEL_NAMES
    assert models.MODEL_NAMES is MODEL_NAMES  # one list: what the config checks is what build_model builds
    code = "import sys, fedapp.task.pretrained; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_a_model_of_ones_own_has_no_table_entry():
    with pytest.raises(KeyError, match="model='my:build' has no pretrained weights 'DEFAULT': only built-in models"):
        weights_for("my:build", "DEFAULT")


@pytest.mark.parametrize(
    "env",
    [{"TORCH_HOME": "/x/torch"}, {"XDG_CACHE_HOME": "/y/cache"}, {}, {"TORCH_HOME": "~/t", "XDG_CACHE_HOME": "/z"}],
)
def test_the_cache_folder_is_torch_hubs(env, monkeypatch):
    for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert str(torch_hub_dir()) == torch.hub.get_dir()


# ---------------------------------------------------------------- found, loaded strictly, new head


def test_kinetics_weights_load_from_the_cache_with_a_new_head(torch_home):
    state = place_random_weights("r3d_18", "KINETICS400_V1")
    model = build_model("r3d_18", 5, pretrained="KINETICS400_V1")
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert model.head.out_features == 5 and model.head.in_features == state["fc.weight"].shape[1]
    fresh = build_model("r3d_18", 5)
    assert not torch.equal(fresh.backbone.stem[0].weight, model.backbone.stem[0].weight)


def test_s3d_weights_load_from_the_cache_with_a_new_head(torch_home):
    state = place_random_weights("s3d", "KINETICS400_V1")
    model = build_model("s3d", 5, pretrained="DEFAULT")  # DEFAULT: the same file
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state) - {"classifier.1.weight", "classifier.1.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 5
    assert model.head.in_features == state["classifier.1.weight"].shape[1] == 1024


def test_imagenet_weights_fill_the_frame_pooled_resnet(torch_home):
    state = place_random_weights("framepool_resnet18", "IMAGENET1K_V1")
    model = build_model("framepool_resnet18", 3, pretrained="DEFAULT", pooling="attention")  # DEFAULT: same file
    assert torch.equal(model.backbone.net.conv1.weight, state["conv1.weight"])
    assert model.backbone.attention is not None  # not in the file: stays trainable and fresh


def test_a_file_of_another_architecture_is_refused(torch_home):
    wrong = torchvision.models.video.mc3_18(weights=None).state_dict()
    path = weights_path("r3d_18", "KINETICS400_V1")
    path.parent.mkdir(parents=True)
    torch.save(wrong, path)
    with pytest.raises(ModelError, match="does not fit the backbone of 'r3d_18'.*seems to be for mc3_18"):
        build_model("r3d_18", 5, pretrained="KINETICS400_V1")


def test_the_server_loads_the_weights_and_the_clients_receive_them(torch_home, small_run_config, tmp_path, monkeypatch):
    """Only the server reads the file (round 0's model); the clients start from what it sends."""
    state = place_random_weights("framepool_resnet18", "IMAGENET1K_V1")
    run_config = {
        **small_run_config,
        "model": "framepool_resnet18",
        "pretrained": "IMAGENET1K_V1",
        "resize": "32x32",  # the preset (short:256, crop 224) overridden by the existing keys
        "crop-size": 32,
        "clip-len": 2,
        "num-server-rounds": 1,
        "min-train-nodes": 2,
        "min-available-nodes": 2,
        "fraction-evaluate": 0.0,
        "tensorboard": False,
    }
    cfg = parse_config(run_config)
    assert torch.equal(initial_model(cfg, 8).backbone.net.conv1.weight, state["conv1.weight"])

    loads, starts = [], []
    original = models.load_pretrained_backbone
    monkeypatch.setattr(models, "load_pretrained_backbone", lambda *a: (loads.append(a[2]), original(*a)))
    client_model = VideoClient._model

    def spy(self, parameters):
        model = client_model(self, parameters)
        starts.append(model.backbone.net.conv1.weight.detach().clone())
        return model

    monkeypatch.setattr(VideoClient, "_model", spy)
    results = run_inprocess(run_config, 2, tmp_path / "run")
    assert loads == [str(weights_path("framepool_resnet18", "IMAGENET1K_V1"))]  # once: the server's
    assert len(starts) == 2 and all(torch.equal(start, state["conv1.weight"]) for start in starts)  # as sent
    assert len(results.rounds[-1]["train-clients"]["clients"]) == 2


def test_s3d_trains_a_federated_round_from_its_kinetics_weights(torch_home, small_run_config, tmp_path):
    """S3D as a run uses it: Kinetics-400 weights from the cache, a new head, clients training a
    round in process on small clips (the preset's 224 px overridden, above S3D's minimum)."""
    import numpy as np

    from fedapp.server.results import MODEL_FILE, load_weights

    state = place_random_weights("s3d", "KINETICS400_V1")
    run_config = {**small_run_config, "model": "s3d", "pretrained": "KINETICS400_V1", "resize": "32x32",
                  "crop-size": 32, "clip-len": 8, "num-server-rounds": 1, "min-train-nodes": 2,
                  "min-available-nodes": 2, "fraction-evaluate": 0.0, "tensorboard": False}  # fmt: skip
    start = initial_model(parse_config(run_config), 4).state_dict()["backbone.features.0.0.0.weight"]
    assert torch.equal(start, state["features.0.0.0.weight"])  # round 0 is the cache file's backbone
    results = run_inprocess(run_config, 2, tmp_path / "run")
    assert len(results.rounds[-1]["train-clients"]["clients"]) == 2
    trained = load_weights(tmp_path / "run" / MODEL_FILE)
    loaded = state["features.0.0.0.weight"].numpy()  # S3D's first convolution, as torchvision names it
    assert trained["backbone.features.0.0.0.weight"].shape == loaded.shape
    assert not np.array_equal(trained["backbone.features.0.0.0.weight"], loaded)  # it trained from there
    assert trained["head.weight"].shape == (4, 1024)  # a new head for the 4 synthetic classes


# ---------------------------------------------------------------- the preset follows the weights


def test_the_preset_follows_the_weights_unless_the_keys_say_otherwise():
    video = parse_config({"model": "r3d_18", "pretrained": "KINETICS400_V1"}, check_paths=False)
    assert (video.resize, video.crop_size) == ("128x171", 112)
    assert video.normalization == (KINETICS_MEAN, KINETICS_STD)
    image = parse_config({"model": "framepool_resnet18", "pretrained": "IMAGENET1K_V1"}, check_paths=False)
    assert (image.resize, image.crop_size) == ("short:256", 224)
    assert image.normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert image.clip_spec.resize == 256  # short side, aspect kept
    own = parse_config(
        {"model": "r3d_18", "pretrained": "KINETICS400_V1", "resize": "short:128", "crop-size": 96}, check_paths=False
    )
    assert (own.resize, own.crop_size, own.clip_spec.resize) == ("short:128", 96, 128)
    plain = parse_config({}, check_paths=False)  # no weights: the small default, Kinetics statistics
    assert (plain.resize, plain.crop_size, plain.normalization) == ("64x64", 64, (KINETICS_MEAN, KINETICS_STD))


def test_the_eval_transform_normalizes_with_the_weights_statistics():
    clip = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    out = EvalClipTransform(8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(clip)
    np.testing.assert_allclose(out[:, 0, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pretrained": "KINETICS400_V1"}, "model='tiny3d' has no pretrained weights 'KINETICS400_V1'"),
        ({"model": "r3d_18", "pretrained": "IMAGENET1K_V1"}, "torchvision has KINETICS400_V1, DEFAULT"),
        ({"model": "r3d_18", "pretrained": "KINETICS400_V1", "pretrained-path": "/w.pt"}, "keep one"),
        ({"resize": "short:4"}, "expected 'short:N' with N >= 8"),
        ({"resize": "short:64", "crop-size": 80}, "crop-size=80 is out of range"),
    ],
)
def test_bad_pretrained_or_resize_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(overrides, check_paths=False)


# ---------------------------------------------------------------- a missing file stops the start


def test_a_missing_file_is_refused_before_anything_starts(tmp_path):
    """Offline without the file: one line naming the path torchvision expects, nothing written."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "FEDVIDEO_FLWR_HOME": str(tmp_path / "flwr")}
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            fedvideo_command(),
            "run",
            "--run-config",
            f'model="r3d_18" pretrained="KINETICS400_V1" results-dir="{results}"',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # a hang guard, not a speed claim (README: under a second here)
        env=env,
    )
    assert proc.returncode == 2
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth"
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("FAILED: config: pretrained='KINETICS400_V1'") and str(expected) in line
    assert "fedvideo weights r3d_18 KINETICS400_V1 --download" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no results, no Flower home, no torch cache


def test_the_weights_command_locates_and_lists(torch_home, capsys):
    assert weights_tool.main(["r3d_18", "KINETICS400_V1"]) == 1
    assert "missing: " + str(weights_path("r3d_18", "KINETICS400_V1")) in capsys.readouterr().out
    place_random_weights("r3d_18", "KINETICS400_V1")
    assert weights_tool.main(["r3d_18", "KINETICS400_V1", "--download"]) == 0  # cached: nothing fetched
    assert capsys.readouterr().out.strip() == str(weights_path("r3d_18", "KINETICS400_V1"))
    assert weights_tool.main([]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith("r3d_18") and " cached " in line for line in listing)
    assert any(line.startswith("mc3_18") and " missing " in line for line in listing)
    assert weights_tool.main(["r3d_18", "IMAGENET1K_V1"]) == 2
