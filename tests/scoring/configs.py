"""Scoring configs for tests of the kNN scores and their normalizers alone (no statistics term, raw mean)."""

from __future__ import annotations

from typing import Any

from edge_agent.scoring.config import ScoringConfig


def knn_only(**fields: Any) -> ScoringConfig:
    """ScoringConfig(**fields) without the defaults' statistics term and standardized fusion."""
    return ScoringConfig(**{"feature_stats": "off", "fusion": "mean", **fields})
