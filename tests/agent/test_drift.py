from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable

import numpy as np
import pytest

from edge_agent.agent.drift import MIN_CALIBRATION, DriftConfig, DriftTracker


def _calibration(seed: int = 0, n: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).gamma(4.0, 0.25, size=n)  # distance-like: positive, skewed


def _feed(tracker: DriftTracker, scores: Iterable[float]) -> None:
    for s in scores:
        tracker.observe(float(s))


def _tracker(cfg: DriftConfig | None = None, expected_over: float | None = 0.01,
             threshold: float | None = None) -> tuple[DriftTracker, np.ndarray]:
    cal = _calibration()
    thr = float(np.quantile(cal, 0.99)) if threshold is None else threshold
    return DriftTracker(cfg or DriftConfig(), cal, thr, expected_over), cal


def test_warming_up_then_ok_on_normal_scores() -> None:
    tracker, cal = _tracker()
    snap = tracker.snapshot()
    assert snap["status"] == "warming_up" and snap["windows"] == 0
    assert snap["recent_quantile"] is None and snap["ratio"] is None and snap["over_fraction"] is None
    assert snap["calibration_quantile"] == pytest.approx(np.median(cal))
    normal = np.random.default_rng(1).gamma(4.0, 0.25, size=360)
    _feed(tracker, normal[:29])
    snap = tracker.snapshot()
    assert snap["status"] == "warming_up" and snap["reasons"] == ["29 of 30 windows scored"]
    assert snap["recent_quantile"] == pytest.approx(np.median(normal[:29]))
    _feed(tracker, normal[29:])
    snap = tracker.snapshot()
    assert snap["status"] == "ok" and snap["reasons"] == [] and snap["windows"] == 360
    assert snap["ratio"] == pytest.approx(np.median(normal) / np.median(cal))
    assert 0.8 < snap["ratio"] < 1.2 and snap["expected_over"] == 0.01


def test_scores_shifted_up_two_fold_are_drifting() -> None:
    tracker, cal = _tracker(expected_over=None)
    threshold = float(np.quantile(cal, 0.99))
    shifted = 2.0 * np.random.default_rng(2).gamma(4.0, 0.25, size=100)
    _feed(tracker, shifted)
    snap = tracker.snapshot()
    assert snap["status"] == "drifting"
    assert snap["ratio"] == pytest.approx(2.0, rel=0.15)
    assert any("calibration" in r for r in snap["reasons"])
    assert snap["over_fraction"] == pytest.approx(np.mean(shifted > threshold))


def test_ten_percent_over_a_one_percent_threshold_is_drifting() -> None:
    cfg = DriftConfig(ratio_warn=1000.0)  # only the over-fraction can trip
    tracker, cal = _tracker(cfg)
    threshold = float(np.quantile(cal, 0.99))
    scores = np.full(200, float(np.median(cal)))
    scores[::10] = threshold * 1.5  # 10 % over
    _feed(tracker, scores)
    snap = tracker.snapshot()
    assert snap["over_fraction"] == pytest.approx(0.1)
    assert snap["status"] == "drifting" and len(snap["reasons"]) == 1 and "threshold" in snap["reasons"][0]
    scores[::10] = np.median(cal)
    scores[::50] = threshold * 1.5  # 2 %: within 5x of 1 %
    tracker.reset(cal, threshold, 0.01)
    _feed(tracker, scores)
    assert tracker.snapshot()["status"] == "ok"


def test_a_hand_set_threshold_uses_the_calibration_fraction_over_it() -> None:
    cal = _calibration()
    threshold = float(np.quantile(cal, 0.9))  # set by hand: 10 % of normal windows over it
    tracker = DriftTracker(DriftConfig(), cal, threshold, None)
    _feed(tracker, np.random.default_rng(3).gamma(4.0, 0.25, size=360))
    snap = tracker.snapshot()
    assert snap["expected_over"] == pytest.approx(np.mean(cal > threshold))
    assert snap["status"] == "ok"


def test_a_threshold_above_every_calibration_score_expects_one_score_over() -> None:
    cal = _calibration()
    tracker = DriftTracker(DriftConfig(), cal, float(cal.max()) * 2, None)
    assert tracker.snapshot()["expected_over"] == pytest.approx(1 / cal.size)


def test_without_calibration_only_the_over_fraction_is_judged() -> None:
    tracker = DriftTracker(DriftConfig(min_windows=5), None, 1.0, 0.01)
    _feed(tracker, [0.5, 0.6, 2.0, 3.0, 0.4, 0.5])
    snap = tracker.snapshot()
    assert snap["calibration_quantile"] is None and snap["ratio"] is None
    assert snap["status"] == "drifting" and snap["over_fraction"] == pytest.approx(2 / 6)
    tiny = DriftTracker(DriftConfig(min_windows=5), np.ones(MIN_CALIBRATION - 1), 1.0, None)
    _feed(tiny, [5.0] * 10)
    snap = tiny.snapshot()
    assert snap["ratio"] is None and snap["expected_over"] is None and snap["status"] == "ok"


