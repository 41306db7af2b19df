"""Keys of the server's round loop: the round budget, outputs, checkpoints and the stopping rule
(read by ``fedapp.server``; declared here so that validating a config never imports torch)."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key, Owner


def _deterministic_without_dp(cfg: Any) -> list[str]:
    if cfg.deterministic and cfg.dp != "none":
        # Every SuperNode receives the run config, seed included: seeded sampling and noise would be
        # predictable to them, and DP's guarantee assumes they are not.
        return [
            f"deterministic=true does not go with dp={cfg.dp!r}: the node sampling and the noise would follow "
            'from the seed every SuperNode receives; use deterministic=false with dp, or dp="none"'
        ]
    return []


ROUNDS = Owner(
    "the round loop",
    keys=(
        Key("num-server-rounds", 10, "the round budget", low=1),
        Key(
            "deterministic",
            False,
            "the same seed gives bit-identical runs: seeded node sampling, updates "
            "aggregated in partition order, torch's deterministic kernels (slower; not with dp)",
        ),
        Key("round-timeout", 900.0, "seconds a round waits for replies", low=0.0, low_open=True),
        Key("aggregation-threads", 0, "threads of the aggregation math (0: this process's CPUs)", low=0),
        Key("central-eval", True, "evaluate the global model on the server's test split each round"),
    ),
    checks=(_deterministic_without_dp,),
)
OUTPUTS = Owner(
    "the run's outputs",
    keys=(
        Key("results-dir", "results", "where run folders are written",
            check=lambda v: None if v else "results-dir='' is not allowed: name a directory for the run's outputs"),
        Key("run-name", "", "the run folder's name (default: a timestamp)"),
        Key("tensorboard", True, "write TensorBoard event files"),
    ),
)  # fmt: skip


def _patience(cfg: Any) -> bool:
    return cfg.early_stop_patience > 0


LIFECYCLE = Owner(
    "checkpoints and stopping",
    keys=(
        Key("checkpoint-keep", 3, "checkpoints kept (the best one always)", low=0),
        Key("resume", "", 'a run folder (or "latest") to continue'),
        Key("early-stop-patience", 0, "stop after this many rounds without improvement (0: off)", low=0),
        Key("early-stop-min-delta", 0.0, "the improvement that counts", low=0.0, when=_patience,
            needs="early-stop-patience > 0"),
        Key("target-accuracy", 0.0, "stop when the central video accuracy reaches it (0: off)", low=0.0, high=1.0),
    ),
)  # fmt: skip
OWNERS = (ROUNDS, OUTPUTS, LIFECYCLE)
