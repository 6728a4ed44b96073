"""Domain normalizers of kNN anomaly scores (DESIGN.md "Method"; docs/method.md has the decisions).

A normalizer is fitted on one layer of a bank (a source index, an optional target index) and
turns a query batch into one score per row. Each normalizer computes one feature per domain
(the kNN distance d_D, or the local-density ratio min_y d(x, y) / b(y)) and combines the domains
with a min. Leave-one-out scores reuse the same path with the ref itself (and, for a target ref,
the MemMixup points made from it) excluded from the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import BankError, ConfigError
from edge_agent.logs import get_logger
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.knn import ExactIndex, HnswIndex, HnswParams, KnnIndex, cap_k, exact_distances

log = get_logger(__name__)

# b(y) = 0 happens when a ref has K exact duplicates; such refs get this fraction of the median
# positive b so that d / b stays finite (and such a ref still wins the min for a query on it).
B_FLOOR_REL = 1e-6
_TINY = 1e-12
_BLOCK_ELEMENTS = 4_000_000
_RECHECK = 8  # best ratios per query recomputed from exact differences


@dataclass
class LayerBank:
    """One layer of a bank as the normalizers see it.

    target_groups[j] is the raw target ref that target row j is (j < n_target_raw) or was mixed
    from (MemMixup rows); it defines what a leave-one-out query of a raw target ref excludes.
    """

    layer: str
    source: KnnIndex
    target: KnnIndex | None
    target_groups: np.ndarray
    n_target_raw: int

    @property
    def n_source(self) -> int:
        return self.source.size

    @property
    def n_target(self) -> int:
        return 0 if self.target is None else self.target.size

    def target_loo_exclude(self) -> np.ndarray:
        """[n_target_raw, E] target rows each raw target ref must not see (-1 padded)."""
        groups = np.asarray(self.target_groups, dtype=np.int64)
        counts = np.bincount(groups, minlength=self.n_target_raw)
        out = np.full((self.n_target_raw, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
        order = np.argsort(groups, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        column = np.arange(len(groups)) - np.repeat(starts, counts)
        out[groups[order], column] = order
        return out

    def target_group_exclude(self) -> np.ndarray:
        """[n_target, E]: for each target row, every row of its group (its raw ref and that ref's MemMixup rows).

        A row's leave-one-out distance is measured outside its group: a raw ref's own mixes lie a tenth of
        the way to it."""
        return self.target_loo_exclude()[np.asarray(self.target_groups, dtype=np.int64)]

    @property
    def mixed(self) -> bool:
        return self.n_target > self.n_target_raw

    def raw_target(self) -> KnnIndex | None:
        """The raw target refs alone (the bank's target index when it holds no MemMixup rows).

        Local densities are measured on them: the mixes add points to the memory, not to the density, which
        with five mixes per ref would otherwise shrink to the distance between a ref and its own mixes."""
        if self.target is None or not self.mixed:
            return self.target
        return ExactIndex(self.target.refs[: self.n_target_raw], self.target.metric)

    def per_target_row(self, values: np.ndarray) -> np.ndarray:
        """A value per raw target ref -> a value per target row (a MemMixup row takes its raw ref's)."""
        return np.asarray(values)[np.asarray(self.target_groups, dtype=np.int64)]


@dataclass
class Features:
    """Per-domain features of a batch; target is None when the bank has no target refs."""

    source: np.ndarray
    target: np.ndarray | None

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        targets = [p.target for p in parts if p.target is not None]
        tgt = np.concatenate(targets) if len(targets) == len(parts) else None
        return Features(np.concatenate([p.source for p in parts]), tgt)


def knn_mean(index: KnnIndex, x: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """d_D(x): mean distance to the k nearest refs (k capped); +inf where no ref is available."""
    dist, _ = index.query(x, k, exclude)
    if dist.shape[1] == 0:
        return np.full(dist.shape[0], np.inf)
    return dist.mean(axis=1)


def _reduce(dist: np.ndarray, how: str) -> np.ndarray:
    return dist.sum(axis=1) if how == "sum" else dist.mean(axis=1)


def floor_b(b: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    positive = b[b > 0]
    floor = B_FLOOR_REL * float(np.median(positive)) if positive.size else _TINY
    low = int(np.count_nonzero(b < floor))
    if low:
        log.warning("local_density_floored", where=what, refs=low, floor=floor, cause="duplicate refs")
    return np.maximum(b, floor), low


def min_ratio(index: KnnIndex, b: np.ndarray, x: np.ndarray, candidates: int,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """min over refs y of d(x, y) / b(y); +inf where every ref is excluded.

    Exact over all refs for an exact index or when the candidates cover the bank; otherwise the
    ratio is computed exactly on the `candidates` nearest refs proposed by HNSW.
    """
    x = np.asarray(x, dtype=np.float32)
    if index.kind == "exact" or index.size <= candidates:
        return _min_ratio_full(index, b, x, exclude)
    dist, idx = index.query(x, candidates, exclude)
    return (dist / b[idx]).min(axis=1)


def _min_ratio_full(index: KnnIndex, b: np.ndarray, x: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    out = np.full(x.shape[0], np.inf)
    if index.size == 0:
        return out
    rows = max(1, _BLOCK_ELEMENTS // index.size)
    keep = min(_RECHECK, index.size)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        sq = index.pairwise_sq(x[start:stop])
        ratio = (np.sqrt(sq) if index.metric == "euclidean" else sq) / b[None, :]
        if exclude is not None:
            block = np.asarray(exclude, dtype=np.int64).reshape(x.shape[0], -1)[start:stop]
            r, c = np.nonzero(block >= 0)
            ratio[r, block[r, c]] = np.inf
        # The expansion loses precision for near-duplicates: redo the best few ratios exactly.
        idx = np.argpartition(ratio, keep - 1, axis=1)[:, :keep]
        excluded = np.isinf(np.take_along_axis(ratio, idx, 1))
        exact = exact_distances(x[start:stop], index.refs, idx, index.metric) / b[idx]
        out[start:stop] = np.where(excluded, np.inf, exact).min(axis=1)
    return out


class Normalizer:
    """Base: subclasses provide features() and combine(), and fit/restore their statistics."""

    name: str = ""

    def __init__(self, bank: LayerBank, cfg: ScoringConfig) -> None:
        self.bank = bank
        self.cfg = cfg

    # --- statistics ---------------------------------------------------------------------------
    def fit(self) -> None:
        """Compute statistics from the bank."""

    def restore(self, state: dict[str, Any]) -> bool:
        """Adopt statistics from a stored state(); False when they do not fit this bank."""
        return True

    def state(self) -> dict[str, Any]:
        return {}

    # --- scoring ------------------------------------------------------------------------------
    def features(self, x: np.ndarray, ex_source: np.ndarray | None = None,
                 ex_target: np.ndarray | None = None) -> Features:
        raise NotImplementedError

    def combine(self, feats: Features) -> np.ndarray:
        raise NotImplementedError

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.combine(self.features(x))

    def loo_scores(self) -> np.ndarray:
        """Scores of the source refs, then the raw target refs, each with itself left out."""
        b = self.bank
        src = self.features(b.source.refs, ex_source=np.arange(b.n_source)[:, None])
        parts = [src]
        if b.target is not None and b.n_target_raw:
            parts.append(self.features(b.target.refs[: b.n_target_raw], ex_target=b.target_loo_exclude()))
        return self.combine(Features.concat(parts))


class _KnnFeatures(Normalizer):
    def features(self, x: np.ndarray, ex_source: np.ndarray | None = None,
                 ex_target: np.ndarray | None = None) -> Features:
        k = self.cfg.k_n
        d_s = knn_mean(self.bank.source, x, k, ex_source)
        d_t = None if self.bank.target is None else knn_mean(self.bank.target, x, k, ex_target)
        return Features(d_s, d_t)


def _domain_min(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return a if b is None else np.minimum(a, b)


class NoNormalizer(_KnnFeatures):
    name = "none"

    def combine(self, feats: Features) -> np.ndarray:
        return _domain_min(feats.source, feats.target)


class ZScoreTest(_KnnFeatures):
    """Standardizes each domain's distances over the batch it is given (offline evaluation only)."""

    name = "zscore-test"

    def combine(self, feats: Features) -> np.ndarray:
        if feats.source.shape[0] < 2:
            raise ConfigError("scoring.normalizer", "zscore-test standardizes over the test batch and "
                              f"needs at least 2 windows, got {feats.source.shape[0]}", self.name)

        def z(d: np.ndarray) -> np.ndarray:
            finite = d[np.isfinite(d)]
            if finite.size == 0:
                return np.full_like(d, np.inf)
            sd = float(finite.std())
            return (d - float(finite.mean())) / (sd if sd > _TINY else 1.0)

        return _domain_min(z(feats.source), None if feats.target is None else z(feats.target))


class ZScoreDomain(_KnnFeatures):
    """(d_D - mu_D) / sigma_T, mu_D and sigma_T from leave-one-out distances within each bank."""

    name = "zscore-domain"

    def fit(self) -> None:
        b, k = self.bank, self.cfg.k_n
        if b.n_source < 2:
            raise BankError(f"layer {b.layer}: zscore-domain needs at least 2 source refs, got {b.n_source}")
        loo_s = knn_mean(b.source, b.source.refs, k, np.arange(b.n_source)[:, None])
        loo_t = (knn_mean(b.target, b.target.refs, k, b.target_group_exclude())
                 if b.target is not None and b.n_target_raw >= 2 else np.zeros(0))
        self.mu_source = float(loo_s.mean())
        if b.n_target_raw >= 2:
            self.mu_target: float | None = float(loo_t.mean())
        elif b.n_target >= 1:
            self.mu_target = self.mu_source
            log.warning("zscore_mu_target_from_source", layer=b.layer, target_refs=1,
                        cause="one target ref has no leave-one-out distance")
        else:
            self.mu_target = None
        sigma_t = float(loo_t.std()) if loo_t.size >= 2 else 0.0
        self.sigma_target_raw = sigma_t
        # raw refs count: MemMixup rows are not independent draws of the target domain
        if b.n_target_raw >= self.cfg.sigma_min_target and sigma_t > _TINY * max(1.0, abs(self.mu_target or 0.0)):
            self.sigma, self.sigma_from = sigma_t, "target"
        else:
            how = self.cfg.sigma_fallback
            pool = np.concatenate([loo_s, loo_t]) if how == "pooled" else loo_s
            self.sigma, self.sigma_from = float(pool.std()), how
            report = log.info if b.n_target == 0 else log.warning
            report("zscore_sigma_fallback", layer=b.layer, target_refs=b.n_target, sigma_target=sigma_t,
                   fallback=how, sigma=self.sigma)
        if not self.sigma > _TINY:
            log.warning("zscore_sigma_floored", layer=b.layer, sigma=1.0,
                        cause="all leave-one-out distances are equal")
            self.sigma, self.sigma_from = 1.0, "floor"

    def restore(self, state: dict[str, Any]) -> bool:
        try:
            self.mu_source = float(state["mu_source"])
            self.mu_target = None if state["mu_target"] is None else float(state["mu_target"])
            self.sigma = float(state["sigma"])
            self.sigma_from = str(state["sigma_from"])
            self.sigma_target_raw = float(state["sigma_target_raw"])
        except (KeyError, TypeError, ValueError):
            return False
        return (self.mu_target is None) == (self.bank.n_target == 0) and self.sigma > 0

    def state(self) -> dict[str, Any]:
        return {"mu_source": self.mu_source, "mu_target": self.mu_target, "sigma": self.sigma,
                "sigma_from": self.sigma_from, "sigma_target_raw": self.sigma_target_raw}

    def combine(self, feats: Features) -> np.ndarray:
        z_s = (feats.source - self.mu_source) / self.sigma
        if feats.target is None or self.mu_target is None:
            return z_s
        return np.minimum(z_s, (feats.target - self.mu_target) / self.sigma)


class _LocalDensity(Normalizer):
    """min over refs of d(x, y) / b(y); subclasses decide how b is computed."""

    def fit(self) -> None:
        if self.bank.n_source + self.bank.n_target < 2:
            raise BankError(f"layer {self.bank.layer}: {self.name} needs at least 2 refs")
        b_s, b_t = self._local_density()
        self.b_source, self.floored_source = floor_b(b_s, f"layer {self.bank.layer} source")
        self.b_target, self.floored_target = (floor_b(b_t, f"layer {self.bank.layer} target")
                                              if b_t.size else (b_t, 0))

    def _local_density(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> bool:
        try:
            b_s = np.asarray(state["b_source"], dtype=np.float64)
            b_t = np.asarray(state["b_target"], dtype=np.float64)
            self.floored_source = int(state["floored_source"])
            self.floored_target = int(state["floored_target"])
        except (KeyError, TypeError, ValueError):
            return False
        ok = (b_s.shape == (self.bank.n_source,) and b_t.shape == (self.bank.n_target,)
              and bool(np.all(b_s > 0)) and bool(np.all(b_t > 0)))
        if ok:
            self.b_source, self.b_target = b_s, b_t
        return ok

    def state(self) -> dict[str, Any]:
        return {"b_source": self.b_source.tolist(), "b_target": self.b_target.tolist(),
                "floored_source": self.floored_source, "floored_target": self.floored_target}

    def features(self, x: np.ndarray, ex_source: np.ndarray | None = None,
                 ex_target: np.ndarray | None = None) -> Features:
        m = self.cfg.candidates
        r_s = min_ratio(self.bank.source, self.b_source, x, m, ex_source)
        r_t = (None if self.bank.target is None
               else min_ratio(self.bank.target, self.b_target, x, m, ex_target))
        return Features(r_s, r_t)

    def combine(self, feats: Features) -> np.ndarray:
        return _domain_min(feats.source, feats.target)


class LocalDensity(_LocalDensity):
    """`ld`: b(y) over R = S U T, K = ld_k nearest other refs of R (capped at |R| - 1)."""

    name = "ld"

    def _local_density(self) -> tuple[np.ndarray, np.ndarray]:
        b = self.bank
        raw_target = b.raw_target()
        k = cap_k(self.cfg.ld_k, b.n_source + b.n_target_raw, leave_one_out=True)
        self.k_effective = k
        return (self._b_over_r(b.source, raw_target, k),
                b.per_target_row(self._b_over_r(raw_target, b.source, k)) if raw_target is not None
                else np.zeros(0))

    def _b_over_r(self, own: KnnIndex, other: KnnIndex | None, k: int) -> np.ndarray:
        d_own, _ = own.query_loo(k)
        parts = [d_own]
        if other is not None:
            parts.append(other.query(own.refs, k)[0])
        merged = np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]
        return _reduce(merged, self.cfg.ld_reduce)


class LocalDensityDomain(_LocalDensity):
    """`ld-domain`: b within each bank, K_S = k_source, K_T = k_target (capped at size - 1; target: among its
    raw refs, a MemMixup row taking its raw ref's b)."""

    name = "ld-domain"

    def _local_density(self) -> tuple[np.ndarray, np.ndarray]:
        b, how = self.bank, self.cfg.ld_reduce
        if b.n_source < 2:
            raise BankError(f"layer {b.layer}: ld-domain needs at least 2 source refs, got {b.n_source}")
        b_s = _reduce(b.source.query_loo(cap_k(self.cfg.k_source, b.n_source, True))[0], how)
        raw = b.raw_target()
        if b.target is None or raw is None:
            return b_s, np.zeros(0)
        if b.n_target_raw <= 1:
            # One target ref (and its MemMixup rows) has no neighbour in its own bank: measure its density
            # against the source.
            log.warning("local_density_from_source", layer=b.layer, target_refs=1,
                        source_neighbours=cap_k(self.cfg.k_target, b.n_source))
            return b_s, _reduce(b.source.query(b.target.refs, self.cfg.k_target)[0], how)
        b_raw = _reduce(raw.query_loo(cap_k(self.cfg.k_target, b.n_target_raw, True))[0], how)
        return b_s, b.per_target_row(b_raw)


_CLASSES: dict[str, type[Normalizer]] = {
    cls.name: cls for cls in (NoNormalizer, ZScoreTest, ZScoreDomain, LocalDensity, LocalDensityDomain)
}


def make_normalizer(bank: LayerBank, cfg: ScoringConfig, stored: dict[str, Any] | None = None) -> Normalizer:
    """Fitted normalizer for one layer; `stored` statistics are adopted when they fit the bank."""
    norm = _CLASSES[cfg.normalizer](bank, cfg)
    if stored is None or not norm.restore(stored):
        if stored is not None:
            log.info("normalizer_refit", layer=bank.layer, normalizer=cfg.normalizer,
                     cause="stored statistics do not fit the bank")
        norm.fit()
    return norm


def measure_ratio_agreement(refs: np.ndarray, queries: np.ndarray, candidates: int, k: int = 16,
                            metric: str = "euclidean", hnsw: Any = None, tol: float = 1e-6) -> dict[str, float]:
    """Candidate path (HNSW top-M, exact ratio) vs the exact min over all refs of d(x, y) / b(y).

    b is computed once with exact search so that only the candidate step differs. Also reports the
    same candidate path with exact top-M search (separates "M too small" from "HNSW missed"), and
    the share of queries whose answer is provably exact: min ratio <= d_M(x) / max_y b(y).
    """
    q = np.asarray(queries, np.float32)
    exact = ExactIndex(refs, metric)
    b, _ = floor_b(_reduce(exact.query_loo(cap_k(k, len(refs), True))[0], "mean"), "agreement")
    approx = HnswIndex(refs, metric, hnsw or HnswParams())
    want = _min_ratio_full(exact, b, q, None)
    got = min_ratio(approx, b, q, candidates)
    d_m, i_m = exact.query(q, candidates)
    top_m = (d_m / b[i_m]).min(axis=1)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    rel_top_m = np.abs(top_m - want) / np.maximum(np.abs(want), 1e-30)
    return {"match_rate": float(np.mean(rel <= tol)), "max_rel_err": float(rel.max()),
            "mean_rel_err": float(rel.mean()), "exact_top_m_match_rate": float(np.mean(rel_top_m <= tol)),
            "certified_rate": float(np.mean(top_m <= d_m[:, -1] / b.max())),
            "candidates": float(candidates), "n_refs": float(len(refs)), "n_queries": float(len(q))}
