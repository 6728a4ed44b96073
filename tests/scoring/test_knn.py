from __future__ import annotations

import numpy as np
import pytest

from edge_agent.errors import BankError, ConfigError
from edge_agent.scoring import knn
from edge_agent.scoring.knn import ExactIndex, HnswIndex, HnswParams, build_index, cap_k, measure_recall


def brute(x: np.ndarray, refs: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None, :].astype(np.float64) - refs[None].astype(np.float64)) ** 2).sum(-1))


def test_exact_hand_made_1d_and_metrics() -> None:
    refs = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    d, i = ExactIndex(refs, "euclidean").query(np.array([[5.0]]), 3)
    assert i.tolist() == [[2, 3, 1]]
    assert d.tolist() == [[2.0, 2.0, 4.0]]
    d2, _ = ExactIndex(refs, "sqeuclidean").query(np.array([[5.0]]), 3)
    assert d2.tolist() == [[4.0, 4.0, 16.0]]


def test_k_is_capped_at_bank_size_and_loo_at_size_minus_one() -> None:
    refs = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    index = ExactIndex(refs, "euclidean")
    assert index.query(np.array([[0.5]]), 10)[0].shape == (1, 3)
    d, i = index.query_loo(10)
    assert d.shape == (3, 2)
    assert i.tolist() == [[1, 2], [0, 2], [1, 0]]
    assert cap_k(16, 3) == 3 and cap_k(16, 3, leave_one_out=True) == 2 and cap_k(16, 1, True) == 0


def test_loo_keeps_duplicates_of_the_query() -> None:
    refs = np.array([[0.0], [0.0], [5.0]], dtype=np.float32)
    d, i = ExactIndex(refs, "euclidean").query_loo(1)
    assert i[:, 0].tolist() == [1, 0, 0] or i[:, 0].tolist() == [1, 0, 1]
    assert d[:, 0].tolist() == [0.0, 0.0, 5.0]


def test_hnsw_loo_drops_own_index_with_duplicates() -> None:
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(300, 8)).astype(np.float32)
    refs[1] = refs[0]  # exact duplicate pair
    d, i = HnswIndex(refs, "euclidean").query_loo(3)
    assert not np.any(i == np.arange(300)[:, None])
    assert i[0, 0] == 1 and i[1, 0] == 0 and d[0, 0] == 0.0


def test_exclusion_sets() -> None:
    refs = np.array([[0.0], [1.0], [2.0], [10.0]], dtype=np.float32)
    d, i = ExactIndex(refs, "euclidean").query(np.array([[0.0]]), 5, exclude=np.array([[0, 1, -1]]))
    assert i.tolist() == [[2, 3]]  # k' = 4 refs - 2 excluded (the -1 pad excludes nothing)
    assert d.tolist() == [[2.0, 10.0]]


def test_exact_is_precise_far_from_the_origin() -> None:
    # Far from the origin ||a||^2 - 2ab + ||b||^2 is off by ~1e-3 relative; the returned distances
    # are recomputed from the differences.
    rng = np.random.default_rng(4)
    refs = (1.0e5 + rng.normal(size=(50, 64))).astype(np.float32)
    x = (refs[:5] + rng.normal(size=(5, 64)).astype(np.float32) * np.float32(0.05))
    want = brute(x, refs)
    naive = np.sqrt(knn.pairwise_sq(x, refs))
    assert np.max(np.abs(naive - want) / want) > 1e-5  # the naive formula is wrong here
    d, i = ExactIndex(refs, "euclidean").query(x, 3)
    assert np.array_equal(i, np.argsort(want, axis=1)[:, :3])
    assert np.allclose(d, np.sort(want, axis=1)[:, :3], rtol=1e-12, atol=0)


def test_exact_chunked_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 700)  # several query blocks of a few rows
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(257, 5)).astype(np.float32)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    d, i = ExactIndex(refs, "euclidean").query(x, 4)
    want = brute(x, refs)
    assert np.array_equal(i, np.argsort(want, axis=1, kind="stable")[:, :4])
    assert np.allclose(d, np.sort(want, axis=1)[:, :4], rtol=1e-12)


def test_build_index_threshold_and_bad_metric() -> None:
    refs = np.zeros((10, 3), dtype=np.float32)
    assert build_index(refs, exact_below=11).kind == "exact"
    assert build_index(refs, exact_below=10).kind == "hnsw"
    with pytest.raises(ConfigError, match=r"scoring\.metric"):
        build_index(refs, metric="cosine")


def test_hnsw_recall_on_clustered_bank(clustered) -> None:
    rng = np.random.default_rng(2)
    data = clustered(rng, 3100, 128)
    stats = measure_recall(data[:3000], data[3000:], 16)
    assert stats["recall"] >= 0.99
    assert stats["top1_match"] >= 0.99
    # Same neighbours -> identical distances (HNSW distances are recomputed exactly).
    ex_d, ex_i = ExactIndex(data[:3000], "sqeuclidean").query(data[3000:], 5)
    hn_d, hn_i = HnswIndex(data[:3000], "sqeuclidean").query(data[3000:], 5)
    same = np.all(ex_i == hn_i, axis=1)
    assert same.mean() >= 0.95 and np.array_equal(ex_d[same], hn_d[same])


def test_hnsw_is_deterministic_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    params = HnswParams(m=8, ef_construction=50, ef_search=20, seed=7)
    a, b = HnswIndex(refs, "euclidean", params), HnswIndex(refs, "euclidean", params)
    assert np.array_equal(a.query(q, 5)[1], b.query(q, 5)[1])
    sha = a.save(tmp_path / "g.hnsw")
    assert len(sha) == 64
    loaded = HnswIndex.load(tmp_path / "g.hnsw", refs, "euclidean", params)
    assert np.array_equal(loaded.query(q, 5)[1], a.query(q, 5)[1])
    with pytest.raises(BankError, match="holds 500 items"):
        HnswIndex.load(tmp_path / "g.hnsw", refs[:400], "euclidean", params)


def test_query_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        ExactIndex(np.zeros((4, 3)), "euclidean").query(np.zeros((2, 4)), 1)


def test_exact_distances_in_blocks_match(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    refs = rng.normal(size=(30, 6)).astype(np.float32)
    x = rng.normal(size=(25, 6)).astype(np.float32)
    idx = rng.integers(0, 30, size=(25, 4))
    whole = knn.exact_distances(x, refs, idx, "euclidean")
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 50)  # 2 rows per block
    assert np.array_equal(knn.exact_distances(x, refs, idx, "euclidean"), whole)
    assert np.allclose(whole, np.take_along_axis(brute(x, refs), idx, 1), rtol=1e-12)
