"""Build, calibrate and save a memory bank (or an ensemble bank) from embeddings: one path for the CLI
and the daemon."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bank import MemoryBank, MixupSpec
from edge_agent.calibration import calibrate
from edge_agent.ensemble_bank import EnsembleBank, load_ensemble, save_ensemble
from edge_agent.errors import BankError
from edge_agent.model_info import ModelInfo
from edge_agent.model_set import MemberModel
from edge_agent.scoring import EnsembleScorer, Scorer, ScoringConfig


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


@dataclass(frozen=True)
class EnrolledEnsemble:
    bank: EnsembleBank  # as loaded back from disk, members in the order of `models`
    scorer: EnsembleScorer
    threshold: dict[str, Any]  # the ensemble's, on the mean of the members' leave-one-out scores


def enroll_ensemble(
    bank_dir: Path,
    models: Sequence[MemberModel],
    embeddings: Sequence[dict[str, dict[str, np.ndarray]]],
    names: dict[str, list[str]],
    cfg: ScoringConfig,
    mixup: MixupSpec | None = None,
    threshold_method: str = "gamma",
    threshold_quantile: float = 0.99,
) -> EnrolledEnsemble:
    """enroll_bank for several encoders: `embeddings[i]` are model i's embeddings of the same windows
    (same order, `names`). Each member bank is fitted and calibrated on its own; the ensemble
    threshold is calibrated on the mean of the members' leave-one-out scores; the whole ensemble is
    saved atomically and loaded back."""
    if len(models) != len(embeddings):
        raise BankError(f"{bank_dir}: {len(embeddings)} embedding sets for {len(models)} models")
    scorers = [Scorer.fit(MemoryBank(m.info, emb, names, mixup=mixup), cfg) for m, emb in zip(models, embeddings,
                                                                                            strict=True)]
    member_loo = [s.loo_scores() for s in scorers]
    member_thresholds = [calibrate(loo, threshold_method, threshold_quantile) for loo in member_loo]
    ensemble_loo = np.mean(np.stack(member_loo), axis=0)  # same refs in the same order in every member
    threshold = calibrate(ensemble_loo, threshold_method, threshold_quantile)
    save_ensemble(bank_dir, scorers, models, threshold, cfg.to_dict(), member_thresholds)
    loaded = load_ensemble(bank_dir, models)
    return EnrolledEnsemble(loaded, EnsembleScorer([Scorer.fit(b, cfg) for b in loaded.banks]), threshold)
