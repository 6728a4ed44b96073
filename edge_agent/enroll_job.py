"""The agent's `enroll` command: collect the embeddings of a source's next windows, then build a new
target bank from them (off the inference thread; the agent swaps it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.bank import MemoryBank, MixupSpec
from edge_agent.enrollment import enroll_bank, enroll_ensemble
from edge_agent.ensemble_bank import EnsembleBank
from edge_agent.scoring import EnsembleScorer, Scorer

if TYPE_CHECKING:
    from edge_agent.runtime import SourcePipeline


@dataclass
class EnrollJob:
    windows: int
    request_id: str | None
    # per model (one entry without an ensemble): {layer: [batches of embeddings]}
    embeddings: list[dict[str, list[np.ndarray]]] = field(default_factory=list)
    collected: int = 0


@dataclass(frozen=True)
class EnrolledTarget:
    bank: MemoryBank | EnsembleBank
    scorer: Scorer | EnsembleScorer
    threshold: dict[str, Any]  # the calibrated threshold, as saved with the bank
    mixup: MixupSpec | None


def member_banks(bank: MemoryBank | EnsembleBank) -> list[MemoryBank]:
    return bank.banks if isinstance(bank, EnsembleBank) else [bank]


def collect_enroll(pipeline: SourcePipeline, embs: list[dict[str, np.ndarray]]) -> EnrollJob | None:
    """embs: per model (the bank's members, in order) the embeddings of this batch's windows.
    Returns the job once it has all its windows, and then clears it from the pipeline."""
    job = pipeline.enroll
    if job is None:
        return None
    take = min(job.windows - job.collected, next(iter(embs[0].values())).shape[0])
    banks = member_banks(pipeline.bank)
    if not job.embeddings:
        job.embeddings = [{} for _ in banks]
    for bank, emb, parts in zip(banks, embs, job.embeddings, strict=True):
        for layer in bank.layers:
            parts.setdefault(layer, []).append(emb[layer][:take])
    job.collected += take
    if job.collected >= job.windows:
        pipeline.enroll = None
        return job
    return None


def build_target_bank(pipeline: SourcePipeline, job: EnrollJob, model_sha256: str) -> EnrolledTarget:
    """Save the pipeline's bank with the job's windows as its target refs (source refs kept), load it back."""
    old = pipeline.bank
    assert pipeline.cfg.bank is not None  # parse_config requires it
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    names = {"source": old.names["source"], "target": [f"enroll_{stamp}_{i:04d}" for i in range(job.windows)]}
    ecfg = pipeline.cfg.enroll
    mixup = MixupSpec(ecfg.memmixup_lambda, ecfg.memmixup_k) if ecfg.memmixup else None
    # Every member keeps its source refs and gets its own embeddings of the same recorded windows.
    embeddings = [{"source": {layer: bank.get_raw(layer, "source") for layer in bank.layers},
                   "target": {layer: np.concatenate(parts) for layer, parts in collected.items()}}
                  for bank, collected in zip(member_banks(old), job.embeddings, strict=True)]
    if isinstance(old, EnsembleBank):
        ensemble = enroll_ensemble(pipeline.cfg.bank, old.models, embeddings, names, pipeline.scoring,
                                   mixup=mixup, threshold_method=ecfg.threshold_method,
                                   threshold_quantile=ecfg.threshold_quantile)
        return EnrolledTarget(ensemble.bank, ensemble.scorer, ensemble.threshold, mixup)
    enrolled = enroll_bank(pipeline.cfg.bank, old.info, embeddings[0], names, pipeline.scoring,
                           model_sha256, mixup=mixup,
                           threshold_method=ecfg.threshold_method, threshold_quantile=ecfg.threshold_quantile)
    return EnrolledTarget(enrolled.bank, enrolled.scorer, enrolled.threshold, mixup)
