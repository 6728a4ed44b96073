"""Build, calibrate and save the banks of a model set from embeddings: one path for the CLI and the agent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import BankError
from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank import MemoryBank, MixupSpec
from edge_agent.scoring.bank_set import BankSet, load_banks, save_banks
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer, Scorer


@dataclass(frozen=True)
class Enrolled:
    banks: BankSet  # as loaded back from disk, members in the order of `models`
    scorer: Scorer
    threshold: dict[str, Any]  # calibrated on the mean of the members' leave-one-out scores


def enroll(
    bank_dir: Path,
    models: Sequence[MemberModel],
    embeddings: Sequence[dict[str, dict[str, np.ndarray]]],
    names: dict[str, list[str]],
    cfg: ScoringConfig,
    mixup: MixupSpec | None = None,
    threshold_method: str = "gamma",
    threshold_quantile: float = 0.99,
) -> Enrolled:
    """`embeddings[i]` are model i's embeddings ({domain: {layer: [N, D]}}) of the same windows (`names`).

    Each member bank is fitted and calibrated on its own; the set's threshold is calibrated on the mean
    of the members' leave-one-out scores (for one model: its own); the banks are saved atomically and
    loaded back, so what runs is exactly what is on disk.
    """
    if len(models) != len(embeddings):
        raise BankError(f"{bank_dir}: {len(embeddings)} embedding sets for {len(models)} models")
    scorers = [BankScorer.fit(MemoryBank(m.info, emb, names, mixup=mixup), cfg)
               for m, emb in zip(models, embeddings, strict=True)]
    member_loo = [s.loo_scores() for s in scorers]
    member_thresholds = [calibrate(loo, threshold_method, threshold_quantile) for loo in member_loo]
    mean_loo = np.mean(np.stack(member_loo), axis=0)  # same refs in the same order in every member
    threshold = calibrate(mean_loo, threshold_method, threshold_quantile)
    save_banks(bank_dir, scorers, models, threshold, cfg.to_dict(), member_thresholds)
    loaded = load_banks(bank_dir, models)
    return Enrolled(loaded, Scorer.fit(loaded.banks, cfg), threshold)
