"""Anomaly scores from memory banks: per layer kNN + normalizer, mean over layers, ensembles.

`Scorer.fit(bank, cfg)` builds one search index per layer and domain and the normalizer
statistics; `score(emb)` gives one score per window (higher = more anomalous).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bank import DOMAINS, MemoryBank
from edge_agent.errors import BankError, ConfigError, ModelMismatchError
from edge_agent.knn import DEFAULT_EXACT_BELOW, METRICS, HnswIndex, HnswParams, KnnIndex, build_index
from edge_agent.normalizers import NORMALIZERS, SIGMA_FALLBACKS, LayerBank, Normalizer, make_normalizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
LD_REDUCES = ("mean", "sum")
# Config fields the normalizer statistics depend on: stored statistics are reused only if they match.
_STAT_FIELDS = ("normalizer", "metric", "k_n", "ld_k", "ld_reduce", "k_source", "k_target",
                "sigma_fallback", "sigma_min_target")


@dataclass(frozen=True)
class ScoringConfig:
    normalizer: str = "ld-domain"
    metric: str = "euclidean"
    k_n: int = 1  # kNN score: mean distance to the k_n nearest refs
    ld_k: int = 16  # `ld`: neighbours over S U T for b(y)
    ld_reduce: str = "mean"  # b(y) = mean (default) or sum of the K distances
    k_source: int = 16  # `ld-domain`: K_S
    k_target: int = 9  # `ld-domain`: K_T
    # HNSW candidates for min_y d(x, y) / b(y) on large banks; 128: docs/benchmarks.md (ld-domain study)
    candidates: int = 128
    exact_below: int = DEFAULT_EXACT_BELOW  # banks with fewer refs use exact search
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 256
    hnsw_seed: int = 0
    sigma_fallback: str = "pooled"  # zscore-domain: sigma when the target bank is too small
    sigma_min_target: int = 4  # zscore-domain: fewer target refs than this use the fallback sigma
    layers: tuple[str, ...] | None = None  # None: the model's default_layers present in the bank

    def __post_init__(self) -> None:
        _choice("normalizer", self.normalizer, NORMALIZERS)
        _choice("metric", self.metric, METRICS)
        _choice("ld_reduce", self.ld_reduce, LD_REDUCES)
        _choice("sigma_fallback", self.sigma_fallback, SIGMA_FALLBACKS)
        for name, low in (("k_n", 1), ("ld_k", 1), ("k_source", 1), ("k_target", 1), ("candidates", 1),
                          ("exact_below", 0), ("hnsw_m", 2), ("hnsw_ef_construction", 1),
                          ("hnsw_ef_search", 1), ("hnsw_seed", 0), ("sigma_min_target", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"scoring.{name}", f"must be an integer >= {low}", value)
        if self.layers is not None:
            layers = self.layers
            if (not isinstance(layers, tuple) or not layers
                    or not all(isinstance(x, str) and x for x in layers) or len(set(layers)) != len(layers)):
                raise ConfigError("scoring.layers", "must be a non-empty list of distinct layer names", layers)

    @property
    def hnsw(self) -> HnswParams:
        return HnswParams(m=self.hnsw_m, ef_construction=self.hnsw_ef_construction,
                          ef_search=self.hnsw_ef_search, seed=self.hnsw_seed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "scoring") -> ScoringConfig:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a mapping", data)
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{path}.{key}", f"unknown key; known: {', '.join(sorted(known))}")
        values = dict(data)
        if isinstance(values.get("layers"), list):
            values["layers"] = tuple(values["layers"])
        try:
            return cls(**values)
        except ConfigError as exc:
            if path == "scoring":
                raise
            raise ConfigError(exc.path.replace("scoring", path, 1), str(exc).split(": ", 1)[1]) from None

    def statistics_key(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STAT_FIELDS}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"scoring.{name}", f"must be one of {', '.join(allowed)}", value)


class Scorer:
    """Normalized anomaly scores of one model's embeddings against one bank."""

    def __init__(self, bank: MemoryBank, cfg: ScoringConfig, layers: tuple[str, ...],
                 normalizers: dict[str, Normalizer]) -> None:
        self.bank = bank
        self.cfg = cfg
        self.layers = layers
        self.normalizers = normalizers

    @classmethod
    def fit(cls, bank: MemoryBank, cfg: ScoringConfig | None = None) -> Scorer:
        """Indexes and normalizer statistics per layer (statistics stored in a loaded bank are reused
        when they were fitted on the same refs with the same statistics settings)."""
        cfg = cfg or ScoringConfig()
        layers = _choose_layers(bank, cfg)
        stored = _usable_state(bank, cfg)
        normalizers = {}
        for layer in layers:
            source = _index(bank, layer, "source", cfg)
            target = _index(bank, layer, "target", cfg) if bank.count("target") else None
            lb = LayerBank(layer, source, target, bank.target_groups(layer), bank.count_raw("target"))
            layer_state = None if stored is None else stored["layers"].get(layer, {}).get("stats")
            normalizers[layer] = make_normalizer(lb, cfg, layer_state)
        return cls(bank, cfg, layers, normalizers)

    # --- scores -------------------------------------------------------------------------------
    def score_layers(self, emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for layer in self.layers:
            if layer not in emb:
                raise ConfigError("scoring.layers", f"the embeddings lack layer {layer!r} "
                                  f"(they have {', '.join(emb) or 'none'})", layer)
            x = np.asarray(emb[layer], dtype=np.float32)
            dim = self.bank.info.dim(layer)
            if x.ndim != 2 or x.shape[1] != dim:
                raise ModelMismatchError(f"layer {layer}: embeddings of shape {list(x.shape)} do not match "
                                         f"the bank's {dim}-d refs")
            out[layer] = self.normalizers[layer].score(x)
        return out

    def score(self, emb: dict[str, np.ndarray]) -> np.ndarray:
        """[B] mean over layers of the normalized scores."""
        per_layer = self.score_layers(emb)
        return np.mean(np.stack([per_layer[layer] for layer in self.layers]), axis=0)

    def loo_scores_layers(self) -> dict[str, np.ndarray]:
        return {layer: self.normalizers[layer].loo_scores() for layer in self.layers}

    def loo_scores(self) -> np.ndarray:
        """Leave-one-out scores of the bank's raw refs (source refs, then target refs; see loo_names).

        Each ref is scored against the banks with itself (and its own MemMixup points) left out;
        the normalizer statistics are the ones fitted on the whole bank.
        """
        per_layer = self.loo_scores_layers()
        return np.mean(np.stack([per_layer[layer] for layer in self.layers]), axis=0)

    def loo_names(self) -> list[str]:
        return [*self.bank.names["source"], *self.bank.names["target"]]

    # --- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "bank_fingerprint": self.bank.fingerprint(),
            "config": self.cfg.to_dict(),
            "layers": {
                layer: {"normalizer": norm.name, "stats": norm.state(),
                        "search": {d: (None if idx is None else idx.kind) for d, idx in
                                   (("source", norm.bank.source), ("target", norm.bank.target))}}
                for layer, norm in self.normalizers.items()
            },
        }

    def hnsw_indexes(self) -> dict[tuple[str, str], HnswIndex]:
        out = {}
        for layer, norm in self.normalizers.items():
            for domain, index in (("source", norm.bank.source), ("target", norm.bank.target)):
                if isinstance(index, HnswIndex):
                    out[(layer, domain)] = index
        return out

    def save(self, directory: str | os.PathLike[str], threshold: dict[str, Any] | None = None,
             model_sha256: str | None = None) -> Path:
        """Save the bank with this scorer's statistics and HNSW graphs (MemoryBank.save)."""
        return self.bank.save(directory, scorer_state=self.state(), threshold=threshold,
                              indexes=self.hnsw_indexes(), model_sha256=model_sha256)


