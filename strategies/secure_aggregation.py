"""SecAgg+ (Bell et al., CCS 2020) on named arrays: the server learns the weighted sum of the sites'
updates and nothing of any one of them.

Plain functions for both sides, on Flower's primitives (``flwr.common.secure_aggregation``: ECDH key
agreement, Shamir's secret sharing, stochastic quantization; ``flwr.supercore.primitives``: key
pairs). The messages that carry them are ``fedapp.server.secure_round`` (server) and
``fedapp.client.secagg_mod`` (site). One round, for the sampled sites:

1. setup: each site makes two key pairs (one to encrypt shares, one for pairwise masks) and sends
   the public halves.
2. share keys: each site gets its neighbours' public keys, draws a mask seed b, splits b and its
   mask secret key into Shamir shares (any ``threshold`` rebuild them) and sends each neighbour one
   share of each, encrypted for that neighbour alone.
3. masked update: each site trains, scales its update by its weight, quantizes it to integers and
   adds its private mask PRG(b) and, for every neighbour that shared keys, ±PRG(ECDH) mod the modulus.
4. unmask: each survivor sends its share of b for every neighbour whose masked update arrived and its
   share of the mask key for every neighbour that shared keys but sent none. The server rebuilds the
   b's and the dropped sites' pairwise masks, removes them and dequantizes the sum.

A site never reveals both secrets of one neighbour, so the server can unmask a sum only.
Masks are expanded from the 32-byte secrets with ChaCha20 (``cryptography``), not with Flower's
``pseudo_rand_gen``, whose NumPy seed folds every secret to 32 bits.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

WEIGHT = "secagg.weight"  # the entry of the secured vector that carries the site's (quantized) weight
Shape = tuple[int, ...]

# The messages: every step's values travel in one ConfigRecord, both ways; the masked update in an
# ArrayRecord of its own (beside the train reply's metrics).
RECORD = "secagg"
MASKED = "secagg-masked"
STAGE = "stage"
ROUND = "round"  # every step names its server round: a step of another round is refused
SETUP, SHARE_KEYS, MASKED_UPDATE, UNMASK = "setup", "share-keys", "masked-update", "unmask"
WEIGHT_METRIC = "weight-metric"  # the metric a site weighs its update by ('': every site 1)


def secured_names(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors that travel in the secure sum: the floating-point ones. Integer tensors (BatchNorm's
    batch counters) are not averaged under secagg: the global model keeps its own."""
    return [name for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating)]


class SecAggError(ValueError):
    """A step of the protocol cannot go on (too few sites, a bad message); the text says why."""


