"""The benchmark scripts run end to end on tiny sizes and print sane numbers (no timing asserted)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench import aggregation, bytes_per_round, client_throughput, federation_overhead, secagg_cost


def _positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run(main, argv: list[str], tmp_path: Path, capsys) -> dict:
    out = tmp_path / "result.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert "|" in capsys.readouterr().out  # a table was printed
    return json.loads(out.read_text())


def test_aggregation_benchmark(tmp_path: Path, capsys) -> None:
    argv = ["--model", "tiny3d", "--clients", "3", "--repeats", "1", "--threads", "1", "2"]
    result = _run(aggregation.main, argv, tmp_path, capsys)
    assert result["input-bytes"] == 3 * result["model-bytes"] > 0
    assert _positive(result["bound-s"])
    names = [row["function"] for row in result["rows"]]
    for expected in ("fedavg", "average", "weighted_average", "coordinate_median", "geometric_median"):
        assert expected in names
    assert any(n.startswith("trimmed_mean") for n in names) and any(n.startswith("krum") for n in names)
    for row in result["rows"]:
        assert _positive(row["best-s"]) and math.isfinite(row["x-bound"]) and row["x-bound"] > 0
        assert row["peak-extra-bytes"] >= 0
    assert result["threads"] == [1, 2] and {r["threads"] for r in result["rows"]} == {1, 2}
    # fedavg allocates its output model and at most a block buffer and a block result per thread,
    # nothing that grows with the model
    from strategies.blocks import BLOCK_BYTES

    for fedavg in (r for r in result["rows"] if r["function"] == "fedavg"):
        extra = fedavg["peak-extra-bytes"] - result["model-bytes"]
        assert 0 <= extra <= fedavg["threads"] * 2 * BLOCK_BYTES + 65536


def test_secagg_cost_benchmark(tmp_path: Path, capsys, cache_dir) -> None:
    """One secure and one plain round of 3 sites: the secure one sends about the same model bytes
    (masked uint32 for float32) plus its key messages, and its protocol parts are timed."""
    argv = ["--sites", "3", "--models", "tiny3d", "--threads", "1", "--cache-dir", str(cache_dir)]
    result = _run(secagg_cost.main, argv, tmp_path, capsys)
    (row,) = result["rounds"]
    plain, secure = row["plain"], row["secure"]
    assert secure["contributors"] == plain["contributors"] == 3
    assert 1.0 < secure["bytes-up"] / plain["bytes-up"] < 1.05 and secure["bytes-down"] >= plain["bytes-down"]
    (protocol,) = result["protocol"]
    assert protocol["params"] > 0 and all(_positive(protocol[k]) for k in ("share-keys-s", "mask-s", "unmask-s"))


def test_bytes_per_round_benchmark(tmp_path: Path, capsys) -> None:
    result = _run(bytes_per_round.main, ["--models", "tiny3d", "--clients", "3"], tmp_path, capsys)
    (model,) = result["models"]
    rows = {row["setting"]: row for row in model["rows"]}
    assert set(rows) == {"none", "fp16", "int8", "topk 0.1", "topk 0.01"}
    assert rows["none"]["up-bytes"] == rows["none"]["down-bytes"] == 3 * model["model-bytes"]
    for row in rows.values():
        assert _positive(row["up-bytes"]) and _positive(row["up-vs-none"]) and _positive(row["total-vs-none"])
        assert row["up-vs-none"] <= 1
    # the codec shrinks in the expected order
    assert rows["int8"]["up-bytes"] < rows["fp16"]["up-bytes"] < rows["none"]["up-bytes"]
    assert rows["topk 0.01"]["up-bytes"] < rows["topk 0.1"]["up-bytes"] < rows["fp16"]["up-bytes"]
    assert rows["none"]["delta-rel-error"] == 0


def test_federation_overhead_benchmark(tmp_path: Path, capsys) -> None:
    argv = [
        "--clients",
        "2",
        "--rounds",
        "1",
        "--classes",
        "2",
        "--videos-per-class",
        "6",
        "--frames",
        "6",
        "--size",
        "16",
        "--clip-len",
        "4",
        "--batch-size",
        "4",
        "--eval-clips",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = _run(federation_overhead.main, argv, tmp_path, capsys)
    fed, cent = result["federated"], result["centralized"]
    assert _positive(fed["total-s"]) and _positive(cent["total-s"]) and _positive(result["ratio"])
    assert _positive(result["train-ratio"])
    assert fed["steps"] >= cent["steps"] > 0
    assert _positive(fed["breakdown-s"][federation_overhead.CLIENT_TRAIN])
    assert _positive(fed["breakdown-s"][federation_overhead.CENTRAL_EVAL])
    assert _positive(fed["breakdown-s"][federation_overhead.AGGREGATION])
    # self-times never double count: the categories add up to the wall time
    assert math.isclose(sum(fed["breakdown-s"].values()), fed["total-s"], rel_tol=1e-9)


def test_client_throughput_benchmark(tmp_path: Path, capsys) -> None:
    argv = [
        "--models",
        "tiny3d",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--batch-size",
        "2",
        "--clip-len",
        "4",
        "--size",
        "16",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = _run(client_throughput.main, argv, tmp_path, capsys)
    assert result["modes"] == ["limit", "cold", "cached"]
    (row,) = result["rows"]
    for mode in result["modes"]:
        assert _positive(row[f"{mode}-clips-per-s"]) and _positive(row[f"{mode}-vs-limit"])
    assert all(_positive(v) for v in result["decode-only-clips-per-s"].values())


def test_robustness_benchmark(tmp_path: Path, cache_dir: Path, capsys) -> None:
    """The attack × rule table: every cell a mean ± std over the seeds, raw numbers in the JSON."""
    from bench import robustness

    args = ["--clients", "5", "--attackers", "1", "--rounds", "1", "--seeds", "0", "1", "--threads", "1"]
    args += ["--partitionings", "iid", "--attacks", "none", "alie", "--rules", "fedavg", "krum"]
    assert robustness.main([*args, "--out", str(tmp_path), "--cache-dir", str(cache_dir)]) == 0
    table = (tmp_path / "robustness.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| none |", "| alie |"))]
    assert "| attack | fedavg | krum |" in table and [row.count(" ± ") for row in rows[:2]] == [2, 2]
    # then each cell's paired difference to attack-free fedavg on the same seeds
    assert "**iid, paired difference to attack-free fedavg**" in table
    assert rows[2].startswith("| none | +0.000 [+0.000, +0.000] no difference | ") and " [" in rows[3]
    raw = json.loads((tmp_path / "robustness.json").read_text())
    assert all(len(v) == 2 for v in raw["final-video-accuracy"]["iid"]["alie"].values())  # one per seed
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_heterogeneity_benchmark(tmp_path: Path, cache_dir: Path, capsys) -> None:
    """The label skew × method table: central, sites' mean and worst-site cells, mean ± std over the
    seeds, then paired differences to FedAvg; a personalized method's sites use their own models."""
    from bench import heterogeneity

    args = ["--clients", "3", "--rounds", "1", "--seeds", "0", "1", "--threads", "1"]
    args += ["--partitionings", "dirichlet-0.3", "--methods", "fedavg", "fedper", "--min-partition-videos", "4"]
    assert heterogeneity.main([*args, "--out", str(tmp_path), "--cache-dir", str(cache_dir)]) == 0
    table = (tmp_path / "heterogeneity.md").read_text()
    assert "**central**" in table and "**sites, mean**" in table and "**worst site**" in table
    rows = [line for line in table.splitlines() if line.startswith(("| fedavg |", "| fedper |"))]
    assert len(rows) == 8 and all(row.count(" ± ") == 1 for row in rows[:6])
    # then fedper's paired difference to fedavg on the same 2 seeds: mean [95 % interval] verdict
    assert "**central, paired difference to fedavg**" in table
    assert "**sites, mean, paired difference to fedavg**" in table
    for row in rows[6:]:
        assert re.fullmatch(r"\| fedper \| [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] [a-z ]+ \|", row)
    raw = json.loads((tmp_path / "heterogeneity.json").read_text())
    for measure in heterogeneity.MEASURES:
        assert all(len(v) == 2 for v in raw[measure]["dirichlet-0.3"].values())  # one per seed
    central, worst = raw["central-video-accuracy"], raw["worst-site-video-accuracy"]
    assert all(0 <= w <= 1 for w in worst["dirichlet-0.3"]["fedavg"]) and central
    assert set(raw["fewest-test-videos-per-site"]) == {"dirichlet-0.3-0", "dirichlet-0.3-1"}
    assert (tmp_path / "heterogeneity.png").stat().st_size > 0


