"""`edge-agent evaluate`: memory banks from train/, anomaly scores on test/, DCASE metrics.

Per machine and section: the training clips (source / target by file name) form a MemoryBank, a
Scorer is fitted on it, and the whole test set of the section is scored in one call (zscore-test
standardizes over that batch). Several models make an EnsembleScorer (mean of normalized scores).
Each clip is read once and embedded once per model; `embed_dataset` returns those embeddings so
that several scoring configurations can be compared without embedding again (`score_embeddings`).
Test labels are used only for the metrics, never for fitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.audio.wavio import read_wav
from edge_agent.errors import ConfigError, DatasetError
from edge_agent.evaluation.dcase import Clip, Dataset, scan_dataset
from edge_agent.evaluation.dcase_metrics import MAX_FPR, SectionMetrics, Summary, section_metrics, summarize
from edge_agent.evaluation.progress import Progress
from edge_agent.logs import get_logger
from edge_agent.model.encoder import Encoder
from edge_agent.model_info import ModelInfo
from edge_agent.scoring.bank import MemoryBank, MixupSpec
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer, Scorer

log = get_logger(__name__)


@dataclass
class ModelEmbeddings:
    """Embeddings of every clip of a dataset by one model: {clip path: {layer: [D]}}."""

    info: ModelInfo
    model_id: str
    path: Path
    layers: tuple[str, ...]  # the outputs kept (all, or those scoring will use)
    by_clip: dict[Path, dict[str, np.ndarray]] = field(default_factory=dict)

    def stack(self, clips: Sequence[Clip], layers: Sequence[str]) -> dict[str, np.ndarray]:
        if not clips:
            return {layer: np.zeros((0, self.info.dim(layer)), np.float32) for layer in layers}
        return {layer: np.stack([self.by_clip[c.path][layer] for c in clips]) for layer in layers}


@dataclass
class DatasetEmbeddings:
    dataset: Dataset
    models: list[ModelEmbeddings]


def kept_layers(info: ModelInfo, layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """None: every output; "default": the model's default_layers; a list: those of them the model has."""
    if layers is None:
        return info.layers
    if isinstance(layers, str):
        if layers != "default":
            raise ValueError(f"layers must be None, 'default' or a list of names, got {layers!r}")
        return info.default_layers
    kept = tuple(layer for layer in info.layers if layer in layers)
    if not kept:
        raise ConfigError("scoring.layers", f"none of them is an output of {info.variant} "
                          f"({', '.join(info.layers)})", list(layers))
    return kept


def embed_dataset(model_paths: Sequence[Path], dataset: Dataset | Path, batch_size: int = 8,
                  progress: bool = True, providers: Sequence[str] = ("auto",),
                  layers: Sequence[str] | str | None = None) -> DatasetEmbeddings:
    """Read every train and test clip once and embed it with each model.

    `layers` limits what is kept in memory (see kept_layers); a 12-layer BEATs keeps ~300 kB per
    clip with every output, which adds up over a full DCASE development set.
    """
    if not model_paths:
        raise DatasetError("no model given to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(dataset, Dataset):
        dataset = scan_dataset(dataset)
    encoders = [Encoder(Path(p), providers=providers) for p in model_paths]
    results = [ModelEmbeddings(enc.info, enc.model_id, enc.path, kept_layers(enc.info, layers))
               for enc in encoders]
    clips = dataset.all_clips()
    with Progress(len(clips), "embedding", enabled=progress) as bar:
        for first in range(0, len(clips), batch_size):
            batch = clips[first:first + batch_size]
            audio = [read_wav(clip.path) for clip in batch]
            for encoder, result in zip(encoders, results, strict=True):
                windows = np.stack([encoder.prepare(samples, rate) for samples, rate in audio])
                outputs = encoder.embed(windows)
                for row, clip in enumerate(batch):
                    result.by_clip[clip.path] = {layer: outputs[layer][row] for layer in result.layers}
            bar.update(len(batch))
    return DatasetEmbeddings(dataset, results)


@dataclass
class SectionResult:
    machine: str
    section: str
    metrics: SectionMetrics
    clips: list[Clip]
    scores: np.ndarray  # one anomaly score per test clip, in the order of `clips`
    n_train: dict[str, int]  # refs per domain

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics.as_dict(), "n_train": dict(self.n_train)}


