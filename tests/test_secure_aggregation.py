"""Secure aggregation (SecAgg+, ``secagg = true``): the server unmasks the sites' weighted mean update
and nothing else; sites that drop out after sharing their keys do not break a round while their
neighbours can rebuild the secrets. The protocol's math alone, then whole in-process runs through
Flower's wire encoding; on real SuperNodes with TLS (a SuperNode killed mid-round):
tests/test_deploy.py."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from cryptography.fernet import InvalidToken
from flwr.app import Message

import bench.inprocess as inprocess
from bench.inprocess import run_inprocess
from fedapp.server.app import initial_model
from fedapp.server.results import load_weights
from fedapp.server.rounds import round_line
from fedapp.task.config import ConfigError, parse_config
from strategies.secure_aggregation import (
    MASKED,
    RECORD,
    STAGE,
    WEIGHT,
    SecAggError,
    Settings,
    neighbours,
    site_mask,
    site_receive_shares,
    site_reveal,
    site_setup,
    site_share_keys,
    sum_masked,
    unmask,
)


def protocol(updates, weights, settings, drop_after_keys=(), drop_after_mask=(), seed=0):
    """Run the four steps for the sites of ``updates`` ({node: {name: array}}) as the server and the
    sites would; sites in ``drop_after_keys`` vanish after sharing keys, ``drop_after_mask`` after
    sending their masked update (before unmask). Returns the unmasked outcome and the contributors."""
    nodes = sorted(updates)
    graph = neighbours(nodes, settings.num_shares, random.Random(seed))
    sites = {n: site_setup(n, settings) for n in nodes}
    publics = {n: (s.mask_public, s.share_public) for n, s in sites.items()}
    sent = {n: site_share_keys(sites[n], {m: publics[m] for m in graph[n]}) for n in nodes}
    sources = {n: {src: c[n] for src, c in sent.items() if n in c} for n in nodes}
    total, contributors = None, []
    for n in nodes:
        site_receive_shares(sites[n], sources[n])
        if n in drop_after_keys:
            continue
        total = sum_masked(total, site_mask(sites[n], updates[n], weights[n]), settings.modulus_range)
        contributors.append(n)
    dropped = [n for n in nodes if n not in contributors]
    seed_shares, key_shares = {}, {}
    for n in contributors:
        if n in drop_after_mask:
            continue
        holders = set(sources[n]) | {n}
        active, gone = sorted(holders & set(contributors)), sorted(holders & set(dropped))
        for owner, share in site_reveal(sites[n], active, gone).items():
            (seed_shares if owner in contributors else key_shares).setdefault(owner, []).append(share)
    masked_with = {d: [p for p in contributors if d in sources[p]] for d in dropped}
    mask_publics = {n: publics[n][0] for n in nodes}
    return unmask(total, settings, contributors, masked_with, mask_publics, seed_shares, key_shares), contributors


def updates_of(nodes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: {"conv.weight": rng.normal(0, 0.05, (4, 3, 3)), "head.bias": rng.normal(0, 1, (5,))} for n in nodes}


def weighted_mean(updates, weights, nodes):
    total = sum(weights[n] for n in nodes)
    return {k: sum(weights[n] * updates[n][k] for n in nodes) / total for k in updates[nodes[0]]}


@pytest.mark.parametrize(
    "drop_after_keys, drop_after_mask", [((), ()), ((33,), ()), ((), (44,)), ((33,), (44,)), ((22, 33), ())]
)
def test_the_unmasked_sum_is_the_weighted_mean_within_the_stated_bound(drop_after_keys, drop_after_mask):
    """Seven sites, each sharing with four others (threshold 3): whoever drops after sharing keys or
    after sending its masked update, the server's result is the survivors' weighted mean to within
    one quantization step per site over the summed weight; and that bound is not loose by orders."""
    nodes = [11, 22, 33, 44, 55, 66, 77]
    updates, weights = updates_of(nodes), {n: float(7 + 13 * i) for i, n in enumerate(nodes)}
    settings = Settings(num_shares=5, threshold=3)
    outcome, contributors = protocol(updates, weights, settings, drop_after_keys, drop_after_mask)
    assert contributors == [n for n in nodes if n not in drop_after_keys]
    exact = weighted_mean(updates, weights, contributors)
    errors = [float(np.abs(outcome.mean[k] - exact[k]).max()) for k in exact]
    assert max(errors) <= outcome.error_bound
    assert max(errors) > outcome.error_bound / 100  # the quantization is really there: the bound is not vacuous
    assert outcome.total_ratio * settings.max_weight == pytest.approx(sum(weights[n] for n in contributors), rel=1e-4)


def test_a_dropped_sites_masks_cannot_be_removed_below_the_threshold():
    """Three sites sharing with all (threshold 3): after one drops, two shares of its mask key exist,
    so neither it nor anyone's sum can be unmasked; the server is told why."""
    updates = updates_of([1, 2, 3])
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        protocol(updates, {1: 1.0, 2: 1.0, 3: 1.0}, Settings(num_shares=3, threshold=3), drop_after_keys=(3,))


