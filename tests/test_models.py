"""Tests for fedapp.task.models: shapes, temporal sensitivity, offline pretrained loading, freezing, devices."""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from fedapp.task.devices import _channels_last_format, autocast_context, input_to_device, prepare_model, select_device
from fedapp.task.models import (
    MODEL_NAMES,
    POOLINGS,
    ModelError,
    TinyC3D,
    VideoClassifier,
    build_model,
    check_model,
    count_parameters,
    freeze_backbone,
    load_pretrained_backbone,
)
from fedapp.task.pretrained import MIN_INPUT

torch.set_num_threads(2)

CLIP = (2, 3, 8, 32, 32)  # small enough for the 30 M-param video ResNets on CPU
PERM = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])  # a frame shuffle with no fixed point


def _clip(seed: int = 0) -> torch.Tensor:
    return torch.randn(*CLIP, generator=torch.Generator().manual_seed(seed))


def _backbone_equal(model: VideoClassifier, reference: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every tensor of ``reference`` (minus torchvision's classifier) equals the model's ``prefix + key`` tensor."""
    state = model.state_dict()
    checked = 0
    for key, value in reference.items():
        if key.startswith(("fc.", "classifier.")):
            continue
        assert torch.equal(state[prefix + key], value), key
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_runs(name: str) -> None:
    model = build_model(name, num_classes=5).eval()
    x = _clip()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 5)
    assert feats.shape == (2, model.feature_dim)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 5
    assert torch.isfinite(logits).all()
    keys = model.state_dict().keys()
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert {"head.weight", "head.bias"} <= set(keys)


def test_tiny3d_size() -> None:
    model = build_model("tiny3d", num_classes=8)
    assert 300_000 <= count_parameters(model) <= 800_000
    # larger inputs (the training resolution) also work
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 64, 64)).shape == (1, 8)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_framepool_ignores_frame_order(pooling: str) -> None:
    model = build_model("framepool_resnet18", num_classes=4, pooling=pooling).eval()
    assert (model.backbone.attention is not None) == (pooling == "attention")
    x = _clip()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :, PERM]), model(x), rtol=1e-4, atol=1e-5)


def test_attention_pooling_differs_from_mean() -> None:
    torch.manual_seed(0)
    model = build_model("framepool_resnet18", num_classes=4, pooling="attention").eval()
    x = _clip()
    with torch.no_grad():
        frame_feats = model.backbone.net(x.transpose(1, 2).flatten(0, 1)).view(2, 8, -1)
        pooled = model.features(x)
    assert not torch.allclose(pooled, frame_feats.mean(dim=1), atol=1e-4)
    # still a convex combination of the frame features
    assert (pooled <= frame_feats.max(dim=1).values + 1e-5).all()
    assert (pooled >= frame_feats.min(dim=1).values - 1e-5).all()


def test_tiny3d_sees_frame_order() -> None:
    model = build_model("tiny3d", num_classes=4).eval()
    x = _clip()
    with torch.no_grad():
        assert not torch.allclose(model(x[:, :, PERM]), model(x), atol=1e-4)
        assert not torch.allclose(model(x.flip(2)), model(x), atol=1e-4)


def test_unknown_model_and_pooling() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet3d'") as err:
        build_model("resnet3d", num_classes=3)
    assert all(name in str(err.value) for name in MODEL_NAMES)
    assert '"module:builder"' in str(err.value)  # the way to a model of one's own
    with pytest.raises(ModelError, match="unknown model 'resnet3d'"):
        check_model("resnet3d")
    for name in MODEL_NAMES:
        check_model(name)  # built-ins: only looked up
    with pytest.raises(ModelError, match="unknown pooling 'max'") as err:
        build_model("framepool_resnet18", num_classes=3, pooling="max")
    assert "mean" in str(err.value) and "attention" in str(err.value)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("tiny3d", num_classes=0)


def test_load_torchvision_video_weights(tmp_path) -> None:
    source = torchvision.models.video.mc3_18(weights=None, num_classes=400).state_dict()
    path = tmp_path / "mc3_18_k400.pth"
    torch.save(source, path)
    model = build_model("mc3_18", num_classes=7, pretrained_path=str(path))
    _backbone_equal(model, source, prefix="backbone.")
    assert model.head.weight.shape == (7, 512)
    assert not model.backbone_frozen
    # nested under "state_dict" (a training checkpoint) loads the same
    nested = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source, "epoch": 3}, nested)
    again = build_model("mc3_18", num_classes=2)
    load_pretrained_backbone(again, "mc3_18", str(nested))
    _backbone_equal(again, source, prefix="backbone.")


def test_s3d_loads_torchvision_weights_and_matches_torchvision(tmp_path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.video.s3d(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eps and the pooling both matter
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    source = reference.state_dict()
    path = tmp_path / "s3d.pth"
    torch.save(source, path)
    model = build_model("s3d", num_classes=7, pretrained_path=str(path)).eval()
    _backbone_equal(model, source, prefix="backbone.")
    assert set(model.backbone.state_dict()) == {k for k in source if not k.startswith("classifier.")}
    assert model.feature_dim == 1024 and isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7

    # at torchvision's own input size, the global mean is its 2×7×7 pooling: same logits as its 1×1×1 conv
    conv = reference.classifier[1]
    with torch.no_grad():
        model.head = torch.nn.Linear(1024, 400)
        model.head.weight.copy_(conv.weight.flatten(1))
        model.head.bias.copy_(conv.bias)
        x = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)

    bn = model.backbone.features[0][0][1]
    assert (bn.eps, bn.momentum) == (1e-3, 0.1)  # torchvision's eps, PyTorch's momentum (see models._s3d)
    wrong = tmp_path / "mc3.pth"
    torch.save(torchvision.models.video.mc3_18(weights=None).state_dict(), wrong)
    with pytest.raises(ModelError, match="does not fit the backbone of 's3d'.*seems to be for mc3_18"):
        build_model("s3d", num_classes=2, pretrained_path=str(wrong))
    with pytest.raises(ModelError, match="does not fit the backbone of 'r3d_18'.*seems to be for s3d"):
        build_model("r3d_18", num_classes=2, pretrained_path=str(path))


@pytest.mark.parametrize("name", sorted(MIN_INPUT))
def test_the_smallest_input_each_model_takes(name: str) -> None:
    """``MIN_INPUT`` (clip-len, crop-size) is exact: the model runs there and not one below."""
    clip_len, crop = MIN_INPUT[name]
    model = build_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, clip_len, crop, crop)).shape == (1, 3)
        for t, h in ((clip_len - 1, crop), (clip_len, crop - 1)):
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 3, t, h, h))


def test_load_torchvision_resnet_into_framepool(tmp_path) -> None:
    source = torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    model = build_model("framepool_resnet18", num_classes=3, pretrained_path=str(path), pooling="attention")
    _backbone_equal(model, source, prefix="backbone.net.")
    assert model.head.weight.shape == (3, 512)


def test_load_own_format_and_safetensors(tmp_path) -> None:
    trained = build_model("tiny3d", num_classes=7)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # differ from any fresh init
    backbone_ref = trained.backbone.state_dict()

    pth = tmp_path / "tiny.pt"
    torch.save({"model": trained.state_dict()}, pth)
    model = build_model("tiny3d", num_classes=3, pretrained_path=str(pth))
    _backbone_equal(model, backbone_ref, prefix="backbone.")
    assert model.head.weight.shape == (3, model.feature_dim)
    assert not torch.equal(model.head.weight[:3], trained.head.weight[:3])

    st = tmp_path / "tiny.safetensors"
    save_file(trained.state_dict(), str(st))
    model = build_model("tiny3d", num_classes=3, pretrained_path=str(st))
    _backbone_equal(model, backbone_ref, prefix="backbone.")

    # the bare TinyC3D state dict ("torchvision-style" for our own network) is accepted too
    bare = tmp_path / "tiny_bare.pt"
    torch.save(trained.backbone.state_dict(), bare)
    model = build_model("tiny3d", num_classes=3, pretrained_path=str(bare))
    _backbone_equal(model, backbone_ref, prefix="backbone.")


def test_load_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="not found") as err:
        build_model("tiny3d", num_classes=3, pretrained_path=str(missing))
    assert str(missing) in str(err.value)

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    with pytest.raises(ModelError) as err:
        build_model("mc3_18", num_classes=3, pretrained_path=str(resnet))
    msg = str(err.value)
    assert "'mc3_18'" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "layer1.0.conv1.0.weight" in msg and "bn1.bias" in msg  # offending keys are quoted
    assert "seems to be for framepool_resnet18" in msg

    narrow = tmp_path / "narrow.pt"
    torch.save(TinyC3D(widths=(8, 16, 32, 64)).state_dict(), narrow)
    with pytest.raises(ModelError, match="shape mismatches") as err:
        build_model("tiny3d", num_classes=3, pretrained_path=str(narrow))
    assert "seems to be for tiny3d" in str(err.value)

    pickled = tmp_path / "object.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(ModelError, match="cannot read weights") as err:
        build_model("tiny3d", num_classes=3, pretrained_path=str(pickled))
    assert "pickled" in str(err.value)

    not_tensors = tmp_path / "strings.pt"
    torch.save({"blocks.0.0.weight": "oops"}, not_tensors)
    with pytest.raises(ModelError, match="non-tensor entries"):
        build_model("tiny3d", num_classes=3, pretrained_path=str(not_tensors))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_model("tiny3d", num_classes=3, pretrained_path=str(garbage))


def _train_step(model: VideoClassifier) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(_clip()), torch.tensor([0, 1]))
    loss.backward()
    opt.step()


def test_freeze_backbone_updates_only_head() -> None:
    model = build_model("tiny3d", num_classes=2, freeze_backbone=True)
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model)
    assert model.training and not model.backbone.training
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(after[key], value), key  # params and BN running stats
    assert not torch.equal(after["head.weight"], before["head.weight"])

    # control: without freezing, the same step changes weights and BN statistics
    free = build_model("tiny3d", num_classes=2)
    ref = {k: v.clone() for k, v in free.state_dict().items()}
    _train_step(free)
    assert not torch.equal(
        free.state_dict()["backbone.blocks.0.1.running_mean"], ref["backbone.blocks.0.1.running_mean"]
    )
    assert not torch.equal(free.state_dict()["backbone.blocks.0.0.weight"], ref["backbone.blocks.0.0.weight"])


def test_freeze_s3d_updates_only_head() -> None:
    model = build_model("s3d", num_classes=2, freeze_backbone=True)
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head) == 1024 * 2 + 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model)
    assert model.training and not model.backbone.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_freeze_framepool_keeps_attention_trainable() -> None:
    model = build_model("framepool_resnet18", num_classes=2, pooling="attention")
    model.train()
    freeze_backbone(model)  # the module function, applied to a model already in train mode
    assert not model.backbone.net.training and model.head.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "backbone.attention.weight", "backbone.attention.bias"}


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        select_device("tpu")
    with pytest.raises(ModelError, match="cuda:N"):
        select_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the no-CUDA error cannot occur")
def test_select_cuda_without_cuda() -> None:
    for pref in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match="CUDA is not available"):
            select_device(pref)


def test_cpu_helpers_are_noops() -> None:
    cpu = torch.device("cpu")
    model = prepare_model(build_model("tiny3d", num_classes=3), cpu, channels_last=True)
    conv = model.backbone.blocks[0][0].weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last_3d)
    x = input_to_device(_clip(), cpu, channels_last=True)
    assert x.is_contiguous()
    ctx = autocast_context(cpu, bf16=True)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert model(x).dtype == torch.float32
    # the layout used on CUDA matches each model's conv rank
    assert _channels_last_format(model) == torch.channels_last_3d
    assert _channels_last_format(build_model("framepool_resnet18", num_classes=3)) == torch.channels_last