def test_without_calibration_or_expected_fraction_nothing_is_judged() -> None:
    bare = DriftTracker(DriftConfig(min_windows=3), None, 1.0, None)
    _feed(bare, [9.0, 9.0, 9.0])
    snap = bare.snapshot()
    assert snap["status"] == "ok" and snap["expected_over"] is None and snap["ratio"] is None
    assert snap["over_fraction"] == 1.0


def test_negative_calibration_scores_leave_the_ratio_unjudged() -> None:
    cal = np.random.default_rng(4).normal(0.05, 1.0, size=500)  # z-scores: a ratio means nothing
    tracker = DriftTracker(DriftConfig(min_windows=10), cal, float(np.quantile(cal, 0.99)), 0.01)
    _feed(tracker, np.random.default_rng(5).normal(0.5, 1.0, size=100))
    snap = tracker.snapshot()
    assert snap["calibration_quantile"] is None and snap["ratio"] is None


def test_reset_forgets_the_recent_scores() -> None:
    tracker, cal = _tracker(DriftConfig(min_windows=10))
    _feed(tracker, 3.0 * cal[:50])
    tracker.observe(math.nan)
    assert tracker.snapshot()["status"] == "drifting"
    tracker.reset(3.0 * cal, float(np.quantile(3.0 * cal, 0.99)), 0.01)
    snap = tracker.snapshot()
    assert snap["status"] == "warming_up" and snap["windows"] == 0 and snap["nonfinite"] == 0
    assert snap["calibration_quantile"] == pytest.approx(3.0 * np.median(cal))
    _feed(tracker, 3.0 * cal[:50])
    assert tracker.snapshot()["status"] == "ok"


def test_non_finite_scores_are_ignored_and_counted() -> None:
    tracker, _ = _tracker(DriftConfig(windows=4, min_windows=2))
    for s in [1.0, math.nan, math.inf, -math.inf, 2.0]:
        tracker.observe(s)
    snap = tracker.snapshot()
    assert snap["windows"] == 2 and snap["nonfinite"] == 3
    assert snap["recent_quantile"] == pytest.approx(1.5)


def test_eviction_matches_a_brute_force_recomputation() -> None:
    rng = np.random.default_rng(6)
    for trial in range(60):
        cfg = DriftConfig(windows=int(rng.integers(2, 40)), min_windows=int(rng.integers(1, 50)),
                          quantile=float(rng.uniform(0.01, 0.99)))
        threshold = float(rng.normal())
        tracker = DriftTracker(cfg, None, threshold, 0.05)
        seen: list[float] = []
        for _ in range(int(rng.integers(1, 120))):
            s = float(rng.choice([rng.normal(), threshold, math.nan]))
            tracker.observe(s)
            if math.isfinite(s):
                seen.append(s)
            window = np.array(seen[-cfg.windows:])
            snap = tracker.snapshot()
            assert snap["windows"] == window.size, trial
            if window.size:
                assert snap["over_fraction"] == pytest.approx(np.mean(window > threshold), abs=1e-12), trial
                assert snap["recent_quantile"] == pytest.approx(np.quantile(window, cfg.quantile)), trial
            warming = window.size < min(cfg.min_windows, cfg.windows)
            assert (snap["status"] == "warming_up") == warming, trial


def test_snapshot_is_strict_json() -> None:
    cal = np.array([0.0] * 5 + [1e-320] * 10)  # a denormal calibration quantile: q / c overflows
    tracker = DriftTracker(DriftConfig(min_windows=1), cal, 1.0, 0.01)
    for s in [1e308, 1e308, math.inf]:
        tracker.observe(s)
    snap = tracker.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["ratio"] is None
    for tracker in (DriftTracker(DriftConfig(), None, 0.5, None), _tracker()[0]):
        json.dumps(tracker.snapshot(), allow_nan=False)
        _feed(tracker, np.linspace(0, 3, 400))
        json.dumps(tracker.snapshot(), allow_nan=False)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="threshold"):
        DriftTracker(DriftConfig(), None, math.nan, None)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="expected_over"):
            DriftTracker(DriftConfig(), None, 1.0, bad)


def test_config_fields_carry_their_limits() -> None:
    limits = {f.name: (f.metadata["lo"], f.metadata["hi"], f.metadata["lo_open"])
              for f in dataclasses.fields(DriftConfig)}
    assert limits == {"windows": (2, 100_000, False), "min_windows": (1, 100_000, False),
                      "quantile": (0.0, 0.99999, True), "ratio_warn": (1.0, 1000.0, True),
                      "over_factor": (1.0, 1e6, True)}
    for f in dataclasses.fields(DriftConfig):
        lo, hi, _ = limits[f.name]
        assert lo <= f.default <= hi
