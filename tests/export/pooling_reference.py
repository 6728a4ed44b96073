"""Reference poolings in float64 numpy, written from the definitions in docs/encoders.md (not from export/)."""

from __future__ import annotations

import numpy as np

from export.pooling import GEM_EPS


def reference_pool(grid: np.ndarray, mode: str, gem_p: float) -> np.ndarray:
    """grid [B, T, F, C] -> [B, D], every frequency-keeping vector flattened as [F, C]."""
    g = np.asarray(grid, np.float64)
    batch = g.shape[0]
    if mode == "time-mean":
        return g.mean(axis=1).reshape(batch, -1)
    if mode == "time-meanstd":
        return np.concatenate([g.mean(axis=1).reshape(batch, -1), g.std(axis=1, ddof=0).reshape(batch, -1)], axis=1)
    if mode == "time-max":
        return g.max(axis=1).reshape(batch, -1)
    if mode == "gem":
        return ((np.maximum(g, GEM_EPS) ** gem_p).mean(axis=1) ** (1.0 / gem_p)).reshape(batch, -1)
    if mode == "time-delta":
        if g.shape[1] < 2:
            return np.zeros((batch, g.shape[2] * g.shape[3]))
        return np.abs(np.diff(g, axis=1)).mean(axis=1).reshape(batch, -1)
    if mode == "spatial":
        return g.mean(axis=(1, 2))
    raise ValueError(mode)


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max|got - expected| / max|expected|, the exporter's verification measure."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-12))
