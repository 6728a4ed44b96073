from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors  # type: ignore[import-untyped]

from edge_agent.scoring import outliers
from edge_agent.scoring.outliers import block_rows, loo_knn_distance, loo_outliers


def _cloud(seed: int, n: int = 500, dim: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _reference(x: np.ndarray, k: int) -> np.ndarray:
    """Leave-one-out kNN mean distance with sklearn (the query point itself is its own first neighbour)."""
    x64 = x.astype(np.float64)
    dist, _ = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x64).kneighbors(x64)
    return dist[:, 1:].mean(axis=1)


def test_injected_far_points_are_exactly_the_excluded_ones() -> None:
    x = _cloud(0, 300)
    far = np.array([7, 80, 151, 299])
    direction = np.random.default_rng(1).normal(size=(len(far), x.shape[1]))
    x[far] += (6.0 * direction).astype(np.float32)
    result = loo_outliers([{"layer": x}])
    assert np.flatnonzero(~result.keep).tolist() == far.tolist()
    assert result.excluded() == 4
    assert result.keep.dtype == bool and result.distance.dtype == np.float64
    assert np.all(result.distance[far] > result.cutoff)
    assert np.all(result.distance[result.keep] <= result.cutoff)


@pytest.mark.parametrize("seed", range(6))
def test_clean_cloud_keeps_every_window(seed: int) -> None:
    result = loo_outliers([{"a": _cloud(seed), "b": _cloud(seed + 100, dim=8)}], z=5.0)
    assert result.excluded() == 0
    assert np.isfinite(result.cutoff)


def test_distances_match_a_sklearn_reference() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(257, 20)) * rng.uniform(0.1, 10, size=20)).astype(np.float32)
    for k in (1, 5, 17):
        np.testing.assert_allclose(loo_knn_distance(x, k), _reference(x, k), rtol=1e-9)


def test_combined_distance_is_the_median_normalized_mean_over_layers_then_members() -> None:
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(size=(60, d)).astype(np.float32) for d in (5, 9, 3))
    result = loo_outliers([{"a": a, "b": b}, {"c": c}], k=3)
    ref = {name: _reference(x, 3) for name, x in {"a": a, "b": b, "c": c}.items()}
    norm = {name: d / np.median(d) for name, d in ref.items()}
    expected = ((norm["a"] + norm["b"]) / 2 + norm["c"]) / 2
    np.testing.assert_allclose(result.distance, expected, rtol=1e-9)


