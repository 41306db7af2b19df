"""Personal models: what a site keeps of its own beside the global model, and where it keeps it.

- FedPer (Arivazhagan et al. 2019) and FedRep (Collins et al., ICML 2021): the classifier head
  (``head.*``) is the site's; only the backbone is aggregated. The site trains its head with the
  received backbone and sends the received global head back unchanged, so its head never leaves it
  and the head's update is exactly zero for every aggregation rule.
- Ditto (Li et al., ICML 2021): the site trains the global model as usual and, beside it, a whole
  personal model with the proximal pull ``λ/2·‖v − w_global‖²``; the personal model never leaves.

A site keeps its personal part on its own disk, one safetensors file per round
(``round-NNNN.safetensors``), so that a resumed run continues it from the round the server resumes
from and ``fedvideo export/predict --site`` can use it. The folder is
``<state-dir>/<run folder name>-<run token>/site-<partition>`` with a SuperNode's ``state-dir`` node
config, the same under ``<personal-dir>`` with the ``personal-dir`` key, and else the run folder's
``personal/site-<partition>`` (simulation: the sites share the server's machine). The run token is
drawn once per run folder (``personal.json`` in it; a resume keeps it), so two runs of the same name
in different results folders never share a site's state.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedapp.config.personalization import HEAD_METHODS
from fedapp.task.config import AppConfig, ConfigError

PERSONAL_DIR = "personal"  # in the run folder, when neither state-dir nor personal-dir is set
TOKEN_FILE = "personal.json"  # in the run folder: the run token the sites' folders are named with
HEAD_PREFIX = "head."
_FILE = re.compile(r"round-(\d+)\.safetensors")


class PersonalStateError(RuntimeError):
    """A site's personal state cannot be used for the round asked for."""


def personal_keys(method: str, keys: Sequence[str]) -> list[str]:
    """The tensor names that are the site's own under ``method`` (all of them for Ditto)."""
    if method in HEAD_METHODS:
        return [k for k in keys if k.startswith(HEAD_PREFIX)]
    if method == "ditto":
        return list(keys)
    raise ValueError(f"personalization={method!r} keeps no personal tensors")


def run_token(run_dir: Path, create: bool = False) -> str:
    """The run's token from ``run_dir/personal.json``; ``create``: draw and write it on a fresh run."""
    from fedapp.files import atomic_write_json

    path = Path(run_dir) / TOKEN_FILE
    if path.is_file():
        return str(json.loads(path.read_text())["token"])
    if not create:
        raise PersonalStateError(f"{run_dir} has no {TOKEN_FILE}: it is not a personalized run's folder")
    token = secrets.token_hex(6)
    atomic_write_json(path, {"token": token})
    return token


def site_folder(
    cfg: AppConfig, run_folder: str, site: int, state_dir: str | None, own_data: bool, token: str = ""
) -> Path:
    """Where site ``site`` keeps its personal models for the run whose folder is named ``run_folder``
    (``token``: that run's token, in the name of a folder outside the run folder)."""
    for what, value in (("run folder", run_folder), ("run token", token or "x")):
        if not value or "/" in value or value in (".", ".."):
            raise PersonalStateError(f"the server named its {what} {value!r}: expected a plain name")
    outside = f"{run_folder}-{token}" if token else run_folder
    if state_dir:
        return Path(state_dir).expanduser() / outside / f"site-{site}"
    if own_data:
        # A site with videos of its own runs on its own machine: a folder named by the server's
        # results-dir there would be a guess. Refuse rather than write somewhere unexpected.
        raise ConfigError(
            f"personalization={cfg.personalization!r}: this SuperNode holds its own videos (data-dir) but names no "
            'state-dir for its personal model; start it with --node-config \'data-dir="..." state-dir="..."\''
        )
    if cfg.personal_dir:
        return Path(cfg.personal_dir).expanduser() / outside / f"site-{site}"
    return Path(cfg.results_dir).expanduser() / run_folder / PERSONAL_DIR / f"site-{site}"


class PersonalStore:
    """One site's personal state, one file per round; the newest ``keep`` files are kept."""

    def __init__(self, folder: Path, keep: int = 4) -> None:
        self.folder = Path(folder)
        self.keep = max(keep, 2)

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _FILE.fullmatch(p.name)))

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.safetensors"

    def load(self, up_to: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(round, arrays)`` of the newest state of a round <= ``up_to``; None when the site has
        none yet. Refuses when it has states, all of later rounds: a run resumed from an older
        checkpoint than the site keeps would otherwise continue from its future."""
        from fedapp.server.results import load_weights

        rounds = self.rounds()
        usable = [r for r in rounds if r <= up_to]
        if not usable:
            if rounds:
                raise PersonalStateError(
                    f"{self.folder} holds the personal state of rounds {rounds[0]}..{rounds[-1]}, none at or "
                    f"before round {up_to}: the run resumed from an older checkpoint than this site keeps "
                    "(raise checkpoint-keep, or resume from a later checkpoint)"
                )
            return None
        return usable[-1], load_weights(self.path(usable[-1]))

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the state of ``server_round`` (atomically, owner-only) and drop all but the newest
        ``keep``; a state of a later round (a repeated round after a resume) is replaced."""
        from fedapp.server.results import save_weights

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for later in (r for r in self.rounds() if r > server_round):
            self.path(later).unlink(missing_ok=True)
        save_weights(self.path(server_round), arrays, {"round": str(server_round)})
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)


def with_personal(arrays: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The site's model: ``arrays`` with its personal tensors in place (``arrays`` alone when the
    site has none yet). Refuses personal tensors the model does not have, or of another shape."""
    out = dict(arrays)
    for key, value in (personal or {}).items():
        if key not in out or out[key].shape != value.shape:
            raise PersonalStateError(
                f"personal tensor {key!r} {value.shape} does not fit the model "
                f"({out[key].shape if key in out else 'no such tensor'})"
            )
        out[key] = value
    return out


def site_model_arrays(
    arrays: Mapping[str, np.ndarray],
    cfg: AppConfig,
    run_folder: Path,
    server_round: int,
    site: int,
    state_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Site ``site``'s personal model at ``server_round`` of the run in ``run_folder``: the global
    ``arrays`` of that round with the site's newest personal state at or before it in place."""
    if cfg.personalization == "none":
        raise PersonalStateError(
            f'{run_folder} is not a personalized run (personalization="none"): no site has a model of its own'
        )
    if state_dir is not None or cfg.personal_dir:
        own = str(state_dir) if state_dir is not None else None
        folder = site_folder(cfg, run_folder.name, site, own, False, run_token(run_folder))
    else:
        folder = run_folder / PERSONAL_DIR / f"site-{site}"
    loaded = PersonalStore(folder).load(server_round) if folder.is_dir() else None
    if loaded is None:
        raise PersonalStateError(f"no personal model of site {site} at or before round {server_round} in {folder}")
    return with_personal(arrays, loaded[1])
