"""k-nearest-neighbour search over one bank of reference vectors: exact (numpy) or HNSW (hnswlib).

Both indexes answer with distances in the chosen metric ("euclidean" or "sqeuclidean") computed
exactly in float64 from the stored refs: HNSW only proposes the neighbours, so an exact and an
HNSW index that find the same neighbours return identical numbers.

k rule: a query asks for k neighbours and gets min(k, available) columns, where available is the
bank size, minus the excluded refs for leave-one-out queries. Callers that need a fixed k cap it
first with `cap_k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from edge_agent.errors import BankError, ConfigError
from edge_agent.fsutil import sha256_file

METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean")
DEFAULT_EXACT_BELOW = 4096
# Rows of the float64 distance block computed at once: bounds exact-search memory to ~32 MiB.
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 200
    ef_search: int = 256
    seed: int = 0
    # One build thread keeps the graph (and so the results) reproducible run to run.
    build_threads: int = 1

    def as_dict(self) -> dict[str, int]:
        return {"m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "seed": self.seed}

    def same_graph(self, other: HnswParams) -> bool:
        """Whether an index built with `other` is the graph these params would build."""
        return (self.m, self.ef_construction, self.seed) == (other.m, other.ef_construction, other.seed)


def cap_k(k: int, n: int, leave_one_out: bool = False) -> int:
    """The k actually usable on a bank of n refs (n - 1 when the query is itself a ref)."""
    return max(0, min(k, n - 1 if leave_one_out else n))


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError("scoring.metric", f"must be one of {', '.join(METRICS)}", metric)


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what}: expected shape [B, {dim}], got {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def _finish(sq: np.ndarray, metric: str) -> np.ndarray:
    np.maximum(sq, 0.0, out=sq)
    return np.sqrt(sq) if metric == "euclidean" else sq


def pairwise_sq(x: np.ndarray, refs: np.ndarray, refs64: np.ndarray | None = None,
                ref_norms: np.ndarray | None = None) -> np.ndarray:
    """Squared distances [B, N] in float64 via the norm expansion, clamped at 0.

    Cancellation makes small distances inexact; callers recompute the ones they keep with
    exact_distances. refs64 / ref_norms: the refs in float64 and their squared norms, if cached.
    """
    x64 = x.astype(np.float64)
    r64 = refs.astype(np.float64) if refs64 is None else refs64
    norms = np.einsum("ij,ij->i", r64, r64) if ref_norms is None else ref_norms
    sq = np.einsum("ij,ij->i", x64, x64)[:, None] - 2.0 * (x64 @ r64.T) + norms[None]
    np.maximum(sq, 0.0, out=sq)
    return sq


def exact_distances(x: np.ndarray, refs: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """d(x_b, refs[idx[b, j]]) computed from differences in float64 (no cancellation), in blocks."""
    out = np.empty(idx.shape, dtype=np.float64)
    per_row = max(1, idx.shape[1] * refs.shape[1])
    rows = max(1, _BLOCK_ELEMENTS // per_row)
    for start in range(0, idx.shape[0], rows):
        stop = min(start + rows, idx.shape[0])
        diff = refs[idx[start:stop]].astype(np.float64) - x[start:stop].astype(np.float64)[:, None, :]
        out[start:stop] = np.einsum("bkd,bkd->bk", diff, diff)
    return _finish(out, metric)


def _sort_rows(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Sort by distance, ties by index, so exact and HNSW results are comparable element-wise.
    order = np.lexsort((idx, dist), axis=-1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def _normalize_exclude(exclude: np.ndarray | None, batch: int) -> np.ndarray | None:
    if exclude is None:
        return None
    ex = np.asarray(exclude, dtype=np.int64)
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.shape[0] != batch:
        raise ValueError(f"exclude has {ex.shape[0]} rows for a batch of {batch}")
    return ex


def _excluded_per_row(ex: np.ndarray | None) -> int:
    return 0 if ex is None or ex.size == 0 else int((ex >= 0).sum(axis=1).max())


class KnnIndex:
    """Common interface. Build with `build_index`; query with `query`."""

    kind: str

    def __init__(self, refs: np.ndarray, metric: str) -> None:
        check_metric(metric)
        arr = np.asarray(refs, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"refs must be [N, D], got shape {list(arr.shape)}")
        self.refs = np.ascontiguousarray(arr)
        self.metric = metric
        self._refs64: np.ndarray | None = None
        self._ref_norms: np.ndarray | None = None

    def pairwise_sq(self, x: np.ndarray) -> np.ndarray:
        """Squared distances of a (small) query block to all refs, see the module function."""
        if self._refs64 is None:
            self._refs64 = self.refs.astype(np.float64)
            self._ref_norms = np.einsum("ij,ij->i", self._refs64, self._refs64)
        return pairwise_sq(x, self.refs, self._refs64, self._ref_norms)

    @property
    def size(self) -> int:
        return int(self.refs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.refs.shape[1])

    def query(self, x: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest refs of each row of x: (distances [B, k'] float64, indices [B, k'] int64), sorted.

        exclude: per query, ref indices that must not be returned ([B] or [B, E]; -1 = no-op pad).
        k' = min(k, size - E), E = the largest number of excluded refs of any row (see module doc).
        """
        xq = _as_matrix(x, self.dim, "query")
        ex = _normalize_exclude(exclude, xq.shape[0])
        n_ex = _excluded_per_row(ex)
        k_eff = max(0, min(int(k), self.size - n_ex))
        if xq.shape[0] == 0 or k_eff == 0:
            return np.zeros((xq.shape[0], k_eff)), np.zeros((xq.shape[0], k_eff), dtype=np.int64)
        return self._query(xq, k_eff, ex)

    def query_loo(self, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For every ref, its k nearest OTHER refs (itself dropped by index, so duplicates survive)."""
        own = np.arange(self.size, dtype=np.int64)[:, None]
        ex = own if exclude is None else np.concatenate([own, _normalize_exclude(exclude, self.size)], 1)
        return self.query(self.refs, k, ex)

    def _query(self, x: np.ndarray, k: int, ex: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ExactIndex(KnnIndex):
    kind = "exact"

    def _query(self, x: np.ndarray, k: int, ex: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        rows = max(1, _BLOCK_ELEMENTS // max(1, self.size))
        out_d = np.empty((x.shape[0], k))
        out_i = np.empty((x.shape[0], k), dtype=np.int64)
        for start in range(0, x.shape[0], rows):
            stop = min(start + rows, x.shape[0])
            sq = self.pairwise_sq(x[start:stop])
            if ex is not None:
                block = ex[start:stop]
                r, c = np.nonzero(block >= 0)
                sq[r, block[r, c]] = np.inf
            if k < self.size:
                idx = np.argpartition(sq, k - 1, axis=1)[:, :k]
            else:
                idx = np.broadcast_to(np.arange(self.size), sq.shape).copy()
            d = exact_distances(x[start:stop], self.refs, idx, self.metric)
            out_d[start:stop], out_i[start:stop] = _sort_rows(d, idx)
        return out_d, out_i


class HnswIndex(KnnIndex):
    kind = "hnsw"

    def __init__(self, refs: np.ndarray, metric: str, params: HnswParams = HnswParams(),
                 graph: hnswlib.Index | None = None) -> None:
        super().__init__(refs, metric)
        self.params = params
        if graph is None:
            graph = hnswlib.Index(space="l2", dim=self.dim)
            graph.init_index(max_elements=max(1, self.size), ef_construction=params.ef_construction,
                             M=params.m, random_seed=params.seed)
            if self.size:
                graph.add_items(self.refs, np.arange(self.size), num_threads=params.build_threads)
        self.graph = graph

    def _query(self, x: np.ndarray, k: int, ex: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        want = min(self.size, k + _excluded_per_row(ex))
        self.graph.set_ef(max(self.params.ef_search, want))
        try:
            labels, _ = self.graph.knn_query(x, k=want)
        except RuntimeError as exc:  # hnswlib: graph could not deliver `want` results
            raise BankError(f"HNSW query for {want} neighbours failed: {exc}") from None
        labels = labels.astype(np.int64)
        if ex is not None:
            keep = ~(labels[:, :, None] == ex[:, None, :]).any(axis=2)
            # Stable: keeps HNSW order among survivors; then the first k of each row.
            order = np.argsort(~keep, axis=1, kind="stable")
            labels = np.take_along_axis(labels, order, 1)[:, :k]
            if not np.take_along_axis(keep, order, 1)[:, :k].all():
                raise BankError("HNSW returned too few neighbours outside the excluded set")
        else:
            labels = labels[:, :k]
        # hnswlib 'l2' gives float32 squared distances; recompute them exactly in the metric.
        return _sort_rows(exact_distances(x, self.refs, labels, self.metric), labels)

    def save(self, path: Path) -> str:
        """Write the graph to `path`; returns the file's sha256."""
        self.graph.save_index(str(path))
        return sha256_file(path)

    @classmethod
    def load(cls, path: Path, refs: np.ndarray, metric: str, params: HnswParams,
             shown: str | None = None) -> HnswIndex:
        """Read a graph saved by save(); `shown` is the file name used in error messages."""
        name = shown or str(path)
        graph = hnswlib.Index(space="l2", dim=int(np.asarray(refs).shape[1]))
        try:
            graph.load_index(str(path), max_elements=max(1, len(refs)))
        except (RuntimeError, OSError) as exc:
            raise BankError(f"{name}: cannot load the HNSW index: {exc}") from None
        if graph.get_current_count() != len(refs):
            raise BankError(f"{name}: HNSW index holds {graph.get_current_count()} items, the bank has "
                            f"{len(refs)}")
        return cls(refs, metric, params, graph=graph)


def build_index(refs: np.ndarray, metric: str = "euclidean", exact_below: int = DEFAULT_EXACT_BELOW,
                hnsw: HnswParams = HnswParams()) -> KnnIndex:
    """Exact search for banks smaller than `exact_below` refs, HNSW from there on."""
    n = int(np.asarray(refs).shape[0])
    if n < exact_below:
        return ExactIndex(refs, metric)
    return HnswIndex(refs, metric, hnsw)


def measure_recall(refs: np.ndarray, queries: np.ndarray, k: int, hnsw: HnswParams = HnswParams(),
                   metric: str = "euclidean") -> dict[str, float]:
    """HNSW vs exact on the same data: recall@k, and max relative error of the k-th distance."""
    exact = ExactIndex(refs, metric)
    approx = HnswIndex(refs, metric, hnsw)
    d_e, i_e = exact.query(queries, k)
    d_a, i_a = approx.query(queries, k)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(i_e, i_a, strict=True))
    kth_rel = np.abs(d_a[:, -1] - d_e[:, -1]) / np.maximum(d_e[:, -1], 1e-30)
    return {"recall": hits / float(i_e.size), "top1_match": float(np.mean(i_e[:, 0] == i_a[:, 0])),
            "kth_distance_max_rel_err": float(kth_rel.max()), "n_refs": float(len(refs)),
            "n_queries": float(len(queries)), "k": float(k)}
