"""How scores are computed: the scoring config (normalizer, kNN and HNSW settings, layers), validated.

Errors name the field as `scoring.<field>`, the config section this dataclass is; `from_dict(data, path)`
places them where the section was found (`sources[0].scoring.k_n` in an agent config).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.scoring.knn import DEFAULT_EXACT_BELOW, METRICS, HnswParams

SECTION = "scoring"
NORMALIZERS: tuple[str, ...] = ("none", "zscore-test", "zscore-domain", "ld", "ld-domain")
NONNEGATIVE_SCORES: tuple[str, ...] = ("none", "ld", "ld-domain")  # distances and distance ratios
SIGMA_FALLBACKS: tuple[str, ...] = ("pooled", "source")
LD_REDUCES: tuple[str, ...] = ("mean", "sum")
# Beside each layer's kNN score: "off", or "add" the feature-statistics term (scoring/feature_stats.py).
FEATURE_STATS: tuple[str, ...] = ("off", "add")
# How the members (layers, statistics terms; then encoders) are combined: the raw "mean", or the mean of
# each member "standardized" by the mean and std of its own leave-one-out training scores.
FUSIONS: tuple[str, ...] = ("mean", "standardized")
# Config fields the normalizer statistics depend on: stored statistics are reused only if they match.
_STAT_FIELDS = ("normalizer", "metric", "k_n", "ld_k", "ld_reduce", "k_source", "k_target",
                "sigma_fallback", "sigma_min_target", "feature_stats", "feature_stats_layers", "feature_stats_eps",
                "fusion")
# (field, lowest, highest): the highest values are far beyond any bank a device holds, and keep a typo
# (or a hostile push) from asking for a billion neighbours.
_INT_RANGES = (("k_n", 1, 1000), ("ld_k", 1, 1000), ("k_source", 1, 1000), ("k_target", 1, 1000),
               ("candidates", 1, 100_000), ("exact_below", 0, 2**31 - 1), ("hnsw_m", 2, 256),
               ("hnsw_ef_construction", 1, 10_000), ("hnsw_ef_search", 1, 10_000), ("hnsw_seed", 0, 2**31 - 1),
               ("sigma_min_target", 2, 1000))


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
    # The defaults of the statistics term and the fusion were chosen on development data (docs/evaluation.md).
    feature_stats: str = "add"  # "add": each layer's feature-statistics term beside its kNN score
    feature_stats_layers: tuple[str, ...] | None = None  # with "add": only these layers (None: every scored one)
    # with "add": each dimension's std is floored at eps x the layer's typical within-domain std
    feature_stats_eps: float = 1.0
    fusion: str = "standardized"  # members standardized by their leave-one-out training scores, or the raw "mean"

    def __post_init__(self) -> None:
        _choice("normalizer", self.normalizer, NORMALIZERS)
        _choice("feature_stats", self.feature_stats, FEATURE_STATS)
        _choice("fusion", self.fusion, FUSIONS)
        _choice("metric", self.metric, METRICS)
        _choice("ld_reduce", self.ld_reduce, LD_REDUCES)
        _choice("sigma_fallback", self.sigma_fallback, SIGMA_FALLBACKS)
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{SECTION}.{name}", f"must be an integer >= {low}", value)
            if value > high:
                raise ConfigError(f"{SECTION}.{name}", f"must be <= {high}", value)
        eps = self.feature_stats_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps <= 10):
            raise ConfigError(f"{SECTION}.feature_stats_eps", "must be a number > 0 and <= 10", eps)
        chosen = self.feature_stats_layers
        if chosen is not None and (not isinstance(chosen, tuple) or not chosen
                                   or not all(isinstance(x, str) and x for x in chosen)
                                   or len(set(chosen)) != len(chosen)):
            raise ConfigError(f"{SECTION}.feature_stats_layers", "must be a non-empty list of distinct layer names",
                              chosen)
        if self.layers is not None:
            layers = self.layers
            if (not isinstance(layers, tuple) or not layers
                    or not all(isinstance(x, str) and x for x in layers) or len(set(layers)) != len(layers)):
                raise ConfigError(f"{SECTION}.layers", "must be a non-empty list of distinct layer names", layers)

    @property
    def hnsw(self) -> HnswParams:
        return HnswParams(m=self.hnsw_m, ef_construction=self.hnsw_ef_construction,
                          ef_search=self.hnsw_ef_search, seed=self.hnsw_seed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        data["feature_stats_layers"] = None if self.feature_stats_layers is None else list(self.feature_stats_layers)
        return data

    @classmethod
    def from_dict(cls, data: object, path: str = SECTION) -> ScoringConfig:
        """Validate a mapping (YAML, JSON, a stored bank's config); errors are placed at `path`."""
        try:
            if not isinstance(data, dict):
                raise ConfigError(SECTION, "must be a mapping", data)
            known = {f.name for f in fields(cls)}
            for key in data:
                if key not in known:
                    raise ConfigError(f"{SECTION}.{key}", f"unknown key; known: {', '.join(sorted(known))}")
            values = dict(data)
            # YAML 1.1 reads an unquoted `feature_stats: off` (or on, no, yes) as a boolean
            if isinstance(values.get("feature_stats"), bool):
                values["feature_stats"] = "add" if values["feature_stats"] else "off"
            for key in ("layers", "feature_stats_layers"):
                if isinstance(values.get(key), list):
                    values[key] = tuple(values[key])
            return cls(**values)
        except ConfigError as exc:
            raise exc.relocated(SECTION, path) from None

    def statistics_key(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STAT_FIELDS}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{SECTION}.{name}", f"must be one of {', '.join(allowed)}", value)

