"""Every normalizer on 1-D banks whose answers are worked out by hand in the comments.

S = {0, 1, 3, 7}, T = {10, 12} unless a test says otherwise.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from edge_agent.errors import ConfigError
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.normalizers import measure_ratio_agreement
from edge_agent.scoring.scorer import BankScorer

from .configs import knn_only

S = [0.0, 1.0, 3.0, 7.0]
T = [10.0, 12.0]


def col(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)[:, None]


@pytest.fixture
def make_bank(info_factory):
    def make(source: list[float] = S, target: list[float] = T) -> MemoryBank:
        info = info_factory({"layer_1": 1})
        emb = {"source": {"layer_1": col(source)}}
        if target:
            emb["target"] = {"layer_1": col(target)}
        return MemoryBank(info, emb)

    return make


def scores(bank: MemoryBank, x: list[float], **cfg) -> np.ndarray:
    return BankScorer.fit(bank, knn_only(**cfg)).score({"layer_1": col(x)})


def test_none(make_bank) -> None:
    # x=5: d_S = |5-3| = 2, d_T = |5-10| = 5 -> 2.  x=11: d_S = 4, d_T = 1 -> 1.
    assert scores(make_bank(), [5, 11], normalizer="none").tolist() == [2.0, 1.0]
    # K_n = 2: d_S(5) = mean(2, 2) = 2, d_T(5) = mean(5, 7) = 6; x=-1: d_S = mean(1, 2) = 1.5
    assert scores(make_bank(), [5, -1], normalizer="none", k_n=2).tolist() == [2.0, 1.5]
    # squared metric: d_S(5) = 4
    assert scores(make_bank(), [5], normalizer="none", metric="sqeuclidean").tolist() == [4.0]


def test_none_with_empty_target_is_source_only(make_bank) -> None:
    # x=11: d_S = 4 (the target ref at 10 is gone)
    assert scores(make_bank(target=[]), [11], normalizer="none").tolist() == [4.0]


def test_none_loo_scores(make_bank) -> None:
    # source refs (itself left out): 0 -> min(d_S=1, d_T=10) = 1; 1 -> 1; 3 -> 2; 7 -> min(4, 3) = 3
    # target refs: 10 -> min(d_S=3, d_T=2) = 2; 12 -> min(5, 2) = 2
    scorer = BankScorer.fit(make_bank(), knn_only(normalizer="none"))
    assert scorer.loo_scores().tolist() == [1.0, 1.0, 2.0, 3.0, 2.0, 2.0]
    assert scorer.loo_names() == ["source_00000", "source_00001", "source_00002", "source_00003",
                                  "target_00000", "target_00001"]


def test_zscore_test(make_bank) -> None:
    # batch x = [2, 5, 9]: d_S = [1, 2, 2], d_T = [8, 5, 1]
    got = scores(make_bank(), [2, 5, 9], normalizer="zscore-test")
    d_s, d_t = np.array([1.0, 2.0, 2.0]), np.array([8.0, 5.0, 1.0])
    z_s = (d_s - 5 / 3) / math.sqrt(2 / 9)  # population std of [1, 2, 2] = sqrt(2/9)
    z_t = (d_t - 14 / 3) / math.sqrt(222 / 27)  # deviations 10/3, 1/3, -11/3
    assert np.allclose(got, np.minimum(z_s, z_t), rtol=1e-12)


def test_zscore_test_refuses_a_batch_of_one(make_bank) -> None:
    with pytest.raises(ConfigError, match=r"zscore-test.*at least 2"):
        scores(make_bank(), [5], normalizer="zscore-test")


def test_zscore_domain_with_enough_target_refs(make_bank) -> None:
    # LOO (K_n=1) in S: 0->1, 1->1, 3->2, 7->4: mu_S = 2
    # T = {10, 12, 13, 17, 20}: LOO 10->2, 12->1, 13->1, 17->3, 20->3: mu_T = 2, sigma_T^2 = 4/5
    # x=16: d_S = 9, d_T = 1 -> min(7, -1) / sqrt(0.8)
    bank = make_bank(target=[10, 12, 13, 17, 20])
    scorer = BankScorer.fit(bank, knn_only(normalizer="zscore-domain"))
    state = scorer.state()["layers"]["layer_1"]["stats"]
    assert state["mu_source"] == 2.0 and state["mu_target"] == 2.0
    assert state["sigma"] == pytest.approx(math.sqrt(0.8), rel=1e-12) and state["sigma_from"] == "target"
    assert scorer.score({"layer_1": col([16])})[0] == pytest.approx(-1 / math.sqrt(0.8), rel=1e-12)


def test_zscore_domain_sigma_fallback_with_two_target_refs(make_bank, caplog) -> None:
    # T = {10, 12}: LOO distances 2, 2 -> sigma_T = 0.  mu_T = 2.
    # pooled: std of [1, 1, 2, 4, 2, 2] = 1 ; source: std of [1, 1, 2, 4] = sqrt(1.5)
    # x = 4.5: d_S = 1.5, d_T = 5.5
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.normalizers"):
        pooled = BankScorer.fit(make_bank(), knn_only(normalizer="zscore-domain"))
    assert "target_refs=2" in caplog.text and "fallback=pooled" in caplog.text
    stats = pooled.state()["layers"]["layer_1"]["stats"]
    assert stats["sigma_target_raw"] == 0.0 and stats["sigma_from"] == "pooled" and stats["sigma"] == 1.0
    assert pooled.score({"layer_1": col([4.5])}).tolist() == [-0.5]
    source = BankScorer.fit(make_bank(), knn_only(normalizer="zscore-domain", sigma_fallback="source"))
    assert source.score({"layer_1": col([4.5])})[0] == pytest.approx(-0.5 / math.sqrt(1.5), rel=1e-12)


def test_zscore_domain_loo_k_is_capped(make_bank) -> None:
    # k_n = 5 on T = {10, 12}: LOO uses the 1 other ref -> mu_T = 2; S LOO with k=3: 0->11/3, 1->3,
    # 3->3, 7->17/3 -> mu_S = 46/12
    scorer = BankScorer.fit(make_bank(), knn_only(normalizer="zscore-domain", k_n=5))
    stats = scorer.state()["layers"]["layer_1"]["stats"]
    assert stats["mu_target"] == 2.0
    assert stats["mu_source"] == pytest.approx(46 / 12, rel=1e-12)


def test_zscore_domain_single_target_ref_and_empty_target(make_bank, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.normalizers"):
        one = BankScorer.fit(make_bank(target=[10]), knn_only(normalizer="zscore-domain"))
    assert "target_refs=1" in caplog.text
    stats = one.state()["layers"]["layer_1"]["stats"]
    assert stats["mu_target"] == stats["mu_source"] == 2.0
    # Source only: sigma from the source LOO distances [1, 1, 2, 4] (pooled with nothing).
    empty = BankScorer.fit(make_bank(target=[]), knn_only(normalizer="zscore-domain"))
    assert empty.score({"layer_1": col([11])})[0] == pytest.approx((4 - 2) / math.sqrt(1.5), rel=1e-12)


def test_ld_domain_hand_made(make_bank) -> None:
    # K_S = 2: b(0) = mean(1, 3) = 2, b(1) = mean(1, 2) = 1.5, b(3) = mean(2, 3) = 2.5, b(7) = mean(4, 6) = 5
    # K_T = 1: b(10) = b(12) = 2.  x=5: S ratios 5/2, 4/1.5, 2/2.5, 2/5 -> 0.4; T: 5/2, 7/2 -> 0.4
    assert scores(make_bank(), [5], normalizer="ld-domain", k_source=2, k_target=1).tolist() == [0.4]
    # sum instead of mean: b(7) = 10 -> 2/10
    assert scores(make_bank(), [5], normalizer="ld-domain", k_source=2, k_target=1,
                  ld_reduce="sum").tolist() == [0.2]


def test_ld_domain_defaults_cap_k(make_bank) -> None:
    # K_S = 16 capped at 3: b(0) = 11/3, b(1) = 3, b(3) = 3, b(7) = 17/3; K_T = 9 capped at 1: b = 2
    # x=5: 15/11, 4/3, 2/3, 6/17 -> 6/17;  x=11.5: T 1.5/2, 0.5/2 -> 0.25
    got = scores(make_bank(), [5, 11.5])
    assert got[0] == pytest.approx(6 / 17, rel=1e-12) and got[1] == pytest.approx(0.25, rel=1e-12)


def test_ld_over_the_union(make_bank) -> None:
    # R = {0, 1, 3, 7, 10, 12}, K = 2: b = 2, 1.5, 2.5, 3.5, 2.5, 3.5
    # x=5: 5/2, 4/1.5, 2/2.5, 2/3.5, 5/2.5, 7/3.5 -> 4/7
    got = scores(make_bank(), [5], normalizer="ld", ld_k=2)
    assert got[0] == pytest.approx(4 / 7, rel=1e-12)


def test_ld_domain_loo(make_bank) -> None:
    # K_S = 2, K_T = 1 (b as in test_ld_domain_hand_made).  LOO of source ref 3 (excluding itself):
    # S: |3-0|/2, |3-1|/1.5, |3-7|/5 = 0.8 -> min with T: 7/2, 9/2 -> 0.8
    # LOO of target ref 10: S: 10/2, 9/1.5, 7/2.5, 3/5 = 0.6; T (10 left out): 2/2 = 1 -> 0.6
    loo = BankScorer.fit(make_bank(), knn_only(k_source=2, k_target=1)).loo_scores()
    assert loo[2] == pytest.approx(0.8, rel=1e-12) and loo[4] == pytest.approx(0.6, rel=1e-12)


def test_ld_domain_duplicate_refs_are_floored(make_bank, caplog) -> None:
    # S = {0, 0, 0, 5}, K_S = 2: b(0) = 0 (two other zeros) -> floored to 1e-6 * median(positive b) = 5e-6
    # b(5) = 5.  x=1: min(1/5e-6, 4/5) = 0.8;  x=0: 0/5e-6 = 0
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.normalizers"):
        got = scores(make_bank(source=[0, 0, 0, 5], target=[]), [1, 0], k_source=2)
    assert "event=local_density_floored" in caplog.text and "refs=3" in caplog.text
    assert got.tolist() == [pytest.approx(0.8, rel=1e-12), 0.0]


def test_ld_domain_single_target_ref_uses_source_density(make_bank) -> None:
    # T = {10}: b(10) over its K_T = 9 -> 4 nearest source refs: mean(3, 7, 9, 10) = 7.25
    # x = 11: S ratios with b_S (K=3 capped): 11/(11/3)=3, 10/3, 8/3, 4/(17/3)=12/17; T: 1/7.25
    got = scores(make_bank(target=[10]), [11])
    assert got[0] == pytest.approx(1 / 7.25, rel=1e-12)


def test_ld_domain_candidate_path_agrees_with_exact(clustered) -> None:
    rng = np.random.default_rng(5)
    data = clustered(rng, 3100, 96)
    stats = measure_ratio_agreement(data[:3000], data[3000:], candidates=64)
    assert stats["match_rate"] >= 0.98
    assert stats["exact_top_m_match_rate"] >= 0.98


def test_ld_domain_hnsw_scorer_matches_exact_scorer(info_factory, clustered) -> None:
    rng = np.random.default_rng(6)
    info = info_factory({"layer_1": 64})
    src, tgt, q = clustered(rng, 2500, 64), clustered(rng, 12, 64), clustered(rng, 150, 64)
    bank = MemoryBank(info, {"source": {"layer_1": src}, "target": {"layer_1": tgt}})
    exact = BankScorer.fit(bank, knn_only(exact_below=10**9))
    hnsw = BankScorer.fit(bank, knn_only(exact_below=1000))
    assert hnsw.state()["layers"]["layer_1"]["search"] == {"source": "hnsw", "target": "exact"}
    a, b = exact.score({"layer_1": q}), hnsw.score({"layer_1": q})
    assert np.mean(np.isclose(a, b, rtol=1e-9)) >= 0.98
    assert np.allclose(a, b, rtol=0.05)


def test_ld_domain_loo_through_hnsw_matches_exact(info_factory, clustered) -> None:
    rng = np.random.default_rng(7)
    info = info_factory({"layer_1": 32})
    bank = MemoryBank(info, {"source": {"layer_1": clustered(rng, 1500, 32)},
                             "target": {"layer_1": clustered(rng, 10, 32)}}).with_memmixup()
    exact = BankScorer.fit(bank, knn_only(exact_below=10**9)).loo_scores()
    hnsw = BankScorer.fit(bank, knn_only(exact_below=100, candidates=32)).loo_scores()
    assert exact.shape == hnsw.shape == (1510,)
    assert np.mean(np.isclose(exact, hnsw, rtol=1e-9)) >= 0.98


@pytest.mark.parametrize("normalizer", ["none", "ld-domain"])
def test_query_on_a_ref_far_from_the_origin_scores_exactly_zero(info_factory, normalizer: str) -> None:
    # The float64 norm expansion alone leaves distances of ~0.01-0.1 between identical points here.
    rng = np.random.default_rng(8)
    refs = (1.0e5 + rng.normal(size=(50, 64))).astype(np.float32)
    bank = MemoryBank(info_factory({"layer_1": 64}), {"source": {"layer_1": refs}})
    got = BankScorer.fit(bank, knn_only(normalizer=normalizer)).score({"layer_1": refs[:5]})
    assert got.tolist() == [0.0] * 5


def test_target_loo_exclusion_groups() -> None:
    from edge_agent.scoring.normalizers import LayerBank

    # 3 raw target refs, 2 MemMixup points each, in the bank's order [T; mixes of t0; t1; t2]
    lb = LayerBank("l", None, None, np.array([0, 1, 2, 0, 0, 1, 1, 2, 2]), 3)  # type: ignore[arg-type]
    assert lb.target_loo_exclude().tolist() == [[0, 3, 4], [1, 5, 6], [2, 7, 8]]
