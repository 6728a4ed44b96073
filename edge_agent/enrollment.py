"""Build, calibrate and save a memory bank from embeddings: one path for the CLI and the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bank import MemoryBank, MixupSpec
from edge_agent.calibration import calibrate
from edge_agent.model_info import ModelInfo
from edge_agent.scoring import Scorer, ScoringConfig


@dataclass(frozen=True)
class Enrolled:
    bank: MemoryBank  # as loaded back from disk
    scorer: Scorer
    threshold: dict[str, Any]


def enroll_bank(
    bank_dir: Path,
    info: ModelInfo,
    embeddings: dict[str, dict[str, np.ndarray]],
    names: dict[str, list[str]],
    cfg: ScoringConfig,
    model_sha256: str,
    mixup: MixupSpec | None = None,
    threshold_method: str = "gamma",
    threshold_quantile: float = 0.99,
) -> Enrolled:
    """Fit the scorer, calibrate the threshold on leave-one-out scores of the refs, save atomically,
    and load the bank back (so what runs is exactly what is on disk)."""
    bank = MemoryBank(info, embeddings, names, mixup=mixup)
    scorer = Scorer.fit(bank, cfg)
    threshold = calibrate(scorer.loo_scores(), threshold_method, threshold_quantile)
    scorer.save(bank_dir, threshold=threshold, model_sha256=model_sha256)
    loaded = MemoryBank.load(bank_dir, expect=info, model_sha256=model_sha256)
    return Enrolled(loaded, Scorer.fit(loaded, cfg), threshold)
