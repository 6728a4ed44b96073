"""pool_grid and Poolings: each mode against a direct numpy formula, the meanstd layout, GeM's clamp, output names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.model_info import POOLINGS
from export.pooling import DEFAULT_GEM_P, GEM_EPS, GEM_P_MAX, GEM_P_MIN, Poolings, pool_grid, pooled_dim

from .pooling_reference import reference_pool

B, T, F, C = 2, 7, 3, 5


@pytest.fixture(scope="module")
def grid() -> np.ndarray:
    """[B, T, F, C] with both signs, a bin that is negative at every time step and one that is positive throughout."""
    values = np.random.default_rng(3).standard_normal((B, T, F, C)).astype(np.float32)
    values[:, :, 1, 2] = -np.abs(values[:, :, 1, 2]) - 0.1
    values[:, :, 2, 4] = np.abs(values[:, :, 2, 4]) + 0.1
    return values


def _pool(grid: np.ndarray, mode: str, gem_p: float = DEFAULT_GEM_P) -> np.ndarray:
    return pool_grid(torch.from_numpy(grid), mode, gem_p).numpy()


def test_time_mean_keeps_frequency(grid: np.ndarray) -> None:
    np.testing.assert_allclose(_pool(grid, "time-mean"), grid.mean(axis=1).reshape(B, F * C), rtol=1e-6, atol=1e-7)


def test_time_meanstd_is_means_then_population_stds(grid: np.ndarray) -> None:
    out = _pool(grid, "time-meanstd")
    assert out.shape == (B, 2 * F * C)
    expected = np.concatenate([grid.mean(axis=1).reshape(B, -1), grid.std(axis=1, ddof=0).reshape(B, -1)], axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # the layout spelled out: mean of (f, c) at f * C + c, its std F * C further on
    f, c = 2, 3
    assert out[1, f * C + c] == pytest.approx(float(grid[1, :, f, c].mean()), rel=1e-5)
    assert out[1, F * C + f * C + c] == pytest.approx(float(grid[1, :, f, c].std(ddof=0)), rel=1e-5)
    assert not np.allclose(out[:, F * C:], grid.std(axis=1, ddof=1).reshape(B, -1), rtol=1e-3)  # not T - 1


def test_population_std_of_two_steps() -> None:
    two = np.zeros((1, 2, 1, 1), np.float32)
    two[0, :, 0, 0] = [0.0, 2.0]
    np.testing.assert_allclose(_pool(two, "time-meanstd"), [[1.0, 1.0]])  # sample std would be sqrt(2)
    constant = np.full((1, 4, 2, 3), 5.0, np.float32)
    np.testing.assert_array_equal(_pool(constant, "time-meanstd")[:, 6:], 0.0)  # no NaN for zero variance


def test_time_max(grid: np.ndarray) -> None:
    np.testing.assert_array_equal(_pool(grid, "time-max"), grid.max(axis=1).reshape(B, F * C))


@pytest.mark.parametrize("p", [GEM_P_MIN, DEFAULT_GEM_P, 2.5, GEM_P_MAX])
def test_gem_matches_the_clamped_power_mean(grid: np.ndarray, p: float) -> None:
    out = _pool(grid, "gem", p)
    assert out.shape == (B, F * C)
    np.testing.assert_allclose(out, reference_pool(grid, "gem", p), rtol=2e-5, atol=1e-7)


def test_gem_negative_handling(grid: np.ndarray) -> None:
    out = _pool(grid, "gem").reshape(B, F, C)
    # a bin negative at every step: every value counts as GEM_EPS, so the result is GEM_EPS
    np.testing.assert_allclose(out[:, 1, 2], GEM_EPS, rtol=1e-4)
    np.testing.assert_allclose(_pool(grid, "gem", GEM_P_MAX).reshape(B, F, C)[:, 1, 2], GEM_EPS, rtol=1e-4)
    # negatives count as GEM_EPS, not as their absolute value nor as zero-and-dropped
    mixed = np.array([-3.0, 1.0, 2.0], np.float32).reshape(1, 3, 1, 1)
    expected = ((GEM_EPS**3 + 1.0 + 8.0) / 3) ** (1 / 3)
    assert _pool(mixed, "gem", 3.0)[0, 0] == pytest.approx(expected, rel=1e-6)
    assert _pool(mixed, "gem", 1.0)[0, 0] == pytest.approx((GEM_EPS + 3.0) / 3, rel=1e-6)  # p = 1: mean of clamped


def test_gem_lies_between_mean_and_max_of_positive_input(grid: np.ndarray) -> None:
    positive = np.abs(grid) + 0.01
    mean, high, gem = _pool(positive, "time-mean"), _pool(positive, "time-max"), _pool(positive, "gem")
    assert np.all(gem >= mean - 1e-6) and np.all(gem <= high + 1e-6)
    assert np.all(_pool(positive, "gem", GEM_P_MAX) >= gem - 1e-6)  # grows with p towards the max
    constant = np.full((1, 5, 2, 2), 0.7, np.float32)
    np.testing.assert_allclose(_pool(constant, "gem"), 0.7, rtol=1e-6)


def test_time_delta_is_the_mean_step_size(grid: np.ndarray) -> None:
    out = _pool(grid, "time-delta")
    assert out.shape == (B, F * C) and np.all(out >= 0)
    np.testing.assert_allclose(out, reference_pool(grid, "time-delta", DEFAULT_GEM_P), rtol=1e-5, atol=1e-7)
    f, c = 1, 4
    steps = np.abs(np.diff(grid[0, :, f, c]))
    assert out[0, f * C + c] == pytest.approx(float(steps.sum() / (T - 1)), rel=1e-5)  # T - 1 steps, not T
    ramp = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1) * 0.5
    np.testing.assert_allclose(_pool(ramp, "time-delta"), [[0.5]])
    np.testing.assert_allclose(_pool(-ramp[:, ::-1].copy(), "time-delta"), [[0.5]])  # direction does not matter
    constant = np.full((1, 4, 2, 3), 5.0, np.float32)
    np.testing.assert_array_equal(_pool(constant, "time-delta"), 0.0)
    # a steady bin and a bin that alternates with the same mean and spread: only time-delta tells them apart
    slow = np.repeat([0.0, 1.0], 4).astype(np.float32).reshape(1, 8, 1, 1)
    fast = np.tile([0.0, 1.0], 4).astype(np.float32).reshape(1, 8, 1, 1)
    np.testing.assert_allclose(_pool(slow, "time-meanstd"), _pool(fast, "time-meanstd"))
    assert _pool(fast, "time-delta")[0, 0] == pytest.approx(1.0)
    assert _pool(slow, "time-delta")[0, 0] == pytest.approx(1 / 7)


def test_time_delta_of_a_single_step_is_zero() -> None:
    one = np.random.default_rng(0).standard_normal((2, 1, 3, 4)).astype(np.float32)
    out = _pool(one, "time-delta")
    assert out.shape == (2, 12) and not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)


def test_spatial_and_spectral_unchanged(grid: np.ndarray) -> None:
    np.testing.assert_allclose(_pool(grid, "spatial"), grid.mean(axis=(1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_pool(grid, "spectral"), grid.mean(axis=2).reshape(B, T * C), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", POOLINGS)
def test_pooled_dim_matches_the_output(grid: np.ndarray, mode: str) -> None:
    assert _pool(grid, mode).shape == (B, pooled_dim(T, F, C, mode))


def test_bad_mode_and_gem_p_are_refused(grid: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not one of"):
        _pool(grid, "time-median")
    with pytest.raises(ValueError, match="not one of"):
        pooled_dim(T, F, C, "time-median")
    for p in (0.5, float("nan"), float("inf"), GEM_P_MAX + 0.5):
        with pytest.raises(ValueError, match="gem p"):
            _pool(grid, "gem", p)


def test_output_names_layer_by_layer() -> None:
    spec = Poolings(("time-mean", "time-meanstd", "time-max", "gem"))
    outputs = spec.outputs(["layer_11", "layer_12", "embedding"], fixed={"embedding": "spatial"})
    assert [o.name for o in outputs] == [
        "layer_11", "layer_11@meanstd", "layer_11@max", "layer_11@gem",
        "layer_12", "layer_12@meanstd", "layer_12@max", "layer_12@gem",
        "embedding",
    ]
    assert [o.mode for o in outputs[:4]] == list(spec.modes) and outputs[-1].mode == "spatial"
    assert {o.layer for o in outputs} == {"layer_11", "layer_12", "embedding"}
    # the first pooling is the default: its outputs have the plain name, time-mean then needs a suffix
    other = Poolings(("gem", "time-mean"), gem_p=2)
    assert [o.name for o in other.outputs(["layer_3"])] == ["layer_3", "layer_3@mean"]
    assert other.default == "gem" and other.gem_p == 2.0 and isinstance(other.gem_p, float)
    assert Poolings.of("spatial") == Poolings(("spatial",))


@pytest.mark.parametrize(
    ("modes", "gem_p", "fragment"),
    [
        ((), 3.0, "non-empty"),
        ("time-mean", 3.0, "non-empty"),
        (("time-mean", "time-mean"), 3.0, "repeat"),
        (("time-mean", "bogus"), 3.0, "'bogus' is not one of"),
        (("gem",), 0.0, "gem p"),
    ],
)
def test_poolings_refuse(modes: tuple[str, ...], gem_p: float, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Poolings(modes, gem_p)
