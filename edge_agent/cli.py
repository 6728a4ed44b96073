"""edge-agent: enroll memory banks, score recordings, evaluate on DCASE data, run the monitoring agent."""

from __future__ import annotations

import os

# Before numpy loads: ONNX Runtime's thread pool owns the cores. numpy's OpenBLAS threads (resampling,
# exact kNN) spinning beside it made every window ~2.4x slower on 2 cores (docs/benchmarks.md,
# "thread oversubscription"). An explicit OPENBLAS_NUM_THREADS in the environment still wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.agent import daemon
from edge_agent.agent.config import load_config
from edge_agent.agent.labels_export import export_labels
from edge_agent.audio.windowing import Window
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.evaluation.dcase import parse_clip_name
from edge_agent.evaluation.evaluate import evaluate_dataset
from edge_agent.evaluation.progress import Progress
from edge_agent.evaluation.report import markdown, write_report
from edge_agent.evaluation.synthetic import MACHINE_TYPES, synthesize_dataset, write_demo_recording
from edge_agent.fleet import cli as fleet_cli
from edge_agent.logs import get_logger, setup_logging
from edge_agent.model.embedding import audio_files, embed_windows, file_windows
from edge_agent.model.encoder import Encoder
from edge_agent.model.model_set import ModelSet
from edge_agent.scoring.bank import DOMAINS, MixupSpec
from edge_agent.scoring.bank_set import describe_banks, load_banks
from edge_agent.scoring.calibration import DEFAULT_QUANTILE, calibrate
from edge_agent.scoring.config import FEATURE_STATS, FUSIONS, LD_REDUCES, NORMALIZERS, ScoringConfig
from edge_agent.scoring.enrollment import enroll
from edge_agent.scoring.knn import METRICS
from edge_agent.scoring.scorer import Scorer

log = get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # the agent sets up logging from its config
        setup_logging("debug" if args.verbose else "info", "kv")
    try:
        return int(args.handler(args) or 0)
    except EdgeAsdError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-asd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="show the metadata of a model or a memory bank")
    info.add_argument("path", type=Path, help="an ONNX model from edge-export or a bank directory")
    info.set_defaults(handler=run_info)

    synth = commands.add_parser("synth", help="write a synthetic DCASE-layout dataset (and a demo recording)")
    add_synth_arguments(synth)
    synth.set_defaults(handler=run_synth)

    enroll_cmd = commands.add_parser("enroll", help="build a memory bank from normal recordings")
    _model_arguments(enroll_cmd)
    enroll_cmd.add_argument("--bank", type=Path, required=True, help="bank directory to write (replaced atomically)")
    enroll_cmd.add_argument("--train", type=Path, action="extend", nargs="+", default=[],
                            help="DCASE train directory: the domain of each clip comes from its file name")
    enroll_cmd.add_argument("--source", type=Path, action="extend", nargs="+", default=[],
                            help="normal recordings (files or directories) of the source domain")
    enroll_cmd.add_argument("--target", type=Path, action="extend", nargs="+", default=[],
                            help="a handful of normal recordings of the target (new) condition")
    enroll_cmd.add_argument("--hop", type=float, default=None,
                            help="cut every file into windows with this hop in seconds "
                                 "(default: clips up to 2 windows give one window, longer recordings are cut)")
    _scoring_arguments(enroll_cmd)
    enroll_cmd.add_argument("--memmixup", action="store_true", help="augment the target bank with MemMixup")
    enroll_cmd.add_argument("--mixup-lambda", type=float, default=0.9)
    enroll_cmd.add_argument("--mixup-k", type=int, default=5)
    enroll_cmd.add_argument("--threshold-method", choices=("gamma", "percentile"), default="gamma")
    enroll_cmd.add_argument("--quantile", type=float, default=0.99,
                            help="threshold quantile of the normal leave-one-out scores (default: %(default)s)")
    enroll_cmd.set_defaults(handler=run_enroll)

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

    run = commands.add_parser("run", help="run the monitoring agent (edge-agent run --config FILE)")
    run.add_argument("--config", type=Path, default=None,
                     help="agent YAML config (default: the embedded demo config: file source, no MQTT)")
    run.add_argument("--check", action="store_true", help="validate the config, build the pipeline, exit")
    run.set_defaults(handler=lambda args: daemon.run(args.config, check=args.check))

    labels = commands.add_parser("labels", help="the alerts operators labelled (feedback), as a dataset")
    labels_commands = labels.add_subparsers(dest="labels_command", required=True, metavar="LABELS_COMMAND")
    export = labels_commands.add_parser("export", help="write the labelled clips (and kept learning audio) as a "
                                        "DCASE-layout dataset for `edge-agent evaluate`")
    export.add_argument("out", type=Path, metavar="DIR", help="the dataset root to write")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the agent's config file (its state_dir is read)")
    where.add_argument("--state-dir", type=Path, help="the agent's state directory")
    export.set_defaults(handler=run_labels_export)

    fleet_cli.add_parser(commands)  # edge-agent fleet ...: dispatched to edge_agent.fleet.cli.run
    return parser