def test_a_site_reveals_one_secret_per_neighbour_and_only_what_it_holds():
    settings = Settings(num_shares=3, threshold=2)
    sites = {n: site_setup(n, settings) for n in (1, 2, 3)}
    publics = {n: (s.mask_public, s.share_public) for n, s in sites.items()}
    sent = {n: site_share_keys(sites[n], publics) for n in sites}
    site_receive_shares(sites[1], {src: c[1] for src, c in sent.items() if src != 1})
    with pytest.raises(SecAggError, match="both secrets"):
        site_reveal(sites[1], active=[1, 2], dropped=[2])
    with pytest.raises(SecAggError, match="own mask key"):
        site_reveal(sites[1], active=[2, 3], dropped=[1])
    with pytest.raises(SecAggError, match="no shares"):
        site_reveal(sites[1], active=[1, 2, 9], dropped=[])
    # A share sent to site 2 cannot be read by site 1: it is encrypted for site 2 alone.
    with pytest.raises(InvalidToken):
        site_receive_shares(sites[1], {3: sent[3][2]})
    with pytest.raises(SecAggError, match="above secagg-max-weight"):
        site_mask(sites[1], {"w": np.zeros(3)}, weight=1001.0)


def test_the_sharing_graph_is_symmetric_and_sized_by_num_shares():
    nodes = list(range(1, 12))
    graph = neighbours(nodes, 5, random.Random(3))
    assert all(len(peers) == 5 and n in peers for n, peers in graph.items())
    assert all(n in graph[m] for n, peers in graph.items() for m in peers)
    assert all(graph[n] == nodes for n in nodes) == False  # noqa: E712  (not everyone: SecAgg+, not SecAgg)
    assert all(neighbours(nodes[:4], 5, random.Random(3))[n] == nodes[:4] for n in nodes[:4])


def test_config_refuses_rules_that_need_individual_updates():
    base = {"secagg": True}
    for extra, words in (
        ({"strategy": "fusion", "fusion-fn": "median"}, 'strategy="fusion"'),
        ({"strategy": "fusion", "fusion-fn": "feddf"}, 'strategy="fusion"'),
        ({"strategy": "weighted", "weight-source": "inverse-loss"}, "normalized over the round"),
        ({"scaffold": True}, "scaffold=true"),
        ({"dp": "server-side", "dp-noise-multiplier": 0.1}, "dp='server-side'"),
        ({"compression": "topk"}, "compression='topk'"),
        ({"norm-bound": 1.0}, "'norm-bound' stage"),
        ({"secagg-threshold": 4}, "secagg-threshold=4 is above secagg-num-shares=3"),
        ({"secagg-modulus-range": 3_000_000_000}, "power of 2"),
    ):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("=", "=")):
            parse_config({**base, **extra})
    for fine in ({}, {"strategy": "average"}, {"strategy": "weighted", "weight-source": "node"},
                 {"server-optimizer": "adam"}, {"proximal-mu": 0.01}):  # fmt: skip
        assert parse_config({**base, **fine}).secagg


