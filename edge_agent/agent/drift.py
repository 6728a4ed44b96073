"""Is a source's memory bank going stale? The recent scores against the calibration scores (the bank's
leave-one-out scores on its own normal refs, from which the threshold was calibrated), before a stale
bank floods the operator with alerts.

Two signals over the last `windows` scores: the recent `quantile` relative to the same quantile of the
calibration scores, and the fraction of windows over the threshold relative to the fraction expected.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Fewer calibration scores than this give no stable quantile: the ratio is then not judged.
MIN_CALIBRATION = 10


def _limits(lo: float, hi: float, lo_open: bool = False) -> dict[str, object]:
    """Field metadata for the agent's config validation: lo, hi (inclusive), lo_open."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "pattern": None}


@dataclass(frozen=True)
class DriftConfig:
    windows: int = field(default=360, metadata=_limits(2, 100_000))  # recent windows kept
    # before this many (or `windows`, if smaller) the status is "warming_up"
    min_windows: int = field(default=30, metadata=_limits(1, 100_000))
    quantile: float = field(default=0.5, metadata=_limits(0.0, 0.99999, lo_open=True))  # the quantile compared
    # recent quantile / calibration quantile above this: "drifting"
    ratio_warn: float = field(default=1.5, metadata=_limits(1.0, 1000.0, lo_open=True))
    # fraction of recent windows over the threshold above over_factor * the expected fraction: "drifting"
    over_factor: float = field(default=5.0, metadata=_limits(1.0, 1e6, lo_open=True))


class DriftTracker:
    """Rolling drift statistics of one source; observe() from the scoring thread, snapshot() from any."""

    def __init__(self, cfg: DriftConfig, calibration: np.ndarray | None, threshold: float,
                 expected_over: float | None) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=cfg.windows)
        self._over = 0  # recent scores over the threshold
        self._nonfinite = 0
        self._threshold = 0.0
        self._calibration_quantile: float | None = None
        self._expected_over: float | None = None
        self.reset(calibration, threshold, expected_over)

    def reset(self, calibration: np.ndarray | None, threshold: float, expected_over: float | None) -> None:
        """A new bank or threshold: new reference statistics, and the recent scores are forgotten."""
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if expected_over is not None and not 0.0 < expected_over < 1.0:
            raise ValueError(f"expected_over must be in (0, 1), got {expected_over}")
        scores = _finite_scores(calibration)
        with self._lock:
            self._threshold = threshold
            self._calibration_quantile = _calibration_quantile(scores, self.cfg.quantile)
            self._expected_over = _expected_over(scores, threshold, expected_over)
            self._recent.clear()
            self._over = 0
            self._nonfinite = 0

    def observe(self, score: float) -> None:
        value = float(score)
        with self._lock:
            if not math.isfinite(value):
                self._nonfinite += 1
                return
            if len(self._recent) == self._recent.maxlen and self._recent[0] > self._threshold:
                self._over -= 1  # the append below evicts it
            self._recent.append(value)
            if value > self._threshold:
                self._over += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe statistics and status ("warming_up" | "ok" | "drifting") with the reasons for it."""
        with self._lock:
            recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
            over, nonfinite = self._over, self._nonfinite
            calibration, expected = self._calibration_quantile, self._expected_over
        n = recent.size
        quantile = _json_float(float(np.quantile(recent, self.cfg.quantile))) if n else None
        ratio = _json_float(quantile / calibration) if quantile is not None and calibration is not None else None
        over_fraction = over / n if n else None
        status, reasons = self._judge(n, ratio, over_fraction, expected)
        return {"windows": n, "recent_quantile": quantile, "calibration_quantile": calibration, "ratio": ratio,
                "over_fraction": over_fraction, "expected_over": expected, "status": status,
                "reasons": reasons, "nonfinite": nonfinite}

    def _judge(self, n: int, ratio: float | None, over_fraction: float | None,
               expected: float | None) -> tuple[str, list[str]]:
        cfg = self.cfg
        needed = min(cfg.min_windows, cfg.windows)
        if n < needed:
            return "warming_up", [f"{n} of {needed} windows scored"]
        reasons = []
        if ratio is not None and ratio > cfg.ratio_warn:
            reasons.append(f"recent q{cfg.quantile:g} score is {ratio:.3g}x the calibration's "
                           f"(limit {cfg.ratio_warn:g}x)")
        if over_fraction is not None and expected is not None and over_fraction > cfg.over_factor * expected:
            reasons.append(f"{over_fraction:.3g} of recent windows over the threshold, {expected:.3g} expected "
                           f"(limit {cfg.over_factor:g}x)")
        return ("drifting" if reasons else "ok"), reasons


def _finite_scores(calibration: np.ndarray | None) -> np.ndarray:
    if calibration is None:
        return np.empty(0)
    scores = np.asarray(calibration, dtype=np.float64).ravel()
    return scores[np.isfinite(scores)]


def _calibration_quantile(scores: np.ndarray, quantile: float) -> float | None:
    """The reference of the ratio, or None when there is none worth dividing by.

    A ratio of quantiles means something only on a scale with a true zero (distances, distance ratios);
    calibration scores below 0 (z-scores) or a quantile of 0 leave the ratio unjudged.
    """
    if scores.size < MIN_CALIBRATION or scores.min() < 0:
        return None
    value = _json_float(float(np.quantile(scores, quantile)))
    return value if value is not None and value > 0 else None


def _expected_over(scores: np.ndarray, threshold: float, given: float | None) -> float | None:
    """The fraction of normal windows over the threshold: given, else measured on the calibration scores."""
    if given is not None:
        return float(given)
    if scores.size < MIN_CALIBRATION:
        return None
    # A threshold above every calibration score measures 0, which would make a single window over it
    # "drifting": the smallest fraction the calibration can resolve is one score.
    return max(float(np.count_nonzero(scores > threshold)), 1.0) / scores.size


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
