"""Windows of a learning period that do not look like the rest of it (a forklift passing, a door slam,
a fault during commissioning), so that they are left out of the memory bank instead of becoming "normal".

Per member model and layer, each window's leave-one-out kNN distance (mean Euclidean distance to its k
nearest *other* windows) is divided by that layer's median; the layers of a member are averaged, then the
members. Windows whose combined distance lies beyond median + z * 1.4826 * MAD are outliers, at most
`max_fraction` of them (the farthest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Working memory of one block of the distance computation: the [rows, N] squared distances, the same-sized
# index array of the neighbour selection and the [rows, k, D] differences of the exact recomputation.
BLOCK_BYTES = 64 * 2**20
# MAD -> standard deviation of a normal distribution.
_MAD_TO_STD = 1.4826
# Distances below this fraction of the embeddings' RMS norm are float noise (float32 rounding, thread
# nondeterminism of the encoder), not a difference between windows.
_RESOLUTION = 1e-6
# Combined distances within this relative tolerance of the median are the median (summation rounding).
_RTOL = 1e-9


@dataclass(frozen=True)
class OutlierResult:
    keep: np.ndarray  # bool [N]
    distance: np.ndarray  # float64 [N], combined over members and layers
    cutoff: float  # windows with distance > cutoff are outliers

    def excluded(self) -> int:
        return int(self.keep.size - np.count_nonzero(self.keep))


def loo_outliers(embeddings: Sequence[dict[str, np.ndarray]], k: int = 5, z: float = 5.0,
                 max_fraction: float = 0.2) -> OutlierResult:
    """Outliers among N windows; `embeddings[m][layer]` is the [N, D] embedding of member model m."""
    _check_params(k, z, max_fraction)
    n = _check_embeddings(embeddings)
    if n < k + 2:
        return OutlierResult(np.ones(n, dtype=bool), _combined(embeddings, min(k, n - 1))[0], float("inf"))
    distance, resolution = _combined(embeddings, k)
    cutoff = _robust_cutoff(distance, z, resolution)
    cutoff = _capped(distance, cutoff, max_fraction)
    return OutlierResult(distance <= cutoff, distance, cutoff)


def _check_params(k: int, z: float, max_fraction: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not np.isfinite(z) or z <= 0:
        raise ValueError(f"z must be a finite number > 0, got {z!r}")
    if not 0.0 <= max_fraction < 1.0:
        raise ValueError(f"max_fraction must be in [0, 1), got {max_fraction!r}")


def _check_embeddings(embeddings: Sequence[dict[str, np.ndarray]]) -> int:
    """The number of windows N, after checking that every array is a finite [N, D] matrix of the same N."""
    if len(embeddings) == 0:
        raise ValueError("embeddings: no member model given")
    n: int | None = None
    for m, layers in enumerate(embeddings):
        if not layers:
            raise ValueError(f"embeddings[{m}]: no layer given")
        shapes = {name: np.shape(x) for name, x in layers.items()}
        for name, shape in shapes.items():
            if len(shape) != 2 or shape[1] < 1:
                raise ValueError(f"embeddings[{m}][{name!r}]: expected an [N, D] array, got shape {shape}")
        rows = {shape[0] for shape in shapes.values()}
        if len(rows) > 1:
            raise ValueError(f"embeddings[{m}]: layer shapes differ in N: {shapes}")
        member_n = rows.pop()
        if n is not None and member_n != n:
            raise ValueError(f"embeddings[{m}] has {member_n} windows, embeddings[0] has {n}")
        n = member_n
        for name, x in layers.items():
            finite = np.isfinite(np.asarray(x))
            bad = finite.size - np.count_nonzero(finite)
            if bad:
                raise ValueError(f"embeddings[{m}][{name!r}]: {bad} non-finite values")
    assert n is not None
    return n


def _combined(embeddings: Sequence[dict[str, np.ndarray]], k: int) -> tuple[np.ndarray, float]:
    """Median-normalized LOO distances averaged over layers, then members; and the float resolution of
    that combined distance (what a window that differs only by float noise can reach)."""
    n = len(next(iter(embeddings[0].values())))
    if k < 1:
        return np.zeros(n), 0.0
    members = []
    resolutions = []
    for layers in embeddings:
        per_layer = []
        per_layer_res = []
        for x in layers.values():
            x64 = np.asarray(x, dtype=np.float64)
            d = loo_knn_distance(x64, k)
            floor = _RESOLUTION * float(np.sqrt(np.mean(np.einsum("ij,ij->i", x64, x64))))
            scale = max(float(np.median(d)), floor)
            if scale <= 0.0:  # every embedding of the layer is zero: all distances are 0
                scale = 1.0
            per_layer.append(d / scale)
            per_layer_res.append(floor / scale)
        members.append(np.mean(per_layer, axis=0))
        resolutions.append(float(np.mean(per_layer_res)))
    return np.mean(members, axis=0), float(np.mean(resolutions))


def block_rows(n: int, k: int, dim: int, budget: int = BLOCK_BYTES) -> int:
    """Rows per block so that the block's float64 and int64 temporaries fit in `budget` bytes."""
    per_row = 8 * (2 * n + k * dim)
    return max(1, min(n, budget // per_row))


def loo_knn_distance(x: np.ndarray, k: int, budget: int = BLOCK_BYTES) -> np.ndarray:
    """Mean Euclidean distance of each row of x [N, D] to its k nearest other rows, in float64, k <= N - 1.

    Neighbours are selected with the norm expansion |x|^2 - 2 x.y + |y|^2 and their distances recomputed
    from the differences, so that duplicates get exactly 0 and not the cancellation noise of the expansion.
    Another row equal to x[i] is a neighbour of x[i] at distance 0: leave-one-out excludes the index only.
    """
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    sq = np.einsum("ij,ij->i", x, x)
    rows = block_rows(n, k, dim, budget)
    out = np.empty(n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[start:stop] = _block_distance(x, sq, start, stop, k)
    return out


def _block_distance(x: np.ndarray, sq: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    d2 = x[start:stop] @ x.T
    d2 *= -2.0
    d2 += sq[None, :]
    d2 += sq[start:stop, None]
    d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
    nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
    del d2
    diff = x[nearest]
    diff -= x[start:stop, None, :]
    return np.sqrt(np.einsum("bkd,bkd->bk", diff, diff)).mean(axis=1)


def _robust_cutoff(distance: np.ndarray, z: float, resolution: float) -> float:
    """median + z * 1.4826 * MAD, and never below the median plus what float noise can add to it.

    The floor decides when the MAD is 0 (more than half the windows share one distance, e.g. exact
    duplicates at distance 0): windows within a relative tolerance of the median, or within the float
    resolution of the embeddings, are kept; any real difference is an outlier.
    """
    median = float(np.median(distance))
    mad = float(np.median(np.abs(distance - median)))
    floor = median + _RTOL * abs(median) + resolution
    return max(median + z * _MAD_TO_STD * mad, floor)


def _capped(distance: np.ndarray, cutoff: float, max_fraction: float) -> float:
    """Raise the cutoff so that at most floor(max_fraction * N) windows lie beyond it."""
    n = distance.size
    most = int(np.floor(max_fraction * n))
    if np.count_nonzero(distance > cutoff) <= most:
        return cutoff
    return float(np.partition(distance, n - most - 1)[n - most - 1])