def secure_config(small_run_config, sites, rounds=1, **extra):
    return {
        **small_run_config,
        "num-server-rounds": rounds,
        "min-train-nodes": 2,
        "min-available-nodes": sites,
        "fraction-evaluate": 0.0,
        "deterministic": True,
        "tensorboard": False,
        **extra,
    }


def model_of(run_dir):
    """A run's final model, its floating-point tensors (the secure sum's)."""
    arrays = load_weights(run_dir / "model.safetensors")
    return {k: v for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)}


def vanishing(node: int, stage: str, rounds=(1,)):
    """The app's ClientApp, except that ``node`` raises (drops out) at ``stage`` in ``rounds``
    (``"train"``: a plain run's train message)."""
    app = inprocess.client_app

    def client(msg: Message, context):
        record = msg.content.config_records.get(RECORD)
        at = record[STAGE] if record is not None else msg.metadata.message_type
        if context.node_id == node and at == stage and int(msg.metadata.group_id or 1) in rounds:
            raise ConnectionError(f"node {node} vanished at {stage}")
        return app(msg, context)

    return client


def test_a_secure_round_gives_fedavgs_model_and_the_server_sees_only_masked_updates(
    small_run_config, tmp_path, monkeypatch
):
    """Three sites, deterministic (the same updates in both runs): the secure run's global model is
    the plain FedAvg run's within the round's recorded error bound (and a second secure run's to the
    bit), and every reply the server pulled carries no floating-point tensor: masked updates only,
    uniform over the modulus."""
    pulled: list[Message] = []
    pull = inprocess.InProcessGrid.pull_messages

    def recording(self, ids):
        replies = pull(self, ids)
        pulled.extend(replies)
        return replies

    monkeypatch.setattr(inprocess.InProcessGrid, "pull_messages", recording)
    plain = run_inprocess(secure_config(small_run_config, 3), 3, tmp_path / "plain", wire=True)
    pulled.clear()
    secure = run_inprocess(secure_config(small_run_config, 3, secagg=True), 3, tmp_path / "secure", wire=True)
    record = secure.rounds[1]["fusion"]["secagg"]
    assert record["contributors"] == 3 and record["dropped"] == []
    config = parse_config(secure_config(small_run_config, 3, secagg=True))
    assert "fedavg + secagg · " in round_line(secure.rounds[1], config)
    assert json.loads((secure.dir / "summary.json").read_text())["secagg"] is True
    expected, got = model_of(plain.dir), model_of(secure.dir)
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert worst <= record["error-bound"] + 1e-6
    start = initial_model(parse_config(secure_config(small_run_config, 3)), got["head.bias"].shape[0])
    moved = max(float(np.abs(got[k] - v.numpy()).max()) for k, v in start.state_dict().items() if k in got)
    assert moved > 10 * record["error-bound"]  # the round really trained: the bound is small beside it

    # deterministic=true: masks are random but cancel exactly, the rounding follows the seed.
    again = run_inprocess(secure_config(small_run_config, 3, secagg=True), 3, tmp_path / "again", wire=True)
    assert all(np.array_equal(v, model_of(again.dir)[k]) for k, v in got.items())

    masked = [r for r in pulled if MASKED in r.content.array_records]
    assert len(masked) == 6  # three sites, two secure runs
    for reply in pulled:
        for array_record in reply.content.array_records.values():
            for array in array_record.values():
                assert not np.issubdtype(array.numpy().dtype, np.floating)
    for reply in masked:
        values = np.concatenate([a.numpy().ravel() for n, a in reply.content[MASKED].items() if n != WEIGHT])
        assert values.dtype == np.uint32
        assert abs(values.mean() / 2**32 - 0.5) < 0.01  # masked: uniform; a quantized update sits near 2^21