@dataclass
class EvalResult:
    sections: list[SectionResult]
    summary: Summary
    config: dict[str, Any]
    models: list[dict[str, Any]]
    dataset_root: Path

    def machine_names(self) -> list[str]:
        return sorted({s.machine for s in self.sections})

    def machine_sections(self, machine: str) -> list[SectionResult]:
        return [s for s in self.sections if s.machine == machine]

    def machine_dict(self, machine: str) -> dict[str, Any]:
        """A machine's metrics; with several sections, their arithmetic mean (as the evaluator's table)."""
        sections = self.machine_sections(machine)
        if len(sections) == 1:
            return {"section": sections[0].section, **sections[0].as_dict()}
        out: dict[str, Any] = {}
        for key in ("auc_source", "auc_target", "pauc", "auc_all"):
            values = np.array([getattr(s.metrics, key) for s in sections], dtype=np.float64)
            finite = values[~np.isnan(values)]
            out[key] = float(finite.mean()) if finite.size else None
        out["n_test"] = sum(s.metrics.n_test for s in sections)
        out["sections"] = {s.section: s.as_dict() for s in sections}
        return out

    def to_json(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "official": _finite_or_none(summary.official),
            "auc_source": _finite_or_none(summary.auc_source),
            "auc_target": _finite_or_none(summary.auc_target),
            "pauc": _finite_or_none(summary.pauc),
            "n_undefined": summary.n_undefined,
            "complete": summary.n_undefined == 0,
            "max_fpr": MAX_FPR,
            "machines": {name: self.machine_dict(name) for name in self.machine_names()},
            "config": self.config,
            "models": self.models,
            "dataset": str(self.dataset_root),
        }


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _section_bank(model: ModelEmbeddings, train: dict[str, list[Clip]], mixup: MixupSpec | None) -> MemoryBank:
    layers = model.layers
    embeddings = {domain: model.stack(clips, layers) for domain, clips in train.items() if clips}
    names = {domain: [c.path.name for c in clips] for domain, clips in train.items() if clips}
    return MemoryBank(model.info, embeddings, names, mixup=mixup)


def score_embeddings(embeddings: DatasetEmbeddings, cfg: ScoringConfig, mixup: MixupSpec | None = None) -> EvalResult:
    """Fit scorers on each section's training clips and compute the DCASE metrics on its test clips."""
    sections: list[SectionResult] = []
    layers_used: dict[Path, list[str]] = {}
    for machine in embeddings.dataset.machines.values():
        for section in machine.sections:
            train = machine.train_by_domain(section)
            test = machine.test_clips(section)
            if not train["source"]:
                raise DatasetError(f"{machine.root}: section {section} has no source training clips")
            if not test:
                raise DatasetError(f"{machine.root}: section {section} has no test clips")
            labels = [clip.is_anomaly for clip in test]  # DatasetError for unlabelled names
            domains = [clip.is_target for clip in test]
            scorer = Scorer([BankScorer.fit(_section_bank(model, train, mixup), cfg) for model in embeddings.models])
            scores = np.asarray(scorer.score([model.stack(test, model.layers) for model in embeddings.models]),
                                dtype=np.float64)
            for model, member in zip(embeddings.models, scorer.members, strict=True):
                layers_used[model.path] = list(member.layers)
            metrics = section_metrics(scores, labels, domains)
            sections.append(SectionResult(machine.machine, section, metrics, test, scores,
                                          {domain: len(clips) for domain, clips in train.items()}))
            log.info("section_scored", machine=machine.machine, section=section,
                     auc_source=round(metrics.auc_source, 4), auc_target=round(metrics.auc_target, 4),
                     pauc=round(metrics.pauc, 4))
    summary = summarize([s.metrics for s in sections])
    if summary.n_undefined:
        undefined = [f"{s.machine}/{s.section}" for s in sections
                     if np.isnan([s.metrics.auc_source, s.metrics.auc_target, s.metrics.pauc]).any()]
        log.warning("metrics_undefined", values=summary.n_undefined, sections=",".join(undefined),
                    cause="a subset lacks normal or anomalous clips; the harmonic means leave them out")
    models = [{"path": str(m.path), "model_id": m.model_id, "variant": m.info.variant,
               "layers": layers_used.get(m.path, [])} for m in embeddings.models]
    config = cfg.to_dict()
    config["memmixup"] = None if mixup is None else mixup.as_dict()
    return EvalResult(sections, summary, config, models, embeddings.dataset.root)


def evaluate_dataset(model_paths: Sequence[Path], dataset_root: Path, cfg: ScoringConfig, batch_size: int = 8,
                     progress: bool = True, machines: Sequence[str] | None = None,
                     mixup: MixupSpec | None = None) -> EvalResult:
    """Embed, score and measure a DCASE-layout dataset (`report.write_report` writes a report of it)."""
    dataset = scan_dataset(dataset_root, machines)
    embeddings = embed_dataset(model_paths, dataset, batch_size=batch_size, progress=progress,
                               layers=cfg.layers if cfg.layers is not None else "default")
    return score_embeddings(embeddings, cfg, mixup)