def test_site_figures_use_the_personal_model_where_a_site_has_one() -> None:
    from bench.heterogeneity import site_model_figures

    plain = {"mean": 0.4, "worst": 0.1, "sites": []}
    assert site_model_figures(plain) == {"mean": 0.4, "worst": 0.1}
    personal = {**plain, "personal": {"mean": 0.9, "worst": 0.7, "sites": 3, "worst-site": "partition 2"}}
    assert site_model_figures(personal)["mean"] == 0.9


def test_every_heterogeneity_cell_is_a_valid_run_config() -> None:
    import argparse

    from bench import heterogeneity
    from fedapp.task.config import parse_config

    args = argparse.Namespace(clients=10, rounds=20, threads=1, cache_dir="", classes=8, videos_per_class=35,
                              min_partition_videos=1, pretrained_path="/w.safetensors")  # fmt: skip
    for partitioning in heterogeneity.PARTITIONINGS:
        for method in heterogeneity.METHODS:
            cfg = parse_config(heterogeneity.run_config(args, partitioning, method, 0, ""), check_paths=False)
            assert cfg.fraction_evaluate == 1.0 and cfg.scaffold == (method == "scaffold")
            assert cfg.pretrained_path == "/w.safetensors"


def test_every_robustness_cell_is_a_valid_run_config() -> None:
    import argparse

    from bench import robustness
    from bench.attacks import split_attack
    from fedapp.task.config import parse_config

    args = argparse.Namespace(attackers=3, clients=10, rounds=20, threads=1, cache_dir="", root_dir="/root-set")
    for rule in robustness.RULES:
        for attack in robustness.ATTACKS:
            if not robustness.applies(attack, rule):
                assert attack == "fltrust-adaptive" and rule != "fltrust"
                continue
            plan, run_config = split_attack(robustness.run_config(args, "iid", attack, rule, 0))
            assert (plan is None) == (attack == "none")
            cfg = parse_config(run_config, check_paths=False)
            assert cfg.nnm_malicious == (3 if rule.startswith("nnm") or "+nnm" in rule else 0)
            assert cfg.arc_malicious == (3 if rule.startswith("arc+") else 0)
            assert cfg.fltrust_root_dir == ("/root-set" if rule == "fltrust" else "")
            assert cfg.client_momentum == (0.5 if rule.startswith("momentum+") else 0.0)
            # rounds go on without the f replies screening may reject (free riders), Krum's 2f + 3 aside
            assert cfg.min_train_nodes == (9 if rule == "krum" else 7)