@dataclass(frozen=True)
class Settings:
    """The round's protocol parameters, as the server sends them (Flower's defaults).

    ``num_shares``: the sites each site shares its secrets with, itself included (all sampled sites
    when there are fewer); ``threshold``: the shares that rebuild a secret, so the fewest neighbours
    that must survive a round and the most that can collude without learning anything."""

    num_shares: int = 3
    threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0

    def problems(self) -> list[str]:
        """What is wrong with these settings, in words (empty: fine)."""
        out = []
        if self.threshold < 2:
            out.append(f"threshold {self.threshold} must be >= 2: one share would reveal a secret")
        if self.num_shares < self.threshold:
            out.append(f"num-shares {self.num_shares} must be >= the threshold {self.threshold}")
        if self.modulus_range & (self.modulus_range - 1) or not self.quantization_range < self.modulus_range <= 2**32:
            out.append(
                f"modulus {self.modulus_range} must be a power of 2 above the quantization range "
                f"{self.quantization_range} and at most 2^32"
            )
        if self.clipping_range <= 0 or self.max_weight <= 0:
            out.append("clipping range and max weight must be > 0")
        return out

    def to_config(self) -> dict[str, Any]:
        return {
            "num-shares": self.num_shares,
            "threshold": self.threshold,
            "clipping-range": float(self.clipping_range),
            "quantization-range": self.quantization_range,
            "modulus-range": self.modulus_range,
            "max-weight": float(self.max_weight),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        try:
            settings = cls(
                int(config["num-shares"]),
                int(config["threshold"]),
                float(config["clipping-range"]),
                int(config["quantization-range"]),
                int(config["modulus-range"]),
                float(config["max-weight"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"bad SecAgg+ settings from the server: {exc!r}") from exc
        if settings.problems():
            raise SecAggError(f"bad SecAgg+ settings from the server: {'; '.join(settings.problems())}")
        return settings

    def contributors_limit(self) -> int:
        """The most sites whose quantized updates can be summed without wrapping the modulus."""
        return self.modulus_range // self.quantization_range - 1

    def error_bound(self, total_ratio: float, contributors: int) -> float:
        """Largest per-coordinate error of the unmasked weighted mean against the exact weighted mean
        of the clipped updates under the quantized weights: one quantization step per site (stochastic
        rounding moves a value by less than a step), divided by the summed weight ratios."""
        step = 2 * self.clipping_range / self.quantization_range
        return contributors * step / total_ratio


def layout(shapes: Mapping[str, Shape]) -> list[tuple[str, Shape]]:
    """The secured vector's entries in the one order both sides expand masks in: the weight, then
    the tensors by name."""
    return [(WEIGHT, (1,)), *sorted((name, tuple(shape)) for name, shape in shapes.items())]


def neighbours(nodes: Sequence[int], num_shares: int, rng: random.Random) -> dict[int, list[int]]:
    """SecAgg+'s sharing graph: the sites on a randomly ordered ring, each with the ``num_shares``
    around it (itself included; everyone when the ring is smaller)."""
    ring = list(nodes)
    rng.shuffle(ring)
    n = len(ring)
    if num_shares >= n:
        return {node: sorted(ring) for node in ring}
    half = num_shares // 2  # an even count rounds up to the odd one above: symmetric neighbourhoods
    return {node: sorted({ring[(i + k) % n] for k in range(-half, half + 1)}) for i, node in enumerate(ring)}


def mask_stream(secret: bytes, entries: Sequence[tuple[str, Shape]], modulus: int) -> dict[str, np.ndarray]:
    """The mask a 32-byte (or longer) secret expands to: ChaCha20's keystream, one uniform uint32 per
    value, reduced to the (power-of-two) modulus."""
    key = hashlib.sha256(secret).digest()
    count = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in entries)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (4 * count))
    values = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (modulus - 1)
    out, start = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = values[start : start + size].reshape(shape)
        start += size
    return out


def _add(total: dict[str, np.ndarray], part: Mapping[str, np.ndarray], sign: int, modulus: int) -> None:
    for name, values in part.items():
        total[name] = (total[name] + sign * values) & (modulus - 1)


def _pair_key(own_mask_key: bytes, their_mask_public: bytes) -> bytes:
    return base64.urlsafe_b64decode(
        generate_shared_key(bytes_to_private_key(own_mask_key), bytes_to_public_key(their_mask_public))
    )


# -- the site's side --------------------------------------------------------------------------------


@dataclass
class SiteSecrets:
    """What a site keeps between the four steps of one round (in its node state)."""

    node_id: int
    settings: Settings
    mask_key: bytes  # the secret half of the pairwise-mask key pair (PEM)
    mask_public: bytes
    share_key: bytes  # the secret half of the key pair that encrypts shares
    share_public: bytes
    seed: bytes = b""  # b: the private mask's seed
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node: (mask, share) public keys
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner: its share of b held here
    key_shares: dict[int, bytes] = field(default_factory=dict)  # owner: its share of the mask key held here
    peers: list[int] = field(default_factory=list)  # neighbours whose shares arrived: masks pair with them
    masked: bool = False  # the masked update went out

    def to_record(self) -> dict[str, Any]:
        """As a ConfigRecord's values (ints, bytes and their lists)."""
        owners = sorted(self.seed_shares)
        nodes = sorted(self.public_keys)
        return {
            "node-id": self.node_id,
            **{f"settings.{k}": v for k, v in self.settings.to_config().items()},
            "mask-key": self.mask_key,
            "mask-public": self.mask_public,
            "share-key": self.share_key,
            "share-public": self.share_public,
            "seed": self.seed,
            "nodes": nodes,
            "nodes.mask": [self.public_keys[n][0] for n in nodes],
            "nodes.share": [self.public_keys[n][1] for n in nodes],
            "owners": owners,
            "owners.seed": [self.seed_shares[o] for o in owners],
            "owners.key": [self.key_shares[o] for o in owners],
            "peers": list(self.peers),
            "masked": self.masked,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteSecrets:
        settings = Settings.from_config(
            {k[len("settings.") :]: v for k, v in record.items() if k.startswith("settings.")}
        )
        nodes, owners = list(record["nodes"]), list(record["owners"])
        return cls(
            int(record["node-id"]),
            settings,
            record["mask-key"],
            record["mask-public"],
            record["share-key"],
            record["share-public"],
            record["seed"],
            dict(zip(nodes, zip(record["nodes.mask"], record["nodes.share"]))),
            dict(zip(owners, record["owners.seed"])),
            dict(zip(owners, record["owners.key"])),
            list(record["peers"]),
            bool(record["masked"]),
        )


def site_setup(node_id: int, settings: Settings) -> SiteSecrets:
    """Step 1: this round's two key pairs; the public halves go to the server."""
    mask_secret, mask_public = generate_key_pairs()
    share_secret, share_public = generate_key_pairs()
    return SiteSecrets(
        node_id,
        settings,
        private_key_to_bytes(mask_secret),
        public_key_to_bytes(mask_public),
        private_key_to_bytes(share_secret),
        public_key_to_bytes(share_public),
    )


def site_share_keys(site: SiteSecrets, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Step 2: split b and the mask key among the neighbours (``public_keys``, this site included);
    returns each other neighbour's share pair, encrypted for it alone."""
    if len(public_keys) < site.settings.threshold:
        raise SecAggError(f"{len(public_keys)} neighbours, fewer than the threshold {site.settings.threshold}")
    if public_keys.get(site.node_id) != (site.mask_public, site.share_public):
        raise SecAggError("the server did not hand back this site's own public keys")
    flat = [key for pair in public_keys.values() for key in pair]
    if len(set(flat)) != len(flat):
        raise SecAggError("two neighbours hold the same public key")
    site.public_keys = dict(public_keys)
    site.seed = os.urandom(32)
    count = len(public_keys)
    seed_shares = create_shares(site.seed, site.settings.threshold, count)
    key_shares = create_shares(site.mask_key, site.settings.threshold, count)
    out = {}
    for node, seed_share, key_share in zip(sorted(public_keys), seed_shares, key_shares):
        if node == site.node_id:
            site.seed_shares[node], site.key_shares[node] = seed_share, key_share
            continue
        plaintext = _pack(site.node_id, node, seed_share, key_share)
        out[node] = encrypt(_channel(site, node), plaintext)
    return out


def site_receive_shares(site: SiteSecrets, ciphertexts: Mapping[int, bytes]) -> None:
    """Step 3's first half: keep the shares the neighbours sent (checked to be from them, for us)."""
    if len(ciphertexts) + 1 < site.settings.threshold:
        raise SecAggError(
            f"shares from {len(ciphertexts)} neighbours: with this site, fewer than the threshold "
            f"{site.settings.threshold}"
        )
    for source, ciphertext in ciphertexts.items():
        if source not in site.public_keys or source == site.node_id:
            raise SecAggError(f"shares from node {source}, which is not a neighbour")
        src, dst, seed_share, key_share = _unpack(decrypt(_channel(site, source), ciphertext))
        if (src, dst) != (source, site.node_id):
            raise SecAggError(f"shares said to be from node {source} to {site.node_id} are from {src} to {dst}")
        site.seed_shares[source], site.key_shares[source] = seed_share, key_share
    site.peers = sorted(ciphertexts)


def site_mask(site: SiteSecrets, update: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """Step 3's second half: ``weight`` × ``update``, clipped and quantized, plus the private mask and
    the pairwise masks, mod the modulus, as uint32; the weight travels in :data:`WEIGHT` (masked likewise)."""
    s = site.settings
    if not np.isfinite(weight) or weight < 0:
        raise SecAggError(f"weight {weight} must be a finite number >= 0")
    if weight > s.max_weight:
        raise SecAggError(
            f"weight {weight:g} is above secagg-max-weight={s.max_weight:g}: raise the key (sums stay "
            "exact up to it) rather than have this site's weight cut"
        )
    q_ratio = round(weight / s.max_weight * s.quantization_range)
    ratio = q_ratio / s.quantization_range
    names = sorted(update)
    quantized = quantize([np.asarray(update[n], np.float64) * ratio for n in names], s.clipping_range,
                         s.quantization_range)  # fmt: skip
    vector = {WEIGHT: np.array([q_ratio], np.int64), **{n: q.astype(np.int64) for n, q in zip(names, quantized)}}
    entries = layout({n: update[n].shape for n in names})
    _add(vector, mask_stream(site.seed, entries, s.modulus_range), +1, s.modulus_range)
    for peer in site.peers:
        pair = mask_stream(_pair_key(site.mask_key, site.public_keys[peer][0]), entries, s.modulus_range)
        _add(vector, pair, +1 if site.node_id > peer else -1, s.modulus_range)
    site.masked = True
    return {name: values.astype(np.uint32) for name, values in vector.items()}  # the modulus is <= 2^32


def site_reveal(site: SiteSecrets, active: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
    """Step 4: this site's share of b for each ``active`` neighbour (its masked update arrived) and
    of the mask key for each ``dropped`` one. Refuses to reveal both secrets of any site."""
    both = set(active) & set(dropped)
    if both:
        raise SecAggError(f"asked for both secrets of nodes {sorted(both)}: that would unmask them")
    if site.node_id in dropped:
        raise SecAggError("asked for this site's own mask key")
    unknown = (set(active) | set(dropped)) - set(site.seed_shares)
    if unknown:
        raise SecAggError(f"holds no shares of nodes {sorted(unknown)}")
    if len(active) < site.settings.threshold:
        raise SecAggError(f"{len(active)} active neighbours, fewer than the threshold {site.settings.threshold}")
    return {**{n: site.seed_shares[n] for n in active}, **{n: site.key_shares[n] for n in dropped}}


def _channel(site: SiteSecrets, other: int) -> bytes:
    return generate_shared_key(bytes_to_private_key(site.share_key), bytes_to_public_key(site.public_keys[other][1]))


def _pack(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    return b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"), len(seed_share).to_bytes(4, "little"),
                     seed_share, key_share])  # fmt: skip


def _unpack(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst = int.from_bytes(plaintext[:8], "little"), int.from_bytes(plaintext[8:16], "little")
    size = int.from_bytes(plaintext[16:20], "little")
    return src, dst, plaintext[20 : 20 + size], plaintext[20 + size :]


# -- the server's side ------------------------------------------------------------------------------


def check_masked(vector: Mapping[str, np.ndarray], entries: Sequence[tuple[str, Shape]], modulus: int) -> str | None:
    """Why a site's masked vector cannot be summed (names, shapes, integer values in [0, modulus)), or None."""
    expected = dict(entries)
    if set(vector) != set(expected):
        missing, extra = sorted(set(expected) - set(vector)), sorted(set(vector) - set(expected))
        return f"masked update's tensors differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in entries:
        values = vector[name]
        if tuple(values.shape) != shape:
            return f"{name}: shape {tuple(values.shape)}, expected {shape}"
        if not np.issubdtype(values.dtype, np.integer):
            return f"{name}: dtype {values.dtype}, expected integers"
        if values.size and (values.min() < 0 or values.max() >= modulus):
            return f"{name}: values outside [0, {modulus})"
    return None


def sum_masked(
    total: dict[str, np.ndarray] | None, vector: Mapping[str, np.ndarray], modulus: int
) -> dict[str, np.ndarray]:
    """``total`` + ``vector`` mod the modulus (a new total when ``total`` is None)."""
    if total is None:
        return {name: np.asarray(values, np.int64) & (modulus - 1) for name, values in vector.items()}
    _add(total, {n: np.asarray(v, np.int64) for n, v in vector.items()}, +1, modulus)
    return total


@dataclass
class Unmasked:
    """The round's outcome: the weighted mean of the contributors' updates, and what it took."""

    mean: dict[str, np.ndarray]
    total_ratio: float  # the summed weights, as fractions of max-weight
    error_bound: float  # per coordinate, against the weighted mean with the quantized weights


def unmask(
    total: dict[str, np.ndarray],
    settings: Settings,
    contributors: Sequence[int],
    dropped: Mapping[int, Sequence[int]],
    mask_publics: Mapping[int, bytes],
    seed_shares: Mapping[int, Sequence[bytes]],
    key_shares: Mapping[int, Sequence[bytes]],
) -> Unmasked:
    """Remove every mask from the summed vectors of ``contributors`` and dequantize.

    ``dropped``: each site that shared keys but sent no masked update, with the contributors whose
    vectors hold a pairwise mask with it; ``seed_shares`` / ``key_shares``: the collected shares of
    each contributor's b and of each dropped site's mask key (at least ``threshold`` of each)."""
    entries = [(name, tuple(values.shape)) for name, values in total.items()]
    total = {name: values.copy() for name, values in total.items()}
    mod = settings.modulus_range
    for node in contributors:
        seed = _rebuild(seed_shares.get(node, ()), settings.threshold, f"node {node}'s mask seed")
        _add(total, mask_stream(seed, entries, mod), -1, mod)
    for node, peers in dropped.items():
        mask_key = _rebuild(key_shares.get(node, ()), settings.threshold, f"dropped node {node}'s mask key")
        try:
            bytes_to_private_key(mask_key)
        except ValueError as exc:
            raise SecAggError(f"dropped node {node}'s rebuilt mask key is not a key: {exc}") from exc
        for peer in peers:  # the peer added +mask when peer > node: take it out again
            pair = mask_stream(_pair_key(mask_key, mask_publics[peer]), entries, mod)
            _add(total, pair, -1 if peer > node else +1, mod)
    q_total = int(total.pop(WEIGHT)[0])
    if q_total <= 0:
        raise SecAggError("the contributors' weights sum to zero")
    names = list(total)
    values = dequantize([total[n] for n in names], settings.clipping_range, settings.quantization_range)
    # Each site's values were shifted by +clipping range before quantization; dequantize undid one.
    offset = (len(contributors) - 1) * settings.clipping_range
    total_ratio = q_total / settings.quantization_range
    mean = {n: (v - offset) / total_ratio for n, v in zip(names, values)}
    return Unmasked(mean, total_ratio, settings.error_bound(total_ratio, len(contributors)))


def _rebuild(shares: Sequence[bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares of {what}, fewer than the threshold {threshold}")
    try:
        return combine_shares(list(shares))
    except Exception as exc:  # malformed shares from a site: the round fails, the run does not
        raise SecAggError(f"the shares of {what} do not combine: {exc}") from exc
