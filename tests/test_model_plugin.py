"""A model of the user's own, ``model = "module:builder"``: the example builds, passes the start
check and trains; every way a builder can be wrong is refused naming the key and the value; the
built-in models' options are refused for it; a checkpoint of it rebuilds from its saved name."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch
from torch import nn

from fedapp.plugins import PluginError
from fedapp.server.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint, save_checkpoint
from fedapp.task.models import ModelError, batchnorm_state_keys, build_model, check_model

torch.set_num_threads(2)

EXAMPLE = "docs.examples.my_model:build"  # found from the app folder, as under Flower
CLIP = (2, 3, 8, 32, 32)

# Builders wrong in every way the start check must catch, one per function.
BAD_BUILDERS = """
import torch
from torch import nn

NOT_CALLABLE = 3


def no_arguments():
    return nn.Linear(3, 2)


def two_arguments(num_classes, width):
    return nn.Linear(width, num_classes)


def not_a_module(num_classes):
    return "a string"


def crashes(num_classes):
    raise RuntimeError("out of ideas")


def _pooled(outputs):
    return nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(3, outputs))


def one_logit_too_many(num_classes):
    return _pooled(num_classes + 1)


def flat_input(num_classes):  # a Linear on the raw clip: the last dimension is W, not 3
    return nn.Linear(3, num_classes)


class _Argmax(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = _pooled(num_classes)

    def forward(self, x):
        return self.net(x).argmax(dim=1, keepdim=True).expand(-1, self.net[-1].out_features)


def class_indices(num_classes):
    return _Argmax(num_classes)


def frozen(num_classes):
    return _pooled(num_classes).requires_grad_(False)
"""


@pytest.fixture
def bad_module(tmp_path, monkeypatch) -> str:
    """The module of BAD_BUILDERS on sys.path under a fresh name (no clash with an earlier import)."""
    name = f"user_models_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(BAD_BUILDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _clip(seed: int = 0) -> torch.Tensor:
    return torch.randn(*CLIP, generator=torch.Generator().manual_seed(seed))


def test_the_example_builds_passes_the_check_and_trains_a_step() -> None:
    model = build_model(EXAMPLE, 4)
    assert isinstance(model, nn.Module) and model(_clip()).shape == (2, 4)
    check_model(EXAMPLE, 4)
    check_model(EXAMPLE, 4, input_shape=(3, 16, 64, 64))  # the run's own clip size
    assert batchnorm_state_keys(model)  # FedBN finds its BatchNorm layers like a built-in's

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(_clip()), torch.tensor([0, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "9.weight" in changed and "1.running_mean" in changed  # the classifier and BatchNorm statistics


def test_the_check_leaves_the_random_stream_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_model(EXAMPLE, 5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("builder", "error", "message"),
    [
        ("NOT_CALLABLE", PluginError, r"is a int, not a function or class \(num_classes\)"),
        ("no_arguments", PluginError, r"cannot be called as \(num_classes\)"),
        ("two_arguments", PluginError, r"cannot be called as \(num_classes\)"),
        ("missing", PluginError, r"module '.*' has no attribute 'missing'"),
        ("not_a_module", ModelError, r"returned a str, not a torch.nn.Module"),
        ("crashes", ModelError, r"building with num_classes=3 raised RuntimeError: out of ideas"),
        ("one_logit_too_many", ModelError, r"to torch.float32 \(1, 4\); it must return float logits of shape \(1, 3\)"),
        ("flat_input", ModelError, r"failed on a dummy clip of shape \(1, 3, 8, 32, 32\) \(B×C×T×H×W\): RuntimeError"),
        ("class_indices", ModelError, r"to torch.int64 \(1, 3\); it must return float logits"),
        ("frozen", ModelError, r"has no trainable parameters"),
    ],
)
def test_a_wrong_builder_is_refused_naming_the_key(bad_module: str, builder: str, error: type, message: str) -> None:
    spec = f"{bad_module}:{builder}"
    with pytest.raises(error, match=message) as err:
        check_model(spec, 3)
    assert f'model="{spec}"' in str(err.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_of_yours:build", r"could not import 'no_such_module_of_yours' \(ModuleNotFoundError"),
        ("docs.examples.my_model:nope", r"module 'docs.examples.my_model' has no attribute 'nope'"),
        ("docs.examples.my_model:", r'is not "module:attribute"'),
    ],
)
def test_a_name_that_does_not_load_is_refused_at_start_and_on_a_node(spec: str, message: str) -> None:
    for call in (lambda: check_model(spec), lambda: build_model(spec, 3)):
        with pytest.raises(PluginError, match=message) as err:
            call()
        assert f'model="{spec}"' in str(err.value)


@pytest.mark.parametrize(
    ("option", "shown"),
    [
        ({"pretrained": "KINETICS400_V1"}, "pretrained='KINETICS400_V1'"),
        ({"pretrained_path": "/w.pt"}, "pretrained-path='/w.pt'"),
        ({"freeze_backbone": True}, "freeze-backbone=True"),
        ({"pooling": "attention"}, "pooling='attention'"),
    ],
)
def test_the_built_in_models_options_are_refused(option: dict, shown: str) -> None:
    with pytest.raises(ModelError, match="only apply to built-in models") as err:
        build_model(EXAMPLE, 3, **option)
    assert f'model="{EXAMPLE}" is a model of your own: {shown}' in str(err.value)


def _checkpoint(tmp_path, classes: list[str]) -> tuple[nn.Module, object]:
    """A trained-looking example model saved as the server saves a round."""
    torch.manual_seed(1)
    model = build_model(EXAMPLE, len(classes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # differ from any fresh init
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path, 1, arrays, {"model": EXAMPLE}, classes, {}, [])
    return model.eval(), path


def test_a_checkpoint_of_a_plugin_model_rebuilds_from_its_name(tmp_path) -> None:
    classes = ["a", "b", "c"]
    trained, path = _checkpoint(tmp_path, classes)
    checkpoint = load_checkpoint(path)
    reference = {k: v.numpy() for k, v in build_model(EXAMPLE, len(classes)).state_dict().items()}
    check_compatible(checkpoint, EXAMPLE, classes, reference)
    model = build_model(checkpoint.manifest["model"], len(checkpoint.classes))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in checkpoint.arrays.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_clip()), trained(_clip()))


def test_model_from_checkpoint_rebuilds_a_plugin_model(tmp_path) -> None:
    """The path of ``fedvideo predict``/``embed``: the run config's model name goes through parse_config."""
    trained, path = _checkpoint(tmp_path, ["a", "b"])
    model, classes, cfg = model_from_checkpoint(path)
    assert classes == ["a", "b"] and cfg.model == EXAMPLE
    with torch.no_grad():
        torch.testing.assert_close(model(_clip()), trained(_clip()))


def test_retrieval_refuses_a_plugin_model_without_features(tmp_path, capsys) -> None:
    """Retrieval embeds with the head's inputs (``features``); a model of your own may not have them."""
    from fedapp.tools import retrieve

    _, path = _checkpoint(tmp_path, ["a", "b"])
    videos = tmp_path / "videos"
    videos.mkdir()
    rc = retrieve.main([str(path), "--index-dir", str(tmp_path / "index"), "--videos", str(videos), "--query", "q.mp4"])
    assert rc == 2 and "has no features(clips) method" in capsys.readouterr().err