def test_a_site_vanishing_after_sharing_keys_leaves_the_others_mean(small_run_config, tmp_path, monkeypatch):
    """Node 3 of three vanishes at the masked-update step (after its shares went out). Threshold 2:
    the round unmasks the other two and equals plain FedAvg of the same two sites (node 3 failing
    its train step). Threshold 3: the round keeps the global model and says why; the next one trains."""
    monkeypatch.setattr(inprocess, "client_app", vanishing(3, "train"))
    plain = run_inprocess(secure_config(small_run_config, 3), 3, tmp_path / "plain", wire=True)
    monkeypatch.setattr(inprocess, "client_app", vanishing(3, "masked-update"))
    secure = run_inprocess(secure_config(small_run_config, 3, secagg=True), 3, tmp_path / "secure", wire=True)
    record = secure.rounds[1]["fusion"]["secagg"]
    assert (record["shared-keys"], record["contributors"], record["dropped"]) == (3, 2, [3])
    expected, got = model_of(plain.dir), model_of(secure.dir)
    assert max(float(np.abs(got[k] - expected[k]).max()) for k in expected) <= record["error-bound"] + 1e-6

    config = secure_config(small_run_config, 3, rounds=2, secagg=True, **{"secagg-threshold": 3})
    kept = run_inprocess(config, 3, tmp_path / "kept", wire=True)
    first, second = kept.rounds[1:]
    assert "fewer than the threshold 3" in first["train-clients"]["skipped"]
    assert "global model kept" in first["train-clients"]["skipped"]
    assert second["fusion"]["secagg"]["contributors"] == 3 and not second["train-clients"]["skipped"]


def garbling(node: int, stage: str, values: dict):
    """The app's ClientApp, except that ``node``'s reply to round 1's ``stage`` carries ``values``."""
    from flwr.app import ConfigRecord, RecordDict

    app = inprocess.client_app

    def client(msg: Message, context):
        record = msg.content.config_records.get(RECORD)
        reply = app(msg, context)
        if context.node_id == node and record is not None and (record[STAGE], record["round"]) == (stage, 1):
            return Message(RecordDict({RECORD: ConfigRecord(values)}), reply_to=msg)
        return reply

    return client


@pytest.mark.parametrize(
    "stage, values, left_out",
    [
        ("setup", {"mask-key": 3}, True),
        ("share-keys", {"destinations": ["x"], "ciphertexts": [b"y"]}, True),
        ("unmask", {"owners": [1, 2, 3], "shares": [b"junk", b"junk", b"junk"]}, False),
    ],
)
def test_malformed_protocol_replies_never_crash_a_round(
    small_run_config, tmp_path, monkeypatch, stage, values, left_out
):
    """A site that answers a step of round 1 with nonsense is left out (setup, share keys: the round
    goes on with the other two) or, with bad shares at unmask, makes the round keep the global model
    and say why; either way round 2 trains with all three."""
    monkeypatch.setattr(inprocess, "client_app", garbling(3, stage, values))
    results = run_inprocess(secure_config(small_run_config, 3, rounds=2, secagg=True), 3, tmp_path / "run", wire=True)
    first, second = results.rounds[1:]
    if left_out:
        assert [r["node-id"] for r in first["train-clients"]["rejected"]] == [3]
        assert first["fusion"]["secagg"]["contributors"] == 2 and not first["train-clients"]["skipped"]
    else:
        assert "do not combine" in first["train-clients"]["skipped"] or "not a key" in first["train-clients"]["skipped"]
        assert "global model kept" in first["train-clients"]["skipped"]
    assert second["fusion"]["secagg"]["contributors"] == 3 and not second["train-clients"]["skipped"]
