"""Offline subcommands of edge-agent: info, synth, enroll, score, evaluate."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from edge_agent.bank import MemoryBank, MixupSpec
from edge_agent.calibration import calibrate
from edge_agent.dcase import parse_clip_name
from edge_agent.embedding import Window, audio_files, embed_windows, file_windows
from edge_agent.encoder import Encoder
from edge_agent.enrollment import enroll_bank, enroll_ensemble
from edge_agent.ensemble_bank import EnsembleBank, describe_ensemble, is_ensemble_bank, load_bank_for
from edge_agent.errors import EdgeAsdError
from edge_agent.evaluate import add_evaluate_arguments, run_evaluate
from edge_agent.model_set import ModelSet
from edge_agent.normalizers import NORMALIZERS
from edge_agent.progress import Progress
from edge_agent.scoring import EnsembleScorer, Scorer, ScoringConfig
from edge_agent.synthetic import add_synth_arguments, run_synth

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    info = commands.add_parser("info", help="show the metadata of a model or a memory bank")
    info.add_argument("path", type=Path, help="an ONNX model from edge-export or a bank directory")
    info.set_defaults(handler=run_info)

    synth = commands.add_parser("synth", help="write a synthetic DCASE-layout dataset (and a demo recording)")
    add_synth_arguments(synth)
    synth.set_defaults(handler=run_synth)

    enroll = commands.add_parser("enroll", help="build a memory bank from normal recordings")
    _model_arguments(enroll)
    enroll.add_argument("--bank", type=Path, required=True, help="bank directory to write (replaced atomically)")
    enroll.add_argument("--train", type=Path, action="extend", nargs="+", default=[],
                        help="DCASE train directory: the domain of each clip comes from its file name")
    enroll.add_argument("--source", type=Path, action="extend", nargs="+", default=[],
                        help="normal recordings (files or directories) of the source domain")
    enroll.add_argument("--target", type=Path, action="extend", nargs="+", default=[],
                        help="a handful of normal recordings of the target (new) condition")
    enroll.add_argument("--hop", type=float, default=None,
                        help="cut every file into windows with this hop in seconds "
                             "(default: clips up to 2 windows give one window, longer recordings are cut)")
    _scoring_arguments(enroll)
    enroll.add_argument("--memmixup", action="store_true", help="augment the target bank with MemMixup")
    enroll.add_argument("--mixup-lambda", type=float, default=0.9)
    enroll.add_argument("--mixup-k", type=int, default=5)
    enroll.add_argument("--threshold-method", choices=("gamma", "percentile"), default="gamma")
    enroll.add_argument("--quantile", type=float, default=0.99,
                        help="threshold quantile of the normal leave-one-out scores (default: %(default)s)")
    enroll.set_defaults(handler=run_enroll)

    score = commands.add_parser("score", help="score recordings against a memory bank (JSON lines)")
    _model_arguments(score)
    score.add_argument("--bank", type=Path, required=True)
    score.add_argument("inputs", type=Path, nargs="+", help="WAV files or directories")
    score.add_argument("--hop", type=float, default=None, help="window hop in seconds for long recordings")
    score.add_argument("--threshold", type=float, default=None, help="override the bank's calibrated threshold")
    _scoring_arguments(score, stored_default=True)
    score.set_defaults(handler=run_score)

    evaluate = commands.add_parser("evaluate", help="DCASE evaluation: AUC source/target, pAUC, official score")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, action="append",
                        help="ONNX encoder written by edge-export; repeat for an ensemble (mean of the models' "
                             "normalized scores, one ensemble bank)")
    parser.add_argument("--providers", default="auto",
                        help="comma-separated execution providers: auto, tensorrt, cuda, cpu (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per encoder call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _scoring_arguments(parser: argparse.ArgumentParser, stored_default: bool = False) -> None:
    default_note = "the bank's" if stored_default else "%(default)s"
    parser.add_argument("--normalization", choices=NORMALIZERS, default=None if stored_default else "ld-domain",
                        help=f"score normalizer (default: {default_note})")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layers (default: the model's default layers)")
    parser.add_argument("--k-n", type=int, default=None, help="kNN: mean distance to the K_n nearest refs")


def _models(args: argparse.Namespace) -> ModelSet:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    return ModelSet([Encoder(path, providers=providers, intra_op_threads=args.threads) for path in args.model])


def _scoring_config(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> ScoringConfig:
    values: dict[str, Any] = dict(stored or {})
    if args.normalization is not None:
        values["normalizer"] = args.normalization
    if args.layers:
        values["layers"] = [x.strip() for x in args.layers.split(",") if x.strip()]
    if args.k_n is not None:
        values["k_n"] = args.k_n
    return ScoringConfig.from_dict(values)


def _embed(encoder: Encoder, windows: list[Window], args: argparse.Namespace, label: str) -> dict[str, Any]:
    progress = Progress(len(windows), label, enabled=not args.no_progress)
    try:
        return embed_windows(encoder, [w.samples for w in windows], args.batch_size, on_batch=progress.update)
    finally:
        progress.close()


def run_info(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir() and is_ensemble_bank(path):
        summary = describe_ensemble(path)
    elif path.is_dir():
        bank = MemoryBank.load(path)
        summary = {
            "bank": str(path), "model": bank.info.as_dict(), "model_sha256": bank.model_sha256,
            "layers": list(bank.layers), "counts": {d: bank.count(d) for d in ("source", "target")},
            "threshold": bank.threshold, "created_at": bank.created_at, "content_hash": bank.content_hash(),
            "scoring": (bank.scorer_state or {}).get("config"),
        }
    else:
        encoder = Encoder(path, providers=["cpu"])
        summary = {"model": str(path), "model_id": encoder.model_id, **encoder.info.as_dict(),
                   "extra": encoder.info.extra}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _training_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    by_domain: dict[str, list[Path]] = {"source": [], "target": []}
    for directory in args.train:
        for path in audio_files([directory]):
            clip = parse_clip_name(path, machine=directory.parent.name, split="train")
            by_domain[clip.require_domain()].append(path)
    by_domain["source"] += audio_files(args.source)
    by_domain["target"] += audio_files(args.target)
    if not by_domain["source"]:
        raise EdgeAsdError("enroll needs normal source-domain recordings (--train DIR or --source PATH)")
    return by_domain


def _aligned_windows(paths: list[Path], models: ModelSet, hop: float | None) -> list[list[Window]]:
    """Per model, the windows of `paths` at its rate; every model must cut the same windows."""
    per_model = [[w for path in paths for w in file_windows(path, encoder, hop)] for encoder in models.encoders]
    first = [w.name for w in per_model[0]]
    for encoder, windows in zip(models.encoders[1:], per_model[1:], strict=True):
        if [w.name for w in windows] != first:
            a, b = models.encoders[0].info, encoder.info
            raise EdgeAsdError(f"{models.encoders[0].path.name} ({a.window_samples / a.sample_rate:g} s windows) "
                               f"and {encoder.path.name} ({b.window_samples / b.sample_rate:g} s windows) cut "
                               "different windows; an ensemble needs models with the same window length")
    return per_model


def run_enroll(args: argparse.Namespace) -> int:
    models = _models(args)
    cfg = _scoring_config(args)
    files = _training_files(args)
    windows = {domain: _aligned_windows(paths, models, args.hop) for domain, paths in files.items() if paths}
    names = {domain: [w.name for w in per_model[0]] for domain, per_model in windows.items()}
    embeddings = [
        {domain: _embed(encoder, per_model[m], args, f"embed {domain}" + (f" {encoder.info.variant}"
                                                                          if models.is_ensemble else ""))
         for domain, per_model in windows.items()}
        for m, encoder in enumerate(models.encoders)
    ]
    mixup = MixupSpec(args.mixup_lambda, args.mixup_k) if args.memmixup else None
    summary: dict[str, Any] = {"bank": str(args.bank), "model": models.model_id, "normalizer": cfg.normalizer}
    if models.is_ensemble:
        ensemble = enroll_ensemble(args.bank, models.members, embeddings, names, cfg, mixup=mixup,
                                   threshold_method=args.threshold_method, threshold_quantile=args.quantile)
        bank: MemoryBank | EnsembleBank = ensemble.bank
        threshold = ensemble.threshold
        summary["layers"] = {m.model_id: list(s.layers) for m, s in zip(models.members, ensemble.scorer.scorers,
                                                                         strict=True)}
        summary["members"] = [m.model_id for m in models.members]
    else:
        encoder = models.encoders[0]
        enrolled = enroll_bank(args.bank, encoder.info, embeddings[0], names, cfg, encoder.model_sha256,
                               mixup=mixup, threshold_method=args.threshold_method,
                               threshold_quantile=args.quantile)
        bank, threshold = enrolled.bank, enrolled.threshold
        summary["layers"] = list(enrolled.scorer.layers)
    summary.update({"source_refs": bank.count("source"), "target_refs": bank.count("target"),
                    "threshold": threshold["value"], "threshold_method": threshold["method"],
                    "content_hash": bank.content_hash()})
    print(json.dumps(summary, sort_keys=True))
    return 0


def run_score(args: argparse.Namespace) -> int:
    models = _models(args)
    bank = load_bank_for(args.bank, models.members)
    if isinstance(bank, EnsembleBank):
        stored = bank.scoring
        cfg = _scoring_config(args, stored)
        scorer: Scorer | EnsembleScorer = EnsembleScorer([Scorer.fit(b, cfg) for b in bank.banks])
    else:
        stored = (bank.scorer_state or {}).get("config")
        cfg = _scoring_config(args, stored)
        scorer = Scorer.fit(bank, cfg)
    threshold = args.threshold
    if threshold is None:
        if bank.threshold is None or cfg.to_dict() != stored:
            log.info("calibrating the threshold for this scoring config")
            threshold = float(calibrate(scorer.loo_scores())["value"])
        else:
            threshold = float(bank.threshold["value"])
    files = audio_files(args.inputs)
    for path in files:
        per_model = _aligned_windows([path], models, args.hop)
        embeddings = [embed_windows(encoder, [w.samples for w in windows], args.batch_size)
                      for encoder, windows in zip(models.encoders, per_model, strict=True)]
        scores = scorer.score(embeddings) if isinstance(scorer, EnsembleScorer) else scorer.score(embeddings[0])
        for window, value in zip(per_model[0], scores, strict=True):
            print(json.dumps({"file": str(path), "start_s": window.start_s, "score": round(float(value), 6),
                              "threshold": round(threshold, 6), "anomalous": bool(value > threshold)}),
                  flush=True)
    return 0
