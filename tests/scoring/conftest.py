"""Fixtures for the scoring tests: a model description and structured random banks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.model_info import ModelInfo


def make_info(dims: dict[str, int], default: tuple[str, ...] | None = None, variant: str = "mn04") -> ModelInfo:
    layers = tuple(dims)
    return ModelInfo(family="efficientat", variant=variant, sample_rate=32000, window_samples=320000,
                     layers=layers, dims=tuple(dims.values()), default_layers=default or layers[-1:],
                     checkpoint_sha256="ab" * 32, exporter_version="test")


def clustered_points(rng: np.random.Generator, n: int, dim: int, clusters: int = 20,
                     intrinsic: int = 16) -> np.ndarray:
    """Clusters of different spread on random low-dimensional subspaces (embedding-like structure)."""
    centers = rng.normal(size=(clusters, dim)) * 3.0
    spread = rng.uniform(0.3, 2.0, size=clusters)
    bases = np.stack([np.linalg.qr(rng.normal(size=(dim, intrinsic)))[0] for _ in range(clusters)])
    label = rng.integers(0, clusters, n)
    z = rng.normal(size=(n, intrinsic))
    x = centers[label] + spread[label, None] * np.einsum("nk,ndk->nd", z, bases[label])
    return (x + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture
def info_factory() -> Callable[..., ModelInfo]:
    return make_info


@pytest.fixture
def clustered() -> Callable[..., np.ndarray]:
    return clustered_points
