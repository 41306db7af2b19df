"""Keys of personalization: a model of each site's own beside the global one (read by
``fedapp.client.personal``; declared here so that validating a config never imports torch)."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key, Owner
from fedapp.plugins import is_plugin

METHODS = ("none", "fedper", "fedrep", "ditto")
HEAD_METHODS = ("fedper", "fedrep")  # the ones whose personal part is the classifier head
RUN_FOLDER = "run-folder"  # the config entry in which the server names its run folder to the sites
RUN_TOKEN = "run-token"  # and the token that tells this run from another of the same name


def _compatible(cfg: Any) -> list[str]:
    problems = []
    if cfg.scaffold:
        problems.append(
            f"personalization={cfg.personalization!r} does not go with scaffold=true: SCAFFOLD's control "
            "variates assume every site trains the one global model"
        )
    if cfg.personalization in HEAD_METHODS:
        if is_plugin(cfg.model):
            problems.append(
                f"personalization={cfg.personalization!r} keeps the tensors named head.* at the sites, and "
                f"model={cfg.model!r} is a model of your own whose names are its own: use "
                'personalization="ditto" (the whole model is personal) or a built-in model'
            )
        if cfg.strategy == "fusion" and cfg.fusion_fn == "feddf":
            problems.append(
                f'personalization={cfg.personalization!r} does not go with fusion-fn="feddf": the heads the '
                "sites send are the untrained global one, so the distillation ensemble would be meaningless"
            )
    return problems


def _uses_personal_epochs(cfg: Any) -> bool:
    return cfg.personalization in ("fedrep", "ditto")


PERSONALIZATION = Owner(
    "personalization",
    keys=(
        Key(
            "personalization",
            "none",
            "a personal model per site: fedper/fedrep keep the head at the site (only the backbone is "
            "aggregated), ditto trains a whole personal model near the global one",
            choices=METHODS,
        ),
    ),
)
PERSONAL = Owner(
    "the personal models",
    keys=(
        Key("personal-epochs", 2, "epochs per round of the personal part: FedRep's head, Ditto's personal model",
            low=1, when=_uses_personal_epochs, needs='personalization="fedrep" or "ditto"'),
        Key("ditto-lambda", 0.1, "Ditto's λ: pull of the personal model towards the global one",
            low=0.0, when=lambda cfg: cfg.personalization == "ditto", needs='personalization="ditto"'),
        Key("personal-dir", "", "where sites keep their personal models ('': the run folder's personal/; a "
            "SuperNode's state-dir node config wins)"),
    ),
    when=lambda cfg: cfg.personalization != "none",
    needs='personalization="fedper", "fedrep" or "ditto"',
    checks=(_compatible,),
)  # fmt: skip
OWNERS = (PERSONALIZATION, PERSONAL)
