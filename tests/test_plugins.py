"""A user's own aggregation rule (``fusion-fn = "module:function"``) and model (``model =
"module:builder"``): the documented examples train through a real launch; mistakes are refused at
start with the key named; a bad result in a round is refused, not used; a new rule file in
strategies/aggregators/ is found with nothing else edited."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.inprocess import run_inprocess
from fedapp.plugins import PluginError
from fedapp.server.build_strategy import check_plugins
from fedapp.task.config import ConfigError, parse_config
from strategies import stage
from strategies.plugin_rule import PluginRule
from strategies.stage import RoundContext, Update

RULE = "docs.examples.my_rule:clipped_mean"
MODEL = "docs.examples.my_model:build"


DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def doc_blocks() -> list[str]:
    """The Python code blocks of docs/extending.md."""
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_docs_show_the_example_rule_as_it_is():
    example = (DOC.parent / "examples" / "my_rule.py").read_text()
    assert doc_blocks()[0].strip() in example


def updates(*values: float) -> list[Update]:
    return [Update({"w": np.full(3, v, np.float32), "n": np.array(4, np.int64)}, 1.0, [i + 1]) for i, v in
            enumerate(values)]  # fmt: skip


def test_the_example_rule_is_a_robust_mean_cast_to_the_models_dtypes():
    from docs.examples.my_rule import clipped_mean

    ups = updates(1.0, 2.0, 3.0, 1000.0)
    merged, info = PluginRule(RULE, clipped_mean).aggregate(ups, RoundContext(1, ups[0].model))
    assert merged["w"].dtype == np.float32 and merged["n"].dtype == np.int64
    assert np.all(merged["w"] < 4.0)  # the outlier at 1000 is clipped to the median distance
    assert info == {"rule": RULE, "radius": pytest.approx(np.sqrt(3) * 1.0), "clipped": 2}


def test_a_rule_or_model_that_cannot_work_is_refused_at_start_with_the_key_named():
    fusion = {"strategy": "fusion", "fusion-fn": RULE, "model": MODEL}
    check_plugins(parse_config(fusion, check_paths=False))  # the examples pass
    cases = {
        "nosuch_module:rule": "could not import 'nosuch_module'",
        "docs.examples.my_rule:missing": "has no attribute 'missing'",
        MODEL: "cannot be called as (models, weights)",  # a model builder is not a rule
        "numpy:median": "failed on three toy models",  # median(models, weights): axis=weights fails
    }
    for spec, expected in cases.items():
        with pytest.raises(PluginError) as error:
            check_plugins(parse_config({"strategy": "fusion", "fusion-fn": spec}, check_paths=False))
        assert f'fusion-fn="{spec}"' in str(error.value) and expected in str(error.value)
    with pytest.raises(ConfigError, match="model='docs.examples.my_model:build'.*leave these keys out"):
        parse_config({"model": MODEL, "freeze-backbone": True}, check_paths=False)


def test_a_rule_whose_result_is_unlike_the_model_keeps_the_global_model(small_run_config, tmp_path, monkeypatch):
    """Checked like a client's reply: a merged model missing a tensor is refused in the round (the
    global model kept, the reason recorded), never stepped into the model."""
    (tmp_path / "bad_rule.py").write_text(
        textwrap.dedent(
            """
            def drop_one(models, weights):
                merged = dict(models[0])
                if len(merged) > 2:  # real models only: the start check's toy models pass
                    merged.pop(sorted(merged)[0])
                return merged
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {**small_run_config, "strategy": "fusion", "fusion-fn": "bad_rule:drop_one", "num-server-rounds": 1,
              "fraction-evaluate": 0.0}  # fmt: skip
    with pytest.raises(Exception, match="no round"):
        run_inprocess(config, 2, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[1])
    assert "bad_rule:drop_one returned a model unlike the global one" in record["train-clients"]["skipped"]


def test_a_new_rule_file_is_found_with_nothing_else_edited(small_run_config, tmp_path, monkeypatch):
    """What docs/extending.md shows: one file in strategies/aggregators/ makes a new fusion-fn, its
    keys validated like the built-ins' (here the file lies in a folder added to the package path)."""
    import strategies.aggregators

    (tmp_path / "coordinate_max.py").write_text(doc_blocks()[-1])  # the file docs/extending.md shows
    monkeypatch.setattr(strategies.aggregators, "__path__", [*strategies.aggregators.__path__, str(tmp_path)])
    monkeypatch.setattr(stage, "_REGISTRY", {kind: dict(found) for kind, found in stage._REGISTRY.items()})
    from fedapp.task import config as config_module

    monkeypatch.setattr(config_module, "AppConfig", config_module.app_config_class())
    assert "coordinate-max" in stage.fusion_rules()
    with pytest.raises(ConfigError, match="max-shrink=2.0 is out of range"):
        config_module.parse_config({"strategy": "fusion", "fusion-fn": "coordinate-max", "max-shrink": 2.0},
                                   check_paths=False)  # fmt: skip
    with pytest.raises(ConfigError, match='max-shrink=0.5 belongs to aggregator "coordinate-max"'):
        config_module.parse_config({"max-shrink": 0.5}, check_paths=False)
    config = {**small_run_config, "strategy": "fusion", "fusion-fn": "coordinate-max", "max-shrink": 1.0,
              "num-server-rounds": 1, "fraction-evaluate": 0.0}  # fmt: skip
    results = run_inprocess(config, 2, tmp_path / "run")
    assert results.rounds[1]["fusion"] == {"shrink": 1.0}


@pytest.mark.e2e
def test_the_example_rule_and_model_train_through_a_real_launch(small_run_config, tmp_path):
    """Both documented plug-ins in one `fedvideo run`: Flower ships them to the nodes in the app
    bundle, the clients train the user's model, the server merges with the user's rule."""
    from tests.test_e2e import launch

    config = {**small_run_config, "strategy": "fusion", "fusion-fn": RULE, "model": MODEL, "num-server-rounds": 2}
    rc, output, summary = launch(config, tmp_path)
    assert rc == 0, output[-3000:]
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2
    rounds = [json.loads(line) for line in (tmp_path / "results" / "run" / "rounds.jsonl").read_text().splitlines()]
    for record in rounds[1:]:
        assert record["fusion"]["rule"] == RULE and record["fusion"]["radius"] > 0
        assert len(record["train-clients"]["clients"]) == 3
    assert rounds[2]["central"]["loss"] != rounds[0]["central"]["loss"]  # the merged model moved
    from safetensors.numpy import load_file

    assert "9.weight" in load_file(tmp_path / "results" / "run" / "model.safetensors")  # the example's Linear
