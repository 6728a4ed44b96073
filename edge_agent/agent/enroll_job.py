"""The agent's `enroll` command: collect the embeddings of a source's next windows, then build a new
target bank from them (off the inference thread; the control plane swaps it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.agent.config import EnrollConfig
from edge_agent.clock import compact_stamp
from edge_agent.scoring.bank import MixupSpec
from edge_agent.scoring.bank_set import BankSet
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import Enrolled, enroll


@dataclass
class EnrollJob:
    windows: int
    request_id: str | None
    # per member model: {layer: [batches of embeddings]}
    embeddings: list[dict[str, list[np.ndarray]]] = field(default_factory=list)
    collected: int = 0

    def collect(self, banks: BankSet, embs: list[dict[str, np.ndarray]]) -> bool:
        """embs: per member model (the banks' order) this batch's embeddings. True once the job is full."""
        take = min(self.windows - self.collected, next(iter(embs[0].values())).shape[0])
        if not self.embeddings:
            self.embeddings = [{} for _ in banks.banks]
        for bank, emb, parts in zip(banks.banks, embs, self.embeddings, strict=True):
            for layer in bank.layers:
                parts.setdefault(layer, []).append(emb[layer][:take])
        self.collected += take
        return self.collected >= self.windows


def build_target_bank(bank_dir: Path, banks: BankSet, job: EnrollJob, scoring: ScoringConfig,
                      ecfg: EnrollConfig) -> Enrolled:
    """Save the banks with the job's windows as their target refs (source refs kept) and load them back."""
    stamp = compact_stamp()
    names = {"source": banks.names["source"], "target": [f"enroll_{stamp}_{i:04d}" for i in range(job.windows)]}
    mixup = MixupSpec(ecfg.memmixup_lambda, ecfg.memmixup_k) if ecfg.memmixup else None
    # Every member keeps its source refs and gets its own embeddings of the same recorded windows.
    embeddings = [{"source": {layer: bank.get_raw(layer, "source") for layer in bank.layers},
                   "target": {layer: np.concatenate(parts) for layer, parts in collected.items()}}
                  for bank, collected in zip(banks.banks, job.embeddings, strict=True)]
    return enroll(bank_dir, banks.models, embeddings, names, scoring, mixup=mixup,
                  threshold_method=ecfg.threshold_method, threshold_quantile=ecfg.threshold_quantile)
