"""The Flower client: a ``NumPyClient`` that trains and scores a video classifier on local videos."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from datasets.layouts import VideoSample
from fedapp.client.bridge import NamedNumPyClient
from fedapp.client.personal import HEAD_PREFIX, PersonalStore, personal_keys, site_folder, with_personal
from fedapp.config.personalization import HEAD_METHODS, RUN_FOLDER, RUN_TOKEN
from fedapp.task.config import AppConfig
from fedapp.task.data import eval_loader, train_loader
from fedapp.task.devices import prepare_model, select_device
from fedapp.task.models import batchnorm_state_keys, build_model
from fedapp.task.train import (
    evaluate_model,
    load_named_arrays,
    make_optimizer,
    set_deterministic,
    set_torch_threads,
    state_arrays,
    train_epochs,
)
from strategies.replies import NO_TEST_VIDEOS, NUM_PARTITIONS, OWN_DATA
from strategies.scaffold import CONTROL, CONTROL_DELTA, client_control

logger = logging.getLogger(__name__)
_NO_TEST_WARNED: set[tuple] = set()  # (kind, "run", run id, partition): warned once per run in a process


class NoUsableVideoError(RuntimeError):
    """This client has no video it can decode for the requested phase."""


@lru_cache(maxsize=16)
def model_state_keys(model_name: str, num_classes: int, pooling: str) -> tuple[str, ...]:
    """The state_dict names of a model, in order (cached: building a model only to read them costs)."""
    return tuple(build_model(model_name, num_classes, pooling=pooling).state_dict())


MOMENTUM_PREFIX = "client-momentum/"  # node-state keys of the worker momentum, beside FedBN's layers
SCAFFOLD_PREFIX = "scaffold-control/"  # node-state keys of SCAFFOLD's client control variate cᵢ


class VideoClient(NamedNumPyClient):
    """Fine-tunes the global model on this node's videos (``fit``) and scores it on its test videos.

    ``skipped`` lists the node's files that could not be decoded; they are reported in every reply's
    metrics so the server sees data problems without seeing the data. ``local_state`` persists
    across rounds on this node (Flower's ``context.state``): with ``fedbn`` the node keeps its own
    BatchNorm layers there instead of taking the global ones. ``run_id`` scopes the warnings about
    files that fail to decode: once per run and partition in this process, not every round.
    """

    def __init__(
        self,
        cfg: AppConfig,
        classes: Sequence[str],
        train_samples: Sequence[VideoSample],
        test_samples: Sequence[VideoSample],
        skipped: Sequence[tuple[str, str]] = (),
        partition_id: int = 0,
        local_state: MutableMapping[str, np.ndarray] | None = None,
        node_weight: float | None = None,
        run_id: int | None = None,
        num_partitions: int = 1,
        own_data: bool = False,
        state_dir: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.classes = list(classes)
        self.train_samples = list(train_samples)
        self.test_samples = list(test_samples)
        self.skipped = list(skipped)
        self.partition_id = partition_id
        # Where this site stands in the federation, reported so the server can write every file's
        # site into split.csv when all sites partition its dataset (not when one holds its own data).
        self.num_partitions, self.own_data = num_partitions, own_data
        self.state_dir = state_dir  # where this site keeps its personal model (a SuperNode's node config)
        self.local_state = local_state if local_state is not None else {}
        self.node_weight = node_weight
        self.warn_scope = ("run", run_id, partition_id)
        self.received_records: dict[str, dict[str, np.ndarray]] = {}
        self.reply_records: dict[str, dict[str, np.ndarray]] = {}
        self.device = select_device(cfg.device)
        set_torch_threads(cfg.torch_threads)
        set_deterministic(cfg.deterministic)

    def state_keys(self) -> list[str]:
        return list(model_state_keys(self.cfg.model, len(self.classes), self.cfg.pooling))

    def _named(self, parameters: list[np.ndarray]) -> dict[str, np.ndarray]:
        keys = self.state_keys()
        if len(parameters) != len(keys):
            raise ValueError(f"got {len(parameters)} arrays for a model with {len(keys)} tensors")
        return dict(zip(keys, parameters))

    def _model(self, arrays: dict[str, np.ndarray]):
        model = build_model(
            self.cfg.model, len(self.classes), freeze_backbone=self.cfg.freeze_backbone, pooling=self.cfg.pooling
        )
        load_named_arrays(model, self._with_local_batchnorm(arrays))
        return prepare_model(model, self.device, self.cfg.channels_last)

    def _personal_store(self, config: dict[str, Any]) -> PersonalStore | None:
        """This site's personal state for the run the server names (None without personalization)."""
        if self.cfg.personalization == "none":
            return None
        if RUN_FOLDER not in config:
            raise ValueError(f"personalization is on but the server's message names no {RUN_FOLDER!r}")
        token = str(config.get(RUN_TOKEN, ""))
        folder = site_folder(self.cfg, str(config[RUN_FOLDER]), self.partition_id, self.state_dir, self.own_data, token)
        # The states of the rounds the server's kept checkpoints hold, and the round in flight.
        return PersonalStore(folder, keep=self.cfg.checkpoint_keep + 1)

    def _train(self, model, server_round: int, seed: int, epochs: int, **options: Any) -> dict[str, float]:
        return train_epochs(
            model,
            train_loader(self.cfg, self.train_samples, seed=seed, warn_scope=self.warn_scope),
            make_optimizer(model, self.cfg),
            epochs=epochs,
            device=self.device,
            bf16=self.cfg.bf16,
            channels_last=self.cfg.channels_last,
            log_prefix=f"[partition {self.partition_id} round {server_round}] ",
            **options,
        )

    def _train_fedrep(self, model, server_round: int, seed: int, **options: Any) -> dict[str, float]:
        """FedRep's round: the head alone for ``personal-epochs`` (backbone fixed), then the backbone
        alone for ``local-epochs`` (head fixed). Returns the backbone phase's metrics plus the head's loss."""
        params = dict(model.named_parameters())
        wanted = {name: p.requires_grad for name, p in params.items()}
        head = {name for name in params if name.startswith(HEAD_PREFIX)}
        for name, p in params.items():
            p.requires_grad_(wanted[name] and name in head)
        head_metrics = self._train(model, server_round, seed + 1, self.cfg.personal_epochs)
        for name, p in params.items():
            p.requires_grad_(wanted[name] and name not in head)
        metrics = self._train(model, server_round, seed, self.cfg.local_epochs, **options)
        for name, p in params.items():
            p.requires_grad_(wanted[name])
        return {**metrics, "personal-train-loss": head_metrics["train-loss"]}

    def _with_local_batchnorm(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedBN: this node's own BatchNorm tensors replace the global ones once it has them."""
        if not self.cfg.fedbn or not self.local_state:
            return arrays
        return {k: self.local_state.get(k, a) for k, a in arrays.items()}

    def _momentum_update(
        self, keys: list[str], start: list[np.ndarray], trained: list[np.ndarray], learnable: set[str]
    ) -> list[np.ndarray]:
        """Worker momentum (Karimireddy, He, Jaggi, ICML 2021): send ``start + m`` with
        ``m ← β·m + (1 − β)·(trained − start)`` over the learnable parameters, m kept in node state.

        Averaging a client's updates over rounds shrinks their noise (by √((1−β)/(1+β)) for
        independent rounds), which is what lets a robust rule tell honest clients from attackers.
        The first round's m is the update itself (no shrink towards a zero start); BatchNorm
        statistics and counters go out as trained.
        """
        beta, out = self.cfg.client_momentum, []
        for key, s, t in zip(keys, start, trained):
            if key not in learnable:
                out.append(t)
                continue
            delta = t.astype(np.float32) - s.astype(np.float32)
            previous = self.local_state.get(MOMENTUM_PREFIX + key)
            m = delta if previous is None else beta * previous + (1 - beta) * delta
            self.local_state[MOMENTUM_PREFIX + key] = m
            out.append((s.astype(np.float32) + m).astype(t.dtype))
        return out

    def _server_control(self) -> dict[str, np.ndarray]:
        control = self.received_records.get(CONTROL)
        if control is None:
            raise ValueError(f"scaffold is on but the train message carries no {CONTROL!r} record")
        return control

    def _scaffold_correction(self, control: dict[str, np.ndarray], trainable: set[str]) -> dict[str, torch.Tensor]:
        """SCAFFOLD's ``c − cᵢ`` per trainable parameter (cᵢ from node state, 0 in the first round)."""
        return {
            key: torch.from_numpy(c - self.local_state.get(SCAFFOLD_PREFIX + key, np.zeros_like(c)))
            for key, c in control.items()
            if key in trainable
        }

    def _scaffold_update(
        self,
        control: dict[str, np.ndarray],
        trainable: set[str],
        start: dict[str, np.ndarray],
        trained: dict[str, np.ndarray],
        metrics: dict[str, Any],
    ) -> None:
        """Option II's new cᵢ into node state and Δcᵢ into the reply; frozen tensors keep cᵢ (Δ = 0)."""
        local = {k: self.local_state[SCAFFOLD_PREFIX + k] for k in control if SCAFFOLD_PREFIX + k in self.local_state}
        moved = {k: c for k, c in control.items() if k in trainable}
        new, delta = client_control(local, moved, start, trained, int(metrics["train-steps"]), self.cfg.lr)
        for key, c in control.items():
            if key not in moved:
                delta[key] = np.zeros_like(c)
        self.local_state.update({SCAFFOLD_PREFIX + k: v for k, v in new.items()})
        self.reply_records[CONTROL_DELTA] = delta

    def _keep_personal(
        self,
        store: PersonalStore,
        server_round: int,
        received: dict[str, np.ndarray],
        own: dict[str, np.ndarray] | None,
        arrays: list[np.ndarray],
        seed: int,
        metrics: dict[str, Any],
    ) -> list[np.ndarray]:
        """Save this round's personal state; return what the site sends (nothing personal in it).

        FedPer/FedRep: the trained head is kept and the received global head goes back unchanged.
        Ditto: the personal model (the site's, else the received global) trains ``personal-epochs``
        with ``λ/2·‖v − w_global‖²`` towards the received global model; the global update is sent."""
        method, keys = self.cfg.personalization, self.state_keys()
        trained = dict(zip(keys, arrays))
        if method in HEAD_METHODS:
            store.save(server_round, {k: trained[k] for k in personal_keys(method, keys)})
            return [received[k] if k.startswith(HEAD_PREFIX) else a for k, a in zip(keys, arrays)]
        personal = self._model(with_personal(received, own))
        personal_metrics = self._train(
            personal,
            server_round,
            seed + 1,
            self.cfg.personal_epochs,
            proximal_mu=self.cfg.ditto_lambda,
            proximal_anchor=received,
        )
        store.save(server_round, dict(zip(keys, state_arrays(personal))))
        metrics["personal-train-loss"] = personal_metrics["train-loss"]
        return arrays

    def _data_metrics(self, samples: Sequence[VideoSample]) -> dict[str, Any]:
        counts = np.bincount([s.label for s in samples], minlength=len(self.classes))
        metrics: dict[str, Any] = {
            "partition-id": self.partition_id,
            NUM_PARTITIONS: self.num_partitions,
            OWN_DATA: int(self.own_data),
            "skipped-videos": len(self.skipped),
            "class-counts": counts.tolist(),
        }
        if self.node_weight is not None:
            metrics["node-weight"] = self.node_weight
        return metrics

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        if not self.train_samples:
            raise NoUsableVideoError(
                f"partition {self.partition_id}: no usable training video ({len(self.skipped)} skipped as unreadable)"
            )
        server_round = int(config.get("server-round", 0))
        received = self._named(parameters)
        method = self.cfg.personalization
        store = self._personal_store(config)
        loaded = store.load(server_round - 1) if store is not None else None
        own = loaded[1] if loaded is not None else None
        # FedPer/FedRep train the received backbone under this site's own head (the global one until it has one).
        model = self._model(with_personal(received, own) if method in HEAD_METHODS else received)
        control = self._server_control() if self.cfg.scaffold else None
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        # A different but reproducible clip order for every (run seed, round, client).
        seed = (self.cfg.seed * 1_000_003 + server_round * 1009 + self.partition_id) % 2**31
        options: dict[str, Any] = {
            "proximal_mu": float(config.get("proximal-mu", 0.0)),
            "gradient_correction": self._scaffold_correction(control, trainable) if control is not None else None,
        }
        if method == "fedrep":
            metrics = self._train_fedrep(model, server_round, seed, **options)
        else:
            metrics = self._train(model, server_round, seed, self.cfg.local_epochs, **options)
        if metrics["train-clips"] == 0:
            raise NoUsableVideoError(f"partition {self.partition_id}: every training clip failed to decode")
        arrays = state_arrays(model)
        if store is not None:
            arrays = self._keep_personal(store, server_round, received, own, arrays, seed, metrics)
            metrics["personal-from-round"] = loaded[0] if loaded is not None else 0  # 0: a fresh personal part
        if self.cfg.fedbn:
            keys = list(model.state_dict())
            bn = set(batchnorm_state_keys(model))
            self.local_state.update({k: a for k, a in zip(keys, arrays) if k in bn})
        learnable = {name for name, _ in model.named_parameters()}
        if control is not None:
            keys = list(model.state_dict())
            self._scaffold_update(control, trainable, dict(zip(keys, parameters)), dict(zip(keys, arrays)), metrics)
        if self.cfg.client_momentum > 0:
            arrays = self._momentum_update(list(model.state_dict()), parameters, arrays, learnable)
        metrics["base-round"] = server_round
        return arrays, len(self.train_samples), {**metrics, **self._data_metrics(self.train_samples)}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        if not self.test_samples:
            # Not a failure: a site may hold no test video (few test videos, many sites). One line
            # per run, and a reply the server records as not evaluated instead of a traceback.
            if ("no-test", *self.warn_scope) not in _NO_TEST_WARNED:
                _NO_TEST_WARNED.add(("no-test", *self.warn_scope))
                logger.warning("partition %d has no test video: local evaluation skipped", self.partition_id)
            return 0.0, 0, {**self._data_metrics([]), NO_TEST_VIDEOS: 1}
        received = self._named(parameters)
        scores = self._score(self._model(received))
        if scores["num-videos"] == 0:  # an accuracy of 0.0 on no video would drag the federated mean down
            raise NoUsableVideoError(
                f"partition {self.partition_id}: none of its {len(self.test_samples)} test videos could be decoded"
            )
        loss = scores.pop("loss")
        personal = self._personal_scores(config, received)
        # Weighted by the videos actually scored, not by the files listed.
        return loss, int(scores["num-videos"]), {**scores, **personal, **self._data_metrics(self.test_samples)}

    def _score(self, model) -> dict[str, Any]:
        loader = eval_loader(self.cfg, self.test_samples, warn_scope=self.warn_scope)
        return evaluate_model(model, loader, self.device, self.cfg.bf16, self.cfg.channels_last)

    def _personal_scores(self, config: dict[str, Any], received: dict[str, np.ndarray]) -> dict[str, Any]:
        """The site's personal model scored on its own test videos (FedPer/FedRep: the received
        backbone under its own head), beside the global model's scores; nothing before it has one."""
        store = self._personal_store(config)
        loaded = store.load(int(config.get("server-round", 0))) if store is not None else None
        if loaded is None:
            return {}
        personal_round, own = loaded
        scores = self._score(self._model(with_personal(received, own)))
        return {
            "personal-video-accuracy": scores["video-accuracy"],
            "personal-clip-accuracy": scores["clip-accuracy"],
            "personal-loss": scores["loss"],
            "personal-round": personal_round,
        }