def test_block_boundary_gives_the_same_distances(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _cloud(5, 203, 16)
    k = 4
    budget = 8 * (2 * 203 + k * 16) * 10  # 10 rows per block: 203 = 20 blocks of 10 + 3
    assert block_rows(203, k, 16, budget) == 10
    np.testing.assert_allclose(loo_knn_distance(x, k, budget), _reference(x, k), rtol=1e-9)
    whole = loo_outliers([{"l": x}], k=k)
    monkeypatch.setattr(outliers, "BLOCK_BYTES", budget)
    blocked = loo_outliers([{"l": x}], k=k)
    np.testing.assert_allclose(blocked.distance, whole.distance, rtol=1e-12)
    assert np.array_equal(blocked.keep, whole.keep)


def test_one_row_blocks() -> None:
    x = _cloud(6, 31, 4)
    np.testing.assert_allclose(loo_knn_distance(x, 3, budget=1), _reference(x, 3), rtol=1e-9)


def test_block_memory_is_bounded_for_a_large_bank() -> None:
    rows = block_rows(10_000, 5, 768)
    assert 8 * rows * (2 * 10_000 + 5 * 768) <= outliers.BLOCK_BYTES
    assert rows < 10_000


def test_identical_rows_are_all_kept() -> None:
    row = np.random.default_rng(7).normal(size=64).astype(np.float32) * 100
    x = np.tile(row, (40, 1))
    result = loo_outliers([{"l": x}])
    assert result.excluded() == 0
    assert np.all(result.distance == 0.0)


def test_float_noise_on_identical_rows_is_not_an_outlier() -> None:
    rng = np.random.default_rng(8)
    row = rng.normal(size=64).astype(np.float32) * 100
    x = np.tile(row, (40, 1))
    jitter = rng.choice(40, 6, replace=False)
    x[jitter] = np.nextafter(x[jitter], np.float32(np.inf))  # one float32 step on every component
    result = loo_outliers([{"l": x}])
    assert result.excluded() == 0


def test_one_different_window_among_identical_ones_is_excluded() -> None:
    rng = np.random.default_rng(9)
    x = np.tile(rng.normal(size=64).astype(np.float32), (40, 1))
    x[13] += 0.01
    result = loo_outliers([{"l": x}])
    assert np.flatnonzero(~result.keep).tolist() == [13]


def test_all_zero_embeddings_are_kept() -> None:
    result = loo_outliers([{"l": np.zeros((20, 8), dtype=np.float32)}])
    assert result.excluded() == 0 and result.cutoff == 0.0


def test_max_fraction_keeps_the_closest_windows() -> None:
    x = _cloud(10, 100, 16)
    far = np.arange(0, 100, 4)  # 25 far windows, at increasing distance
    x[far] += (np.linspace(5, 30, len(far))[:, None] * np.ones(16)).astype(np.float32)
    assert loo_outliers([{"l": x}], max_fraction=0.5).excluded() == 25
    result = loo_outliers([{"l": x}], max_fraction=0.1)
    assert result.excluded() == 10
    excluded = np.flatnonzero(~result.keep)
    assert set(excluded) == set(np.argsort(result.distance)[-10:])
    assert result.distance[~result.keep].min() > result.cutoff >= result.distance[result.keep].max()
    assert loo_outliers([{"l": x}], max_fraction=0.0).excluded() == 0


def test_members_of_different_scales_count_equally() -> None:
    rng = np.random.default_rng(11)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(200, 24))
    a[50] += 8.0  # an outlier for member 0 only
    small = {"l": (a * 1e-3).astype(np.float32)}
    large = {"l": (b * 1e3).astype(np.float32)}
    result = loo_outliers([small, large])
    assert np.flatnonzero(~result.keep).tolist() == [50]
    rescaled = loo_outliers([{"l": (a * 1e3).astype(np.float32)}, {"l": (b * 1e-3).astype(np.float32)}])
    np.testing.assert_allclose(rescaled.distance, result.distance, rtol=1e-5)


def test_too_few_windows_keeps_everything() -> None:
    x = _cloud(12, 6, 4)
    x[0] += 100
    result = loo_outliers([{"l": x}], k=5)
    assert result.excluded() == 0 and result.cutoff == float("inf")
    ref = _reference(x, 5)  # k capped at N - 1 for the reported distances
    np.testing.assert_allclose(result.distance, ref / np.median(ref), rtol=1e-9)
    assert loo_outliers([{"l": x[:1]}]).distance.tolist() == [0.0]
    assert loo_outliers([{"l": x[:0]}]).keep.shape == (0,)
    assert loo_outliers([{"l": _cloud(12, 7, 4)}], k=5).cutoff < float("inf")  # N = k + 2


@pytest.mark.parametrize(("embeddings", "match"), [
    ([], "no member"),
    ([{}], r"embeddings\[0\]: no layer"),
    ([{"a": np.zeros(5)}], r"\[N, D\] array"),
    ([{"a": np.zeros((5, 0))}], r"\[N, D\] array"),
    ([{"a": np.zeros((5, 2)), "b": np.zeros((6, 2))}], "shapes differ"),
    ([{"a": np.zeros((5, 2))}, {"a": np.zeros((6, 2))}], r"embeddings\[1\] has 6 windows, embeddings\[0\] has 5"),
    ([{"a": np.vstack([np.zeros((8, 2)), [[0.0, np.nan]]])}], r"embeddings\[0\]\['a'\]: 1 non-finite"),
    ([{"a": np.zeros((9, 2))}, {"b": np.full((9, 2), np.inf)}], r"embeddings\[1\]\['b'\]: 18 non-finite"),
])
def test_invalid_embeddings(embeddings: list[dict[str, np.ndarray]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        loo_outliers(embeddings)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k must"), ({"k": 2.5}, "k must"), ({"k": True}, "k must"),
    ({"z": 0.0}, "z must"), ({"z": -1.0}, "z must"), ({"z": float("nan")}, "z must"),
    ({"max_fraction": 1.0}, "max_fraction"), ({"max_fraction": -0.1}, "max_fraction"),
    ({"max_fraction": float("nan")}, "max_fraction"),
])
def test_invalid_parameters(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        loo_outliers([{"l": _cloud(0, 20, 3)}], **kwargs)  # type: ignore[arg-type]
