"""Anomaly scores from memory banks: per layer kNN + normalizer (and, as an option, the feature-statistics
term), combined over layers, then over models.

`BankScorer.fit(bank, cfg)` builds one search index per layer and domain of one model's bank and the
normalizer statistics; `score(emb)` gives one score per window (higher = more anomalous). Its members are
each layer's kNN score and, with `feature_stats: add`, each layer's statistics term (`<layer>:stats`); with
`fusion: standardized` every member is standardized by the mean and std of its own leave-one-out training
scores before the mean, so members on different scales weigh the same. `Scorer` is what callers use: the
BankScorers of a model set (one model, or an ensemble) and the mean of their scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import BankError, ConfigError, ModelMismatchError
from edge_agent.logs import get_logger
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.feature_stats import FeatureStats, TooFewRefs
from edge_agent.scoring.knn import HnswIndex, KnnIndex, build_index
from edge_agent.scoring.normalizers import LayerBank, Normalizer, make_normalizer

log = get_logger(__name__)

# 2: a MemMixup bank's target densities and leave-one-out statistics are measured without the mixes (version 1
# states of unmixed banks hold the same numbers and stay usable).
STATE_VERSION = 2


class BankScorer:
    """Normalized anomaly scores of one model's embeddings against that model's bank."""

    def __init__(self, bank: MemoryBank, cfg: ScoringConfig, layers: tuple[str, ...],
                 normalizers: dict[str, Normalizer], feature_stats: dict[str, FeatureStats] | None = None,
                 fusion: dict[str, tuple[float, float]] | None = None,
                 loo_stats: dict[str, np.ndarray] | None = None) -> None:
        self.bank = bank
        self.cfg = cfg
        self.layers = layers
        self.normalizers = normalizers
        self.feature_stats = feature_stats or {}
        self._loo_stats: dict[str, np.ndarray] = dict(loo_stats or {})  # of the statistics terms fitted now
        # member -> (mean, std) of its leave-one-out scores, for fusion: standardized
        self.fusion = fusion if fusion is not None else self._fusion_stats()

    @classmethod
    def fit(cls, bank: MemoryBank, cfg: ScoringConfig | None = None) -> BankScorer:
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
        feature_stats, loo_stats = _feature_stats(bank, cfg, layers, stored)
        return cls(bank, cfg, layers, normalizers, feature_stats, _stored_fusion(stored, layers, cfg, feature_stats),
                   loo_stats)

    @property
    def members(self) -> list[str]:
        """The scores combined: each layer's kNN score, and `<layer>:stats` for a statistics term."""
        return [m for layer in self.layers for m in (layer, *((f"{layer}:stats",) if layer in self.feature_stats
                                                              else ()))]

    def _fusion_stats(self) -> dict[str, tuple[float, float]]:
        if self.cfg.fusion != "standardized":
            return {}
        out = {}
        for name, scores in self.loo_members().items():
            finite = scores[np.isfinite(scores)]
            mean = float(finite.mean()) if finite.size else 0.0
            std = float(finite.std()) if finite.size > 1 else 0.0
            out[name] = (mean, std if std > 0 else 1.0)
        return out

    def _combine(self, members: dict[str, np.ndarray]) -> np.ndarray:
        if self.cfg.fusion == "standardized":
            return np.mean(np.stack([(members[m] - self.fusion[m][0]) / self.fusion[m][1] for m in self.members]),
                           axis=0)
        return np.mean(np.stack([members[m] for m in self.members]), axis=0)

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

    def score_members(self, emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every member's score (see `members`), before fusion."""
        out = self.score_layers(emb)
        for layer, stats in self.feature_stats.items():
            out[f"{layer}:stats"] = stats.score(np.asarray(emb[layer], dtype=np.float32))
        return out

    def score(self, emb: dict[str, np.ndarray]) -> np.ndarray:
        """[B] the members' scores combined (`fusion`)."""
        return self._combine(self.score_members(emb))

    def loo_scores_layers(self) -> dict[str, np.ndarray]:
        return {layer: self.normalizers[layer].loo_scores() for layer in self.layers}

    def loo_members(self) -> dict[str, np.ndarray]:
        out = self.loo_scores_layers()
        for layer, stats in self.feature_stats.items():
            loo = self._loo_stats.get(layer)
            if loo is None:  # statistics loaded from bank.json: their leave-one-out scores again (closed form)
                loo = FeatureStats.fit(layer, _raw_refs(self.bank, layer), stats.eps)[1]
                self._loo_stats[layer] = loo
            out[f"{layer}:stats"] = loo
        return out

    def loo_scores(self) -> np.ndarray:
        """Leave-one-out scores of the bank's raw refs (source refs, then target refs; see loo_names).

        Each ref is scored against the banks with itself (and its own MemMixup points) left out;
        the normalizer statistics are the ones fitted on the whole bank.
        """
        return self._combine(self.loo_members())

    def loo_names(self) -> list[str]:
        return [*self.bank.names["source"], *self.bank.names["target"]]

    # --- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        layers: dict[str, Any] = {
            layer: {"normalizer": norm.name, "stats": norm.state(),
                    "search": {d: (None if idx is None else idx.kind) for d, idx in
                               (("source", norm.bank.source), ("target", norm.bank.target))}}
            for layer, norm in self.normalizers.items()
        }
        for layer, stats in self.feature_stats.items():
            layers[layer]["feature_stats"] = stats.to_dict()
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "bank_fingerprint": self.bank.fingerprint(),
            "config": self.cfg.to_dict(),
            "layers": layers,
        }
        if self.fusion:
            state["fusion"] = {name: list(values) for name, values in self.fusion.items()}
        return state

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


