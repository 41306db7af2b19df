import tomllib
from dataclasses import asdict

import pytest

from fedapp.task.config import AppConfig, ConfigError, parse_config, parse_size, resolve_preset
from tests.conftest import PROJECT_DIR


def pyproject_config() -> dict:
    return tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_knob_with_the_code_defaults():
    declared = pyproject_config()
    assert set(declared) == set(AppConfig().to_dict())
    # resize="auto" / crop-size=0 resolve to the preset at parse time, from the file as from the code
    assert parse_config(declared) == resolve_preset(AppConfig())
    assert declared == AppConfig().to_dict()


def test_the_documentation_lists_every_key():
    """The README (and the Configuration page) link the key reference, which has a row for every key."""
    readme = (PROJECT_DIR / "README.md").read_text()
    assert "(docs/config-keys.md)" in readme
    assert "(config-keys.md)" in (PROJECT_DIR / "docs" / "configuration.md").read_text()
    reference = (PROJECT_DIR / "docs" / "config-keys.md").read_text()
    missing = [k for k in pyproject_config() if f"| `{k}` |" not in reference]
    assert not missing, f"docs/config-keys.md does not document {missing}"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model", "resnet9000", ["model", "resnet9000", "tiny3d", "r3d_18"]),
        ("fraction-train", 1.5, ["fraction-train", "1.5", "(0.0, 1.0]"]),
        ("fraction-train", 0.0, ["fraction-train", "0.0"]),
        ("strategy", "fedsgd", ["strategy", "fedsgd", "fedavg"]),
        ("dataset", "kinetics", ["dataset", "kinetics", "ucf101", "synthetic"]),
        ("partitioning", "random", ["partitioning", "random", "dirichlet"]),
        ("optimizer", "lion", ["optimizer", "lion", "adamw"]),
        ("num-server-rounds", 0, ["num-server-rounds", "0"]),
        ("batch-size", "8", ["batch-size", "'8'", "int"]),
        ("bf16", 1, ["bf16", "bool"]),
        ("resize", "big", ["resize", "big", "HxW"]),
        ("crop-size", 200, ["crop-size", "200"]),
        ("device", "tpu", ["device", "tpu", "cuda"]),
        ("synthetic-classes", 3, ["synthetic-classes", "3"]),
        ("fusion-fn", "mean", ["fusion-fn", "mean", "geometric-median", "krum", "feddf"]),
        ("weight-source", "luck", ["weight-source", "luck", "inverse-loss", "staleness"]),
        ("trim-beta", 0.5, ["trim-beta", "0.5"]),
        ("server-momentum", 1.5, ["server-momentum", "1.5"]),
        ("partitioning", "random", ["partitioning", "random", "dirichlet"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, expected):
    with pytest.raises(ConfigError) as info:
        parse_config({key: value})
    for text in expected:
        assert text in str(info.value)


def test_missing_data_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data-dir=''"):
        parse_config({"dataset": "ucf101"})
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config({"dataset": "ucf101", "data-dir": str(missing)})
    # the same config is accepted when paths are not checked (a SuperNode brings its own data-dir)
    assert parse_config({"dataset": "ucf101", "data-dir": str(missing)}, check_paths=False).dataset == "ucf101"


def test_missing_pretrained_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pretrained-path"):
        parse_config({"pretrained-path": str(tmp_path / "w.pt")})


def test_min_nodes_must_be_consistent():
    with pytest.raises(ConfigError, match="min-available-nodes"):
        parse_config({"min-available-nodes": 2, "min-train-nodes": 3})


def test_ints_are_accepted_where_floats_are_meant():
    cfg = parse_config({"lr": 1, "fraction-train": 1})
    assert isinstance(cfg.lr, float) and cfg.fraction_train == 1.0


def test_parse_size_and_clip_spec():
    assert parse_size("128x171", "resize") == (128, 171)
    assert parse_size("64", "resize") == (64, 64)
    cfg = parse_config({"resize": "128x171", "crop-size": 112, "clip-len": 8, "clip-stride": 2})
    assert cfg.clip_spec.resize == (128, 171) and cfg.clip_spec.crop_size == 112
    assert cfg.clip_spec.clip_len == 8 and cfg.clip_spec.stride == 2


def test_to_dict_uses_toml_names():
    d = AppConfig().to_dict()
    assert d["num-server-rounds"] == AppConfig().num_server_rounds
    assert len(d) == len(asdict(AppConfig()))


def test_krum_needs_enough_clients():
    with pytest.raises(ConfigError, match="krum-malicious=1 needs min-train-nodes > 2·1\\+2 = 4"):
        parse_config({"strategy": "fusion", "fusion-fn": "krum", "krum-malicious": 1})
    assert (
        parse_config(
            {
                "strategy": "fusion",
                "fusion-fn": "krum",
                "krum-malicious": 1,
                "min-train-nodes": 5,
                "min-available-nodes": 5,
            }
        ).fusion_fn
        == "krum"
    )
