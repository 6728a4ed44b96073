"""Anomaly scores from memory banks: per layer kNN + normalizer, mean over layers, mean over models.

`BankScorer.fit(bank, cfg)` builds one search index per layer and domain of one model's bank and the
normalizer statistics; `score(emb)` gives one score per window (higher = more anomalous). `Scorer` is
what callers use: the BankScorers of a model set (one model, or an ensemble) and the mean of their scores.
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
from edge_agent.scoring.knn import HnswIndex, KnnIndex, build_index
from edge_agent.scoring.normalizers import LayerBank, Normalizer, make_normalizer

log = get_logger(__name__)

STATE_VERSION = 1


class BankScorer:
    """Normalized anomaly scores of one model's embeddings against that model's bank."""

    def __init__(self, bank: MemoryBank, cfg: ScoringConfig, layers: tuple[str, ...],
                 normalizers: dict[str, Normalizer]) -> None:
        self.bank = bank
        self.cfg = cfg
        self.layers = layers
        self.normalizers = normalizers

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
        log.info("scorer_refit", bank=bank.path or "(in memory)",
                 cause="stored statistics do not match the scoring config")
        return None
    return state


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