LAYER_HINT = "another layer needs an export that has it, edge-export --layers, and a bank enrolled from that"


def _choose_layers(bank: MemoryBank, cfg: ScoringConfig) -> tuple[str, ...]:
    if cfg.layers is not None:
        missing = [layer for layer in cfg.layers if layer not in bank.layers]
        if missing:
            raise ConfigError("scoring.layers", f"not in the bank (it has {', '.join(bank.layers)}, the outputs of "
                              f"the export it was enrolled from; {LAYER_HINT})",
                              missing[0] if len(missing) == 1 else missing)
        return cfg.layers
    layers = tuple(layer for layer in bank.info.default_layers if layer in bank.layers)
    if not layers:
        raise ConfigError("scoring.layers", f"none of the model's default layers "
                          f"({', '.join(bank.info.default_layers)}) is in the bank "
                          f"({', '.join(bank.layers)}); name the layers to use")
    return layers


def stored_state_current(state: dict[str, Any], bank: MemoryBank) -> bool:
    """Whether a stored scorer state was computed the way this release computes it."""
    version = state.get("version")
    return version == STATE_VERSION or (version == 1 and bank.mixup is None)


def _usable_state(bank: MemoryBank, cfg: ScoringConfig) -> dict[str, Any] | None:
    state = bank.scorer_state
    if not state:
        return None
    try:
        stored_cfg = ScoringConfig.from_dict(state["config"])
        same = (stored_state_current(state, bank) and state["bank_fingerprint"] == bank.fingerprint()
                and stored_cfg.statistics_key() == cfg.statistics_key() and isinstance(state["layers"], dict))
    except (KeyError, TypeError, ConfigError):
        same = False
    if not same:
        log.info("scorer_refit", bank=bank.path or "(in memory)",
                 cause="stored statistics do not match the scoring config")
        return None
    return state


def _raw_refs(bank: MemoryBank, layer: str) -> dict[str, np.ndarray]:
    return {domain: bank.get_raw(layer, domain) for domain in ("source", "target")}


