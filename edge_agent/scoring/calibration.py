"""Decision threshold from normal-only scores (the leave-one-out scores of the bank's refs).

"gamma": a shifted gamma distribution fitted by the method of moments (mean, variance, skewness),
threshold = its `quantile` point; "percentile": the empirical quantile. The gamma ppf is computed
here (regularized incomplete gamma + safeguarded Newton) so that scipy is not a runtime dependency.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError

METHODS = ("gamma", "percentile")
DEFAULT_QUANTILE = 0.99
# Below this sample skewness the gamma is (numerically) a normal: k = 4 / skew^2 > 400.
MIN_SKEW = 0.1
_EPS = 1e-14
_MAX_ITER = 100_000


def gammainc_lower(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) for a > 0, x >= 0."""
    if a <= 0:
        raise ValueError(f"shape must be > 0, got {a}")
    if x <= 0:
        return 0.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        # Series: P = x^a e^-x / Gamma(a+1) * sum_n x^n / ((a+1)...(a+n)).
        term = total = 1.0 / a
        ap = a
        for _ in range(_MAX_ITER):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return min(1.0, total * math.exp(log_prefix))
    # Continued fraction for Q = 1 - P (modified Lentz).
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return max(0.0, 1.0 - math.exp(log_prefix) * h)


def gamma_ppf(q: float, shape: float, loc: float = 0.0, scale: float = 1.0) -> float:
    """x with P(shape, (x - loc) / scale) = q: Newton steps kept inside a shrinking bracket."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    lo, hi = 0.0, max(1.0, shape)
    while gammainc_lower(shape, hi) < q:
        lo, hi = hi, hi * 2.0
    x = min(max(shape, lo), hi)  # the mean is a good start
    log_norm = math.lgamma(shape)
    for _ in range(200):
        p = gammainc_lower(shape, x)
        if p < q:
            lo = x
        else:
            hi = x
        density = math.exp((shape - 1.0) * math.log(x) - x - log_norm) if x > 0 else 0.0
        step = (p - q) / density if density > 0 else math.inf
        nxt = x - step
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= 1e-13 * max(1.0, abs(x)) or hi - lo <= 1e-13 * max(1.0, hi):
            x = nxt
            break
        x = nxt
    return loc + scale * x


def fit_gamma_moments(scores: np.ndarray) -> dict[str, float]:
    """Shifted gamma with the sample's mean, variance and skewness: shape, loc, scale.

    Returns shape = inf (a normal limit) when the skewness is below MIN_SKEW.
    """
    s = np.asarray(scores, dtype=np.float64)
    mean, std = float(s.mean()), float(s.std())
    skew = float(np.mean((s - mean) ** 3) / std**3) if std > 0 else 0.0
    if skew < MIN_SKEW:
        return {"shape": math.inf, "loc": mean, "scale": std, "mean": mean, "std": std, "skew": skew}
    shape = 4.0 / skew**2
    scale = std * skew / 2.0
    return {"shape": shape, "loc": mean - shape * scale, "scale": scale, "mean": mean, "std": std, "skew": skew}


def calibrate(scores: np.ndarray, method: str = "gamma", quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Threshold from normal-only scores; the dict is stored as bank.json "threshold"."""
    if method not in METHODS:
        raise ConfigError("threshold.method", f"must be one of {', '.join(METHODS)}", method)
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile < 1.0:
        raise ConfigError("threshold.quantile", "must be a number in (0, 1)", quantile)
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size < 2:
        raise ConfigError("threshold", f"calibration needs at least 2 finite normal scores, got {s.size}")
    result: dict[str, Any] = {"method": method, "quantile": float(quantile), "n": int(s.size)}
    if method == "percentile":
        result["value"] = float(np.quantile(s, quantile))
        result["params"] = {}
        return result
    params = fit_gamma_moments(s)
    if params["std"] == 0.0:
        value = params["mean"]
    elif math.isinf(params["shape"]):
        value = params["mean"] + params["std"] * NormalDist().inv_cdf(quantile)
    else:
        value = gamma_ppf(quantile, params["shape"], params["loc"], params["scale"])
    result["value"] = float(value)
    result["params"] = {k: (None if math.isinf(v) else float(v)) for k, v in params.items()}
    return result