def test_a_stopped_robustness_grid_keeps_its_finished_runs(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from bench import robustness

    calls = []

    def fake_run(config, clients, run_dir):
        calls.append(config["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the grid during its third run
        return SimpleNamespace(rounds=[{"central": {"video-accuracy": 0.5 + 0.1 * len(calls)}}])

    monkeypatch.setattr(robustness, "run_inprocess", fake_run)
    args = ["--seeds", "0", "1", "--partitionings", "iid", "--attacks", "none", "alie", "--rules", "fedavg"]
    with pytest.raises(KeyboardInterrupt):
        robustness.main([*args, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["partial"] is True
    assert saved["final-video-accuracy"]["iid"] == {"none": {"fedavg": [0.6, 0.7]}}  # the two finished runs
    out = tmp_path / "table"
    assert robustness.main(["--merge", str(tmp_path), "--out", str(out)]) == 0
    table = (out / "robustness.md").read_text()
    assert "**Partial**" in table and "| none | 0.650 ± 0.071 |" in table and "| alie |" not in table


def test_robustness_parts_merge(tmp_path: Path) -> None:
    """Parts of the grid run side by side merge into one table; parts of another setting are refused."""
    from bench import robustness

    setting = {"rounds": 20, "clients": 10, "attackers": 3, "seeds": [0, 1]}
    parts = [
        {"setting": setting, "commands": [{"command": f"part {k}", "wall-time-s": 60.0}],
         "final-video-accuracy": {"iid": {"alie": {rule: [0.5, 0.7]}}},
         "video-accuracy-per-round": {f"iid-alie-{rule}-0": [0.1, 0.5]}}
        for k, rule in enumerate(["fedavg", "median"])
    ]  # fmt: skip
    parts[1]["final-video-accuracy"]["iid"]["none"] = {"median": [0.8, 0.8]}
    for k, part in enumerate(parts):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "robustness.json").write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert robustness.main(["--merge", str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(out)]) == 0
    table = (out / "robustness.md").read_text()
    assert "| attack | fedavg | median |" in table
    assert "| alie | 0.600 ± 0.141 | 0.600 ± 0.141 |" in table
    assert "| none | — | 0.800 ± 0.000 |" in table  # a cell no part ran is shown as missing, not as 0
    assert "`part 0` (1 min); `part 1` (1 min)" in table
    assert len(json.loads((out / "robustness.json").read_text())["video-accuracy-per-round"]) == 2

    parts[1]["setting"] = {**setting, "rounds": 5}
    (tmp_path / "1" / "robustness.json").write_text(json.dumps(parts[1]))
    with pytest.raises(SystemExit, match="different settings"):
        robustness.main(["--merge", str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_compare_strategies_benchmark(tmp_path: Path, cache_dir: Path) -> None:
    from bench import compare_strategies

    # One strategy on 10 videos per class: the script's table, JSON and plot are under test, not the
    # learning (two strategies on the default's 35 took 50 s).
    args = ["--rounds", "1", "--clients", "7", "--scenarios", "30%-sign-flip", "--strategies", "krum"]
    args += ["--videos-per-class", "10"]
    assert compare_strategies.main([*args, "--out", str(tmp_path), "--cache-dir", str(cache_dir)]) == 0
    table = (tmp_path / "strategies.md").read_text()
    assert "| krum |" in table and "synthetic default with 10 videos per class" in table
    saved = json.loads((tmp_path / "strategies.json").read_text())
    assert (
        saved["config"]["synthetic-videos-per-class"] == 10
        and len(saved["video-accuracy"]["30%-sign-flip"]["krum"]) == 2
    )


def test_scale_growth_exponent_is_the_power_law_slope() -> None:
    from bench.scale import growth_exponent

    sizes = [10, 50, 100, 200]
    assert growth_exponent(sizes, [3.0 * n**1.5 for n in sizes]) == pytest.approx(1.5)
    assert growth_exponent(sizes, [0.7] * 4) == pytest.approx(0.0)
    assert growth_exponent(sizes, [2.0 * n for n in sizes]) == pytest.approx(1.0)
    assert math.isnan(growth_exponent([10], [1.0])) and math.isnan(growth_exponent([10, 20], [0.0, 1.0]))


def _round(number: int, clients: int, round_s: float = 1.0) -> dict:
    trained = [{"train-clips": 4.0, "clips-per-s": 20.0} for _ in range(clients)]
    return {
        "round": number,
        "train-clients": {"clients": trained},
        "round-time-s": round_s,
        "server-s": 0.1,
        "server-peak-rss-mb": 900.0 + number,
    }


def test_scale_round_costs_refuse_a_run_that_did_not_train_every_sampled_client() -> None:
    from bench.scale import round_costs

    rounds = [{"round": 0, "wall-time-s": 1.0}, _round(1, 3, 9.0), _round(2, 3, 2.0), _round(3, 3, 4.0)]
    costs = round_costs(rounds, num_rounds=3, sampled=3)
    assert costs["first-round-s"] == 9.0 and costs["round-s"] == pytest.approx(3.0)  # round 1 on its own
    assert costs["client-train-s"] == pytest.approx(0.2) and costs["server-peak-rss-mb"] == 903.0
    with pytest.raises(ValueError, match="3 trained clients"):
        round_costs([*rounds[:3], _round(3, 2)], num_rounds=3, sampled=3)
    with pytest.raises(ValueError, match="expected 3 rounds"):
        round_costs(rounds[:3], num_rounds=3, sampled=3)


def test_scale_report_flags_a_super_linear_cost() -> None:
    from bench.scale import COSTS, report

    runs = [{"clients": n, **{k: 1.0 for k in COSTS}} for n in (10, 100)]
    result = {"settings": {"sampled": 10, "rounds": 3, "videos-per-client": 3}, "runs": runs}
    result["exponents"] = {k: 0.0 for k in COSTS}
    assert "SUPER-LINEAR" not in report(result)
    result["exponents"]["round-s"] = 1.6
    assert "SUPER-LINEAR in N: round s (exp 1.60)" in report(result)


@pytest.mark.parametrize("n", [10, 200])
def test_scale_run_config_samples_the_same_sites_from_every_federation(n: int, tmp_path: Path) -> None:
    """The benchmark's run config is valid, needs all N sites and trains exactly --sampled of them."""
    import argparse

    from bench.scale import run_config
    from datasets.synthetic import _test_groups, _video_groups
    from fedapp.ops.start_checks import check_run_config

    args = argparse.Namespace(rounds=3, sampled=10, videos_per_client=3, classes=8, seed=0)
    cfg = check_run_config([run_config(n, args, tmp_path / "results", tmp_path / "cache")], f"num-supernodes={n}")
    assert cfg.min_available_nodes == n and not cfg.central_eval
    assert max(int(n * cfg.fraction_train), cfg.min_train_nodes) == 10  # Flower's sample size
    spec = cfg.synthetic_spec
    train_groups = [g for g, _ in _video_groups(spec.videos_per_class) if g not in _test_groups(cfg.fold)]
    assert 3 <= len(train_groups) * spec.num_classes / n < 3.5  # ~3 training videos per site


def test_scale_memory_sampler_counts_child_processes() -> None:
    """The simulation's memory is mostly in processes the launcher does not run itself (Ray)."""
    import os
    import subprocess
    import sys

    from bench.scale import tree_pss_mb

    before = tree_pss_mb(os.getpid())
    touch = "x = bytearray(200 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint(flush=True)\ninput()"
    child = subprocess.Popen([sys.executable, "-c", touch], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()  # its 200 MiB are written
        assert tree_pss_mb(os.getpid()) - before > 180
    finally:
        child.communicate("")


def test_determinism_benchmark(tmp_path: Path, cache_dir: Path, capsys) -> None:
    from bench import determinism

    assert determinism.main(["--rounds", "1", "--clients", "3", "--repeats", "1", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "ratio on/off: " in out and "bit-identical: True" in out


def test_pretraining_on_a_disjoint_task_gives_a_backbone_for_pretrained_path(tmp_path: Path, cache_dir: Path) -> None:
    """bench/pretrain.py trains on the classes a 4-class federated run lacks; the file loads as
    ``pretrained-path`` (same backbone, a new 4-class head)."""
    from safetensors.numpy import load_file

    from bench import pretrain
    from fedapp.task.models import build_model

    out = tmp_path / "pretrained.safetensors"
    args = ["--out", str(out), "--videos-per-class", "6", "--epochs", "1", "--threads", "1"]
    assert pretrain.main([*args, "--cache-dir", str(cache_dir)]) == 0
    saved = load_file(str(out))
    assert saved["head.weight"].shape[0] == 4  # rotations and zooms: none of the federated classes
    model = build_model("tiny3d", 4, pretrained_path=str(out))
    state = model.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in saved.items() if k.startswith("backbone."))