# --- shared options ------------------------------------------------------------------------------------


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
    defaults = ScoringConfig()
    default_of = {name: "the bank's" if stored_default else getattr(defaults, name)
                  for name in ("feature_stats", "feature_stats_eps", "fusion")}
    parser.add_argument("--feature-stats", choices=FEATURE_STATS, default=None,
                        help="add each layer's feature-statistics term beside its kNN score, or off "
                             f"(default: {default_of['feature_stats']})")
    parser.add_argument("--feature-stats-eps", type=float, default=None, metavar="EPS",
                        help="the statistics term's std floor, as a share of the layer's typical within-domain std "
                             f"(default: {default_of['feature_stats_eps']})")
    parser.add_argument("--fusion", choices=FUSIONS, default=None,
                        help="combine the members raw (mean) or standardized by their leave-one-out training "
                             f"scores (default: {default_of['fusion']})")


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
    for name in ("feature_stats", "feature_stats_eps", "fusion"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return ScoringConfig.from_dict(values)


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


# --- info, synth ---------------------------------------------------------------------------------------


def run_labels_export(args: argparse.Namespace) -> int:
    state_dir = args.state_dir if args.state_dir is not None else load_config(args.config).state_dir
    summary = export_labels(state_dir, args.out)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def run_info(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir():
        summary = describe_banks(path)
    else:
        encoder = Encoder(path, providers=["cpu"])
        summary = {"model": str(path), "model_id": encoder.model_id, **encoder.info.as_dict(),
                   "extra": encoder.info.extra}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="dataset root to write (ROOT/<machine>/{train,test}/*.wav)")
    parser.add_argument("--machines", default=",".join(MACHINE_TYPES),
                        help=f"comma-separated machine types (default: all: {','.join(MACHINE_TYPES)})")
    parser.add_argument("--train-source", type=int, default=20, help="source-domain training clips")
    parser.add_argument("--train-target", type=int, default=3, help="target-domain training clips")
    parser.add_argument("--test-per-class", type=int, default=10,
                        help="test clips per (domain, label) pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", type=Path, default=None,
                        help="also write a long demo recording (normal, anomaly from 60 s to 90 s) here")
    parser.add_argument("--demo-seconds", type=float, default=150.0)


def run_synth(args: argparse.Namespace) -> int:
    machines = _split(args.machines) or []
    clips = synthesize_dataset(args.out, machines=machines, n_train_source=args.train_source,
                               n_train_target=args.train_target, n_test_per_class=args.test_per_class,
                               seed=args.seed)
    print(f"wrote {len(clips)} clips of {len(machines)} machine(s) under {args.out}")
    if args.demo is not None:
        span = (min(60.0, args.demo_seconds * 0.4), min(90.0, args.demo_seconds * 0.6))
        write_demo_recording(args.demo, seconds=args.demo_seconds, anomaly_span=span, seed=args.seed,
                             machine=machines[0])
        print(f"wrote demo recording {args.demo} ({args.demo_seconds:g} s, {machines[0]}, "
              f"anomaly {span[0]:g}-{span[1]:g} s)")
    return 0


# --- enroll, score -------------------------------------------------------------------------------------


def _embed(encoder: Encoder, windows: list[Window], args: argparse.Namespace, label: str) -> dict[str, Any]:
    progress = Progress(len(windows), label, enabled=not args.no_progress)
    try:
        return embed_windows(encoder, [w.samples for w in windows], args.batch_size, on_batch=progress.update)
    finally:
        progress.close()


def _training_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    by_domain: dict[str, list[Path]] = {domain: [] for domain in DOMAINS}
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
    several = len(models) > 1
    embeddings = [{domain: _embed(encoder, per_model[m], args,
                                  f"embed {domain} {encoder.info.variant}" if several else f"embed {domain}")
                   for domain, per_model in windows.items()}
                  for m, encoder in enumerate(models.encoders)]
    mixup = MixupSpec(args.mixup_lambda, args.mixup_k) if args.memmixup else None
    enrolled = enroll(args.bank, models.members, embeddings, names, cfg, mixup=mixup,
                      threshold_method=args.threshold_method, threshold_quantile=args.quantile)
    summary: dict[str, Any] = {"bank": str(args.bank), "model": models.model_id, "normalizer": cfg.normalizer}
    layers = {m.model_id: list(layers) for m, layers in zip(models.members, enrolled.scorer.layers, strict=True)}
    if several:
        summary["layers"] = layers
        summary["members"] = [m.model_id for m in models.members]
    else:
        summary["layers"] = next(iter(layers.values()))
    banks, threshold = enrolled.banks, enrolled.threshold
    summary.update({"source_refs": banks.count("source"), "target_refs": banks.count("target"),
                    "threshold": threshold["value"], "threshold_method": threshold["method"],
                    "content_hash": banks.content_hash()})
    print(json.dumps(summary, sort_keys=True))
    return 0


def run_score(args: argparse.Namespace) -> int:
    models = _models(args)
    banks = load_banks(args.bank, models.members)
    cfg = _scoring_config(args, banks.scoring)
    scorer = Scorer.fit(banks.banks, cfg)
    threshold = args.threshold
    if threshold is None:
        stored = banks.threshold or {}
        calibrated = isinstance(stored.get("value"), (int, float))
        cause = banks.threshold_mismatch(cfg, scorer.layers) if calibrated else "the bank has no threshold"
        if cause is None:
            threshold = float(stored["value"])
        else:
            threshold = float(calibrate(scorer.loo_scores(), stored.get("method", "gamma"),
                                        stored.get("quantile", DEFAULT_QUANTILE))["value"])
            log.info("threshold_recalibrated", cause=cause, threshold=round(threshold, 6))
    for path in audio_files(args.inputs):
        per_model = _aligned_windows([path], models, args.hop)
        embeddings = [embed_windows(encoder, [w.samples for w in windows], args.batch_size)
                      for encoder, windows in zip(models.encoders, per_model, strict=True)]
        for window, value in zip(per_model[0], scorer.score(embeddings), strict=True):
            print(json.dumps({"file": str(path), "start_s": window.start_time, "score": round(float(value), 6),
                              "threshold": round(threshold, 6), "anomalous": bool(value > threshold)}),
                  flush=True)
    return 0


# --- evaluate ------------------------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="models", action="append", type=Path, required=True,
                        help="ONNX encoder from edge-export; repeat for an ensemble (mean of normalized scores)")
    parser.add_argument("--dataset", type=Path, required=True,
                        help="DCASE layout root: ROOT/<machine>/{train,test}/section_XX_*.wav")
    parser.add_argument("--normalization", choices=NORMALIZERS, default=ScoringConfig.normalizer,
                        help="score normalizer (default: %(default)s)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layers to score (default: the model's default layers)")
    defaults = ScoringConfig()
    parser.add_argument("--metric", choices=METRICS, default=defaults.metric,
                        help="kNN distance (default: %(default)s)")
    parser.add_argument("--k-n", type=int, default=defaults.k_n, help="kNN: mean distance to the K_n nearest refs")
    parser.add_argument("--k-source", type=int, default=defaults.k_source, help="ld-domain: K_S")
    parser.add_argument("--k-target", type=int, default=defaults.k_target, help="ld-domain: K_T")
    parser.add_argument("--ld-k", type=int, default=defaults.ld_k, help="ld: neighbours over S U T")
    parser.add_argument("--ld-reduce", choices=LD_REDUCES, default=defaults.ld_reduce, help="ld, ld-domain: b(y)")
    parser.add_argument("--feature-stats", choices=FEATURE_STATS, default=defaults.feature_stats,
                        help="add each layer's feature-statistics term beside its kNN score (default: %(default)s)")
    parser.add_argument("--feature-stats-layers", default=None, metavar="LAYERS",
                        help="with --feature-stats add: only these comma-separated layers (default: every scored one)")
    parser.add_argument("--feature-stats-eps", type=float, default=defaults.feature_stats_eps, metavar="EPS",
                        help="with --feature-stats add: each dimension's std floor, as a share of the layer's typical "
                             f"within-domain std (default {defaults.feature_stats_eps:g})")
    parser.add_argument("--fusion", choices=FUSIONS, default=defaults.fusion,
                        help="combine the members raw (mean) or standardized by their leave-one-out training "
                             "scores (default: %(default)s)")
    parser.add_argument("--memmixup", default=None, metavar="K,LAMBDA",
                        help="MemMixup on each section's target bank, e.g. 5,0.9 (default: off)")
    parser.add_argument("--machines", default=None, help="comma-separated machine directories (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
    parser.add_argument("--report", type=Path, default=None,
                        help="write report.md, result.json, scores and PNG plots into this directory")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _memmixup(text: str | None) -> MixupSpec | None:
    if text is None:
        return None
    try:
        k_text, lam_text = text.split(",")
        spec = MixupSpec(float(lam_text), int(k_text))
    except ValueError:
        raise ConfigError("--memmixup", "must be K,LAMBDA (an integer K >= 1 and 0 < LAMBDA <= 1), e.g. 5,0.9",
                          text) from None
    if not (0.0 < spec.lam <= 1.0 and spec.k >= 1):
        raise ConfigError("--memmixup", "must be K,LAMBDA (an integer K >= 1 and 0 < LAMBDA <= 1), e.g. 5,0.9", text)
    return spec


def run_evaluate(args: argparse.Namespace) -> int:
    layers = _split(args.layers)
    cfg = ScoringConfig(normalizer=args.normalization, layers=tuple(layers) if layers else None, metric=args.metric,
                        k_n=args.k_n, k_source=args.k_source, k_target=args.k_target, ld_k=args.ld_k,
                        ld_reduce=args.ld_reduce, feature_stats=args.feature_stats, fusion=args.fusion,
                        feature_stats_eps=args.feature_stats_eps,
                        feature_stats_layers=tuple(_split(args.feature_stats_layers) or ()) or None)
    result = evaluate_dataset(args.models, args.dataset, cfg, batch_size=args.batch_size,
                              progress=not args.no_progress, machines=_split(args.machines),
                              mixup=_memmixup(args.memmixup))
    if args.report is not None:
        write_report(result, args.report)
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True, allow_nan=False), flush=True)
    else:
        print(markdown(result).split("## Scoring configuration")[0].rstrip(), flush=True)
        if args.report is not None:
            print(f"\nreport: {args.report / 'report.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
