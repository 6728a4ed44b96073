"""DCASE Task 2 metrics in numpy, matching the official evaluator (nttcslab dcase2023/2024 evaluators).

The evaluator computes, per machine and section:
- AUC (source): roc_auc_score over clips with domain == source OR label == anomaly
  (source normals against the anomalies of BOTH domains); AUC (target) likewise;
- pAUC: roc_auc_score(max_fpr=0.1) (McClish-corrected) over all test clips of the section;
- official score: harmonic mean of the flat list [AUC_s..., AUC_t..., pAUC...] over all machines
  and sections, each value clamped to float epsilon first (so a 0 does not raise; it drags the
  harmonic mean to ~0, as in the official code).

Undefined values: when a subset holds only one class, the AUC is undefined; like sklearn >= 1.6 we
return NaN (sklearn also warns). The aggregation helpers skip NaN and report how many were skipped;
the official evaluator would instead crash on such data.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_FPR = 0.1
FLOAT_EPS = sys.float_info.epsilon  # the clamp the evaluator applies before its harmonic means


def _as_binary(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"y_true {labels.shape} and y_score {scores.shape} must be 1-D and equally long")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"y_true must hold only 0 (normal) and 1 (anomaly), got {np.unique(labels)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("y_score holds NaN or infinite values")
    return labels.astype(np.int64), scores


def _one_class(labels: np.ndarray) -> bool:
    positives = int(labels.sum())
    return positives == 0 or positives == labels.size


def roc_auc(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Equal to sklearn.metrics.roc_auc_score up to float rounding; NaN when one class is absent.
    """
    labels, scores = _as_binary(y_true, y_score)
    if _one_class(labels):
        return float("nan")
    ranks = _average_ranks(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u_stat = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank_of_group = (starts + 1 + ends) / 2.0
    group_of_sorted = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank_of_group[group_of_sorted]
    return ranks


def roc_curve(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with sklearn.metrics.roc_curve(drop_intermediate=True) semantics.

    The first point is (0, 0) with threshold +inf; collinear intermediate points are dropped.
    Requires both classes.
    """
    labels, scores = _as_binary(y_true, y_score)
    if _one_class(labels):
        raise ValueError("the ROC curve needs both normal and anomalous clips")
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # the last index of each run of equal scores is one operating point
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    tps = np.cumsum(sorted_labels)[last_of_run].astype(np.float64)
    fps = 1.0 + last_of_run - tps
    thresholds = sorted_scores[last_of_run]
    if fps.size > 2:
        # keep a point only where the curve bends (second difference non-zero), plus both ends
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def partial_roc_auc(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                    max_fpr: float = MAX_FPR) -> float:
    """McClish-corrected partial AUC over FPR in [0, max_fpr], as roc_auc_score(max_fpr=...).

    0.5 for a non-discriminating score, 1 for a perfect one; NaN when one class is absent.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr!r}")
    labels, scores = _as_binary(y_true, y_score)
    if _one_class(labels):
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    if max_fpr == 1.0:
        return float(np.trapezoid(tpr, fpr))
    stop = int(np.searchsorted(fpr, max_fpr, "right"))
    tpr_at_max = np.interp(max_fpr, fpr[stop - 1: stop + 1], tpr[stop - 1: stop + 1])
    partial = float(np.trapezoid(np.r_[tpr[:stop], tpr_at_max], np.r_[fpr[:stop], max_fpr]))
    min_area = 0.5 * max_fpr**2
    max_area = max_fpr
    return 0.5 * (1.0 + (partial - min_area) / (max_area - min_area))


def harmonic_mean(values: Sequence[float] | np.ndarray) -> float:
    """Harmonic mean as the evaluator takes it: each value clamped to float epsilon, NaN skipped.

    scipy.stats.hmean(np.maximum(values, eps)) on the finite values; NaN when none is finite.
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    finite = array[~np.isnan(array)]
    if finite.size == 0:
        return float("nan")
    if np.any(finite < 0):
        raise ValueError(f"harmonic mean of negative values: {finite[finite < 0]}")
    return float(1.0 / np.mean(1.0 / np.maximum(finite, FLOAT_EPS)))


@dataclass(frozen=True)
class SectionMetrics:
    """Metrics of one machine section; NaN where a subset lacks a class."""

    auc_source: float
    auc_target: float
    pauc: float
    auc_all: float
    n_test: int
    counts: dict[str, int]  # "source_normal", "source_anomaly", "target_normal", "target_anomaly"

    def as_dict(self) -> dict[str, object]:
        return {
            "auc_source": _json_float(self.auc_source),
            "auc_target": _json_float(self.auc_target),
            "pauc": _json_float(self.pauc),
            "auc_all": _json_float(self.auc_all),
            "n_test": self.n_test,
            "counts": dict(self.counts),
        }


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def section_metrics(scores: Sequence[float] | np.ndarray, is_anomaly: Sequence[bool] | np.ndarray,
                    is_target: Sequence[bool] | np.ndarray, max_fpr: float = MAX_FPR) -> SectionMetrics:
    """AUC_source, AUC_target, pAUC of one section exactly as the DCASE evaluator selects clips."""
    score_array = np.asarray(scores, dtype=np.float64)
    anomaly = np.asarray(is_anomaly, dtype=bool)
    target = np.asarray(is_target, dtype=bool)
    if not (score_array.shape == anomaly.shape == target.shape) or score_array.ndim != 1:
        raise ValueError(f"scores {score_array.shape}, labels {anomaly.shape} and domains {target.shape} "
                         "must be 1-D and equally long")
    labels = anomaly.astype(np.int64)
    source_subset = ~target | anomaly
    target_subset = target | anomaly
    counts = {
        "source_normal": int(np.sum(~target & ~anomaly)),
        "source_anomaly": int(np.sum(~target & anomaly)),
        "target_normal": int(np.sum(target & ~anomaly)),
        "target_anomaly": int(np.sum(target & anomaly)),
    }
    return SectionMetrics(
        auc_source=roc_auc(labels[source_subset], score_array[source_subset]),
        auc_target=roc_auc(labels[target_subset], score_array[target_subset]),
        pauc=partial_roc_auc(labels, score_array, max_fpr),
        auc_all=roc_auc(labels, score_array),
        n_test=int(score_array.size),
        counts=counts,
    )


@dataclass(frozen=True)
class Summary:
    """Harmonic means over sections; `n_undefined` counts NaN values left out of `official`."""

    official: float
    auc_source: float
    auc_target: float
    pauc: float
    n_undefined: int


def summarize(sections: Sequence[SectionMetrics]) -> Summary:
    """The official score: harmonic mean of all AUC_s, AUC_t and pAUC values in one flat list."""
    auc_s = [s.auc_source for s in sections]
    auc_t = [s.auc_target for s in sections]
    pauc = [s.pauc for s in sections]
    flat = np.asarray(auc_s + auc_t + pauc, dtype=np.float64)
    return Summary(
        official=harmonic_mean(flat),
        auc_source=harmonic_mean(auc_s),
        auc_target=harmonic_mean(auc_t),
        pauc=harmonic_mean(pauc),
        n_undefined=int(np.isnan(flat).sum()),
    )
