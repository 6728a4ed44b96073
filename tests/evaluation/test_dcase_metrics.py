"""DCASE metrics: hand-computed cases and equality with sklearn / scipy (test-only dependencies)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from edge_agent.evaluation.dcase_metrics import (
    FLOAT_EPS,
    harmonic_mean,
    partial_roc_auc,
    roc_auc,
    roc_curve,
    section_metrics,
    summarize,
)


def test_auc_hand_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs (neg, pos): (0.1,0.35) (0.1,0.8) (0.4,0.35)x (0.4,0.8) -> 3 of 4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # pairs: (0.2,0.3) (0.2,0.5) won, (0.5,0.3) lost, (0.5,0.5) a tie counting one half -> 2.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.2, 0.3, 0.5, 0.5]) == 0.625


def test_pauc_hand_cases() -> None:
    # perfect: partial area 0.1 -> McClish 1
    assert partial_roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0, abs=1e-15)
    # non-discriminating (all tied): the diagonal, area 0.005 -> 0.5
    assert partial_roc_auc([0, 0, 1, 1], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5, abs=1e-15)
    # inverted: area 0 -> 0.5 * (1 - 0.005 / 0.095)
    assert partial_roc_auc([0, 1], [1.0, 0.0]) == pytest.approx(0.5 * (1 - 0.005 / 0.095), abs=1e-15)
    # ten normals, one anomaly above all but one normal: TPR jumps 0 -> 1 at FPR 0.1
    scores = [0.0] * 9 + [2.0] + [1.0]
    labels = [0] * 10 + [1]
    assert partial_roc_auc(labels, scores) == pytest.approx(0.5 * (1 + (0.0 - 0.005) / 0.095), abs=1e-15)


def test_undefined_when_one_class() -> None:
    assert math.isnan(roc_auc([0, 0, 0], [1.0, 2.0, 3.0]))
    assert math.isnan(partial_roc_auc([1, 1], [1.0, 2.0]))
    with pytest.raises(ValueError, match="both"):
        roc_curve([1, 1], [1.0, 2.0])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="only 0"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equally long"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="max_fpr"):
        partial_roc_auc([0, 1], [0.1, 0.2], max_fpr=0.0)


@pytest.mark.parametrize("rounding", [None, 1, 0])
def test_equal_to_sklearn_on_random_data(rounding: int | None) -> None:
    rng = np.random.default_rng(1234)
    checked = 0
    for _ in range(120):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
        if rounding is not None:
            scores = np.round(scores, rounding)  # many ties
        fpr, tpr, thresholds = roc_curve(labels, scores)
        sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels, scores)
        np.testing.assert_array_equal(fpr, sk_fpr)
        np.testing.assert_array_equal(tpr, sk_tpr)
        np.testing.assert_array_equal(thresholds, sk_thresholds)
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        for max_fpr in (0.1, 0.05, 0.37, 1.0):
            ours = partial_roc_auc(labels, scores, max_fpr)
            assert ours == pytest.approx(roc_auc_score(labels, scores, max_fpr=max_fpr), abs=1e-12)
        checked += 1
    assert checked > 100


def test_harmonic_mean_matches_scipy_and_clamps_zero_like_the_evaluator() -> None:
    values = np.random.default_rng(0).uniform(0.05, 1.0, 17)
    assert harmonic_mean(values) == pytest.approx(hmean(values), rel=1e-14)
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2.0 / 3.0)
    # a zero becomes float epsilon (evaluator: hmean(np.maximum(x, eps))): the mean collapses to ~3 eps
    assert harmonic_mean([1.0, 1.0, 0.0]) == pytest.approx(3 * FLOAT_EPS, rel=1e-6)
    assert harmonic_mean([0.8, float("nan")]) == pytest.approx(0.8)
    assert math.isnan(harmonic_mean([float("nan")]))


def test_section_metrics_use_all_anomalies_for_each_domain() -> None:
    # source normals low, target normals high; anomalies in the middle.
    scores = np.array([0.1, 0.2, 0.9, 1.0, 0.5, 0.6, 0.55, 0.65])
    anomaly = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    target = np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=bool)
    result = section_metrics(scores, anomaly, target)
    # source: 2 source normals vs all 4 anomalies (both domains): all anomalies are higher
    assert result.auc_source == 1.0
    # target: 2 target normals vs all 4 anomalies: all anomalies are lower
    assert result.auc_target == 0.0
    assert result.auc_all == pytest.approx(roc_auc_score(anomaly, scores))
    assert result.pauc == pytest.approx(roc_auc_score(anomaly, scores, max_fpr=0.1))
    assert result.counts == {"source_normal": 2, "source_anomaly": 2, "target_normal": 2, "target_anomaly": 2}


def test_section_metrics_against_the_evaluator_masks_on_random_data() -> None:
    rng = np.random.default_rng(7)
    scores = rng.normal(size=200)
    anomaly = rng.integers(0, 2, 200).astype(bool)
    target = rng.integers(0, 2, 200).astype(bool)
    scores[anomaly] += 0.7
    result = section_metrics(scores, anomaly, target)
    source_mask = ~target | anomaly
    target_mask = target | anomaly
    assert result.auc_source == pytest.approx(roc_auc_score(anomaly[source_mask], scores[source_mask]))
    assert result.auc_target == pytest.approx(roc_auc_score(anomaly[target_mask], scores[target_mask]))
    assert result.pauc == pytest.approx(roc_auc_score(anomaly, scores, max_fpr=0.1), abs=1e-12)
    same_domain_only = roc_auc_score(anomaly[target], scores[target])
    assert result.auc_target != pytest.approx(same_domain_only, abs=1e-9)


def test_summary_is_the_harmonic_mean_of_the_flat_list() -> None:
    a = section_metrics([0.1, 0.9, 0.2, 0.8, 0.7, 0.3], [0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 1])
    b = section_metrics([0.3, 0.2, 0.9, 0.1, 0.6, 0.5], [0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0])
    summary = summarize([a, b])
    flat = [a.auc_source, b.auc_source, a.auc_target, b.auc_target, a.pauc, b.pauc]
    assert summary.official == pytest.approx(hmean(np.maximum(flat, FLOAT_EPS)))
    assert summary.auc_source == pytest.approx(hmean(np.maximum([a.auc_source, b.auc_source], FLOAT_EPS)))
    assert summary.pauc == pytest.approx(hmean([a.pauc, b.pauc]))
    assert summary.n_undefined == 0


def test_summary_skips_and_counts_undefined_values() -> None:
    defined = section_metrics([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1], [0, 0, 1, 1])
    normals_only = section_metrics([0.1, 0.2], [0, 0], [0, 1])
    summary = summarize([defined, normals_only])
    assert summary.n_undefined == 3
    assert summary.official == pytest.approx(1.0)
