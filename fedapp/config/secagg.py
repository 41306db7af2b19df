"""Keys of secure aggregation (SecAgg+, ``strategies.secure_aggregation``): the server learns only the
weighted sum of the sites' updates. Read by ``fedapp.server.secure_round`` and sent from there to
``fedapp.client.secagg_mod``; declared here so that validating a config never imports the crypto."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key, Owner

# Weight sources a site can compute alone (its own count or declared weight): the secure sum carries
# each site's weight beside its update, so the weight must not depend on the other sites' replies.
SITE_WEIGHTS = {"num-examples": "num-examples", "node": "node-weight"}


def weight_metric(cfg: Any) -> str:
    """The metric a site weighs its update by under secagg ('' : every site 1)."""
    if cfg.strategy == "fedavg":
        return "num-examples"
    if cfg.strategy == "weighted":
        return SITE_WEIGHTS[cfg.weight_source]
    return ""


def _composes(cfg: Any) -> list[str]:
    """Every rule and stage that needs the sites' individual updates is refused, with the reason."""
    from strategies.stage import registered  # the registry imports the stages; only when secagg is on

    why = "needs each site's update, and secure aggregation shows the server their sum only"
    problems = []
    if cfg.strategy == "fusion":
        problems.append(f'secagg=true does not go with strategy="fusion" (fusion-fn={cfg.fusion_fn!r}): the rule {why}')
    if cfg.strategy == "weighted" and cfg.weight_source not in SITE_WEIGHTS:
        problems.append(
            f"secagg=true does not go with weight-source={cfg.weight_source!r}: those weights are normalized over "
            f"the round's replies; use {' or '.join(SITE_WEIGHTS)} (a site's own count or declared weight)"
        )
    for name, stage in registered("transform").items():
        if stage.active(cfg):
            problems.append(f"secagg=true does not go with the {name!r} stage (its keys are set): it {why}")
    if cfg.scaffold:
        problems.append("secagg=true does not go with scaffold=true: each site's control-variate change would need a "
                        "second secure sum, which is not built")  # fmt: skip
    if cfg.dp != "none":
        problems.append(f"secagg=true does not go with dp={cfg.dp!r}: Flower's DP wrappers clip and check each "
                        "site's update on the server")  # fmt: skip
    if cfg.compression != "none":
        problems.append(f"secagg=true does not go with compression={cfg.compression!r}: masked updates are "
                        "uniform integers, which do not compress")  # fmt: skip
    if cfg.secagg_threshold > cfg.secagg_num_shares:
        problems.append(f"secagg-threshold={cfg.secagg_threshold} is above secagg-num-shares="
                        f"{cfg.secagg_num_shares}: no secret could be rebuilt")  # fmt: skip
    if cfg.secagg_quantization_range >= cfg.secagg_modulus_range:
        problems.append(f"secagg-quantization-range={cfg.secagg_quantization_range} must be below "
                        f"secagg-modulus-range={cfg.secagg_modulus_range}")  # fmt: skip
    return problems


def _power_of_two(value: int) -> str | None:
    if value & (value - 1):
        return f"secagg-modulus-range={value} must be a power of 2 (masks are uniform on it)"
    return None


SECAGG = Owner(
    "secure aggregation",
    keys=(
        Key("secagg", False, "SecAgg+: the server learns only the weighted sum of the sites' updates"),
    ),
)  # fmt: skip
SECAGG_SETTINGS = Owner(
    "SecAgg+'s parameters",
    keys=(
        Key("secagg-num-shares", 3, "sites each site shares its secrets with, itself included (all when fewer)",
            low=2),
        Key("secagg-threshold", 2, "shares that rebuild a secret: the fewest neighbours that must survive, and "
            "one more than the most that may collude", low=2),
        Key("secagg-clipping-range", 8.0, "each value of a site's weighted update is clipped to ± this",
            low=0.0, low_open=True),
        Key("secagg-quantization-range", 4194304, "integer levels per clipped value (2^22)", low=2),
        Key("secagg-modulus-range", 4294967296, "the masks' modulus (2^32; a power of 2)", low=4,
            high=4294967296, check=_power_of_two),
        Key("secagg-max-weight", 1000.0, "the largest weight a site may have (num-examples under fedavg); "
            "weights are sent as fractions of it", low=0.0, low_open=True),
    ),
    when=lambda cfg: cfg.secagg,
    needs="secagg=true",
    checks=(_composes,),
)  # fmt: skip
OWNERS = (SECAGG, SECAGG_SETTINGS)


def settings_of(cfg: Any) -> Any:
    """The run's :class:`strategies.secure_aggregation.Settings`."""
    from strategies.secure_aggregation import Settings

    return Settings(cfg.secagg_num_shares, cfg.secagg_threshold, cfg.secagg_clipping_range,
                    cfg.secagg_quantization_range, cfg.secagg_modulus_range, cfg.secagg_max_weight)  # fmt: skip