def _choose_layers(bank: MemoryBank, cfg: ScoringConfig) -> tuple[str, ...]:
    if cfg.layers is not None:
        missing = [layer for layer in cfg.layers if layer not in bank.layers]
        if missing:
            raise ConfigError("scoring.layers", f"not in the bank (it has {', '.join(bank.layers)})",
                              missing[0] if len(missing) == 1 else missing)
        return cfg.layers
    layers = tuple(layer for layer in bank.info.default_layers if layer in bank.layers)
    if not layers:
        raise ConfigError("scoring.layers", f"none of the model's default layers "
                          f"({', '.join(bank.info.default_layers)}) is in the bank "
                          f"({', '.join(bank.layers)}); name the layers to use")
    return layers


def _usable_state(bank: MemoryBank, cfg: ScoringConfig) -> dict[str, Any] | None:
    state = bank.scorer_state
    if not state:
        return None
    try:
        stored_cfg = ScoringConfig.from_dict(state["config"])
        same = (state.get("version") == STATE_VERSION and state["bank_fingerprint"] == bank.fingerprint()
                and stored_cfg.statistics_key() == cfg.statistics_key() and isinstance(state["layers"], dict))
    except (KeyError, TypeError, ConfigError):
        same = False
    if not same:
        log.info("memory bank %s: stored scorer statistics do not match the scoring config; refitting",
                 bank.path or "(in memory)")
        return None
    return state


def _index(bank: MemoryBank, layer: str, domain: str, cfg: ScoringConfig) -> KnnIndex:
    refs = bank.get(layer, domain)
    stored = bank.stored_indexes.get((layer, domain))
    if len(refs) >= cfg.exact_below and stored is not None:
        if stored.params.same_graph(cfg.hnsw) and stored.count == len(refs):
            return HnswIndex(refs, cfg.metric, cfg.hnsw, graph=stored.graph)
        log.info("memory bank %s: stored HNSW index %s/%s was built with other parameters; rebuilding",
                 bank.path, layer, domain)
    return build_index(refs, cfg.metric, cfg.exact_below, cfg.hnsw)


class EnsembleScorer:
    """Mean of the normalized scores of several scorers (e.g. encoders of different models)."""

    def __init__(self, scorers: list[Scorer]) -> None:
        if not scorers:
            raise ConfigError("scoring", "an ensemble needs at least one scorer")
        self.scorers = list(scorers)

    def score(self, embs: list[dict[str, np.ndarray]]) -> np.ndarray:
        if len(embs) != len(self.scorers):
            raise ConfigError("scoring", f"{len(embs)} embedding sets for {len(self.scorers)} scorers")
        return np.mean(np.stack([s.score(e) for s, e in zip(self.scorers, embs, strict=True)]), axis=0)

    def loo_scores(self) -> np.ndarray:
        """Mean leave-one-out scores; the scorers' banks must hold the same refs in the same order."""
        names = self.scorers[0].loo_names()
        for s in self.scorers[1:]:
            if s.loo_names() != names:
                raise BankError("ensemble leave-one-out scores need banks built from the same clips, in order")
        return np.mean(np.stack([s.loo_scores() for s in self.scorers]), axis=0)


__all__ = ["DOMAINS", "EnsembleScorer", "Scorer", "ScoringConfig"]