def _feature_stats(bank: MemoryBank, cfg: ScoringConfig, layers: tuple[str, ...], stored: dict[str, Any] | None
                   ) -> tuple[dict[str, FeatureStats], dict[str, np.ndarray]]:
    """Each layer's statistics term (and its leave-one-out scores when fitted now), from bank.json when stored."""
    if cfg.feature_stats == "off":
        return {}, {}
    chosen = cfg.feature_stats_layers if cfg.feature_stats_layers is not None else layers
    missing = [layer for layer in chosen if layer not in layers]
    if missing:
        raise ConfigError("scoring.feature_stats_layers", f"must be among the scored layers ({', '.join(layers)})",
                          missing[0] if len(missing) == 1 else missing)
    stats, loo = {}, {}
    for layer in chosen:
        doc = None if stored is None else stored["layers"].get(layer, {}).get("feature_stats")
        if doc is not None and doc.get("eps") == cfg.feature_stats_eps:
            try:
                stats[layer] = FeatureStats.from_dict(doc)
                continue
            except ValueError as exc:
                log.warning("feature_stats_refit", bank=bank.path or "(in memory)", layer=layer, error=str(exc))
        try:
            stats[layer], loo[layer] = FeatureStats.fit(layer, _raw_refs(bank, layer), cfg.feature_stats_eps)
        except TooFewRefs as exc:  # a bank of a few windows still scores, by its kNN scores alone
            log.warning("feature_stats_skipped", bank=bank.path or "(in memory)", layer=layer, cause=str(exc))
        except ValueError as exc:
            raise BankError(f"layer {layer}: the feature-statistics term cannot be fitted: {exc}") from None
    return stats, loo


def _stored_fusion(stored: dict[str, Any] | None, layers: tuple[str, ...], cfg: ScoringConfig,
                   feature_stats: dict[str, FeatureStats]) -> dict[str, tuple[float, float]] | None:
    """The fusion statistics of bank.json, if they cover exactly these members (else None: computed again)."""
    if cfg.fusion != "standardized" or stored is None or not isinstance(stored.get("fusion"), dict):
        return None
    members = [m for layer in layers for m in (layer, *((f"{layer}:stats",) if layer in feature_stats else ()))]
    doc = stored["fusion"]
    if sorted(doc) != sorted(members):
        return None
    out = {}
    for name in members:
        value = doc[name]
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value) or value[1] <= 0):
            return None
        out[name] = (float(value[0]), float(value[1]))
    return out


def _index(bank: MemoryBank, layer: str, domain: str, cfg: ScoringConfig) -> KnnIndex:
    refs = bank.get(layer, domain)
    stored = bank.stored_indexes.get((layer, domain))
    if len(refs) >= cfg.exact_below and stored is not None:
        if stored.params.same_graph(cfg.hnsw) and stored.count == len(refs):
            return HnswIndex(refs, cfg.metric, cfg.hnsw, graph=stored.graph)
        log.info("hnsw_rebuild", bank=bank.path, layer=layer, domain=domain,
                 cause="the stored graph was built with other parameters")
    return build_index(refs, cfg.metric, cfg.exact_below, cfg.hnsw)


class Scorer:
    """The scores of a model set: the mean of its members' normalized scores (one member: its scores)."""

    def __init__(self, members: Sequence[BankScorer]) -> None:
        if not members:
            raise ConfigError("scoring", "a scorer needs at least one member")
        self.members = list(members)

    @classmethod
    def fit(cls, banks: Sequence[MemoryBank], cfg: ScoringConfig | None = None) -> Scorer:
        """One BankScorer per bank of a model set (`BankSet.banks`), in its order."""
        return cls([BankScorer.fit(bank, cfg) for bank in banks])

    @property
    def layers(self) -> list[tuple[str, ...]]:
        """The layers each member scores."""
        return [member.layers for member in self.members]

    def score(self, embs: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """embs: per member {layer: [B, D]} -> [B] mean of the members' scores."""
        if len(embs) != len(self.members):
            raise ConfigError("scoring", f"{len(embs)} embedding sets for {len(self.members)} scorers")
        return np.mean(np.stack([s.score(e) for s, e in zip(self.members, embs, strict=True)]), axis=0)

    def loo_scores(self) -> np.ndarray:
        """Mean leave-one-out scores; the members' banks must hold the same refs in the same order."""
        names = self.members[0].loo_names()
        for member in self.members[1:]:
            if member.loo_names() != names:
                raise BankError("ensemble leave-one-out scores need banks built from the same clips, in order")
        return np.mean(np.stack([s.loo_scores() for s in self.members]), axis=0)
