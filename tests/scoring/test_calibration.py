from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from edge_agent.errors import ConfigError
from edge_agent.scoring.calibration import calibrate, fit_gamma_moments, gamma_ppf, gammainc_lower


@pytest.mark.parametrize("a", [0.05, 0.5, 1.0, 2.5, 9.0, 40.0, 400.0])
def test_regularized_incomplete_gamma_matches_scipy(a: float) -> None:
    for x in [0.0, 1e-6, 0.01, 0.3, 1.0, a, a + 1, 2 * a + 3, 5 * a + 20]:
        assert gammainc_lower(a, x) == pytest.approx(special.gammainc(a, x), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("shape", [0.3, 1.0, 2.2, 7.0, 80.0, 400.0])
@pytest.mark.parametrize("q", [0.01, 0.5, 0.9, 0.99, 0.999])
def test_gamma_ppf_matches_scipy(shape: float, q: float) -> None:
    got = gamma_ppf(q, shape, loc=-1.5, scale=0.3)
    assert got == pytest.approx(stats.gamma.ppf(q, shape, loc=-1.5, scale=0.3), rel=1e-9, abs=1e-12)


def test_moment_fit_reproduces_the_sample_moments() -> None:
    rng = np.random.default_rng(0)
    s = stats.gamma.rvs(3.0, loc=-2.0, scale=0.5, size=4000, random_state=rng)
    p = fit_gamma_moments(s)
    mean, var, skew = stats.gamma.stats(p["shape"], loc=p["loc"], scale=p["scale"], moments="mvs")
    assert mean == pytest.approx(s.mean(), rel=1e-12)
    assert var == pytest.approx(s.var(), rel=1e-12)
    assert skew == pytest.approx(stats.skew(s), rel=1e-10)
    assert p["shape"] == pytest.approx(3.0, rel=0.25) and p["loc"] == pytest.approx(-2.0, abs=0.3)


def test_gamma_threshold_on_negative_scores() -> None:
    rng = np.random.default_rng(1)
    s = stats.gamma.rvs(4.0, loc=-3.0, scale=0.6, size=5000, random_state=rng)
    assert s.min() < 0
    out = calibrate(s, "gamma", 0.99)
    p = out["params"]
    assert out["value"] == pytest.approx(stats.gamma.ppf(0.99, p["shape"], loc=p["loc"], scale=p["scale"]), rel=1e-9)
    assert out["value"] == pytest.approx(stats.gamma.ppf(0.99, 4.0, loc=-3.0, scale=0.6), rel=0.05)
    assert out["method"] == "gamma" and out["quantile"] == 0.99 and out["n"] == 5000


def test_symmetric_scores_use_the_normal_limit() -> None:
    s = np.linspace(-1, 1, 201)  # skewness 0
    out = calibrate(s, "gamma", 0.9)
    assert out["params"]["shape"] is None
    assert out["value"] == pytest.approx(s.mean() + s.std() * stats.norm.ppf(0.9), rel=1e-12)


def test_percentile_and_validation() -> None:
    s = np.arange(101, dtype=float)
    assert calibrate(s, "percentile", 0.9)["value"] == pytest.approx(90.0)
    assert calibrate([np.inf, 1.0, 3.0], "percentile", 0.5)["n"] == 2
    with pytest.raises(ConfigError, match=r"threshold\.quantile"):
        calibrate(s, "gamma", 1.0)
    with pytest.raises(ConfigError, match=r"threshold\.method"):
        calibrate(s, "mle", 0.9)
    with pytest.raises(ConfigError, match="at least 2"):
        calibrate([1.0], "gamma", 0.9)
    assert calibrate([2.0, 2.0, 2.0], "gamma", 0.99)["value"] == 2.0
