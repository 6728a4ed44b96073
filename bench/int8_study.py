"""int8 for the CNN: mn04 fp32 vs dynamic int8 vs static QDQ int8 (front-end fp32, or quantized too), side by side.

    .venv/bin/python bench/int8_study.py [--json-dir bench/results] [--seeds 0,1] [--repeats 20]

Each variant is exported from the real mn04 weights with the default layers (layer_11, layer_12). Reported per
variant: CPU latency per 10 s window (batch 1, one intra-op thread, median), the largest relative output error
against the fp32 ONNX model on verification audio, and the official DCASE score (harmonic mean of AUC_source,
AUC_target and pAUC) per machine type on synthetic DCASE-layout sets (one per seed, averaged), with the default
ScoringConfig. The static variants are calibrated on synthetic normal clips drawn with a seed of their own,
never the scored sets'. A precision may become a default only where the mean official score moves by less than
MAX_SCORE_CHANGE (0.005) and it is faster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import onnxruntime as ort

from edge_agent.evaluation.dcase_metrics import summarize
from edge_agent.evaluation.evaluate import evaluate_dataset
from edge_agent.evaluation.synthetic import synthesize_dataset
from edge_agent.model_info import INPUT_NAME
from edge_agent.scoring.config import ScoringConfig

MACHINES = ("fan", "pump", "gearbox", "valve")
VARIANTS = ("fp32", "int8 (dynamic)", "int8-static (front-end fp32)", "int8-static (all)")
MAX_SCORE_CHANGE = 0.005


def export_variants(out_dir: Path) -> dict[str, Path]:
    from export.onnx_export import export_model, read_model_info  # torch only here
    from export.static_quant import calibration_windows, quantize_static_qdq

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for variant, quantize in (("fp32", None), ("int8 (dynamic)", "int8"), ("int8-static (front-end fp32)",
                                                                            "int8-static")):
        sub = out_dir / (quantize or "fp32")
        result = export_model("mn04", sub, checkpoint=benchlib.MN04_CHECKPOINT, quantize=quantize,
                              layers=["layer_11", "layer_12"])
        paths[variant] = result.path
    # the same calibration with nothing excluded: the log-mel front-end quantized as well
    fp32 = paths["fp32"]
    info = read_model_info(fp32)
    windows = calibration_windows(info.window_samples, info.sample_rate)
    all_path = out_dir / "int8-static-all" / "mn04.onnx"
    all_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_static_qdq(fp32, all_path, windows, exclude=())
    paths["int8-static (all)"] = all_path
    return paths


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ms_per_window(path: Path, audio: np.ndarray, repeats: int) -> float:
    session = _session(path)
    seconds = benchlib.timings(lambda: session.run(None, {INPUT_NAME: audio[:1]}), repeats, warmup=2)
    return benchlib.stats_ms(seconds)["median_ms"]


def rel_error(path: Path, reference: Path, audio: np.ndarray) -> float:
    ref = _session(reference).run(None, {INPUT_NAME: audio})
    got = _session(path).run(None, {INPUT_NAME: audio})
    return max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)) for g, r in zip(got, ref, strict=True))


def official_scores(path: Path, root: Path) -> dict[str, float]:
    result = evaluate_dataset([path], root, ScoringConfig(), progress=False)
    scores = {m: summarize([s.metrics for s in result.machine_sections(m)]).official for m in MACHINES}
    scores["mean"] = sum(scores[m] for m in MACHINES) / len(MACHINES)
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-dir", type=Path, default=None)
    parser.add_argument("--train-source", type=int, default=30)
    parser.add_argument("--train-target", type=int, default=5)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seeds", default="0,1", help="one synthetic set per seed; the table averages them")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency (median reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = export_variants(tmp / "models")
        from export.onnx_export import verification_audio

        audio = verification_audio(2, 320_000, 0)
        ms = {v: ms_per_window(paths[v], audio, args.repeats) for v in VARIANTS}
        err = {v: rel_error(paths[v], paths["fp32"], audio) for v in VARIANTS}
        for seed in seeds:
            root = tmp / f"synthetic-{seed}"
            synthesize_dataset(root, machines=MACHINES, n_train_source=args.train_source,
                               n_train_target=args.train_target, n_test_per_class=args.test_per_class, seed=seed)
            per_seed[seed] = {v: official_scores(paths[v], root) for v in VARIANTS}
            print(f"seed {seed}: " + ", ".join(f"{v} {per_seed[seed][v]['mean']:.3f}" for v in VARIANTS),
                  file=sys.stderr, flush=True)
    keys = [*MACHINES, "mean"]
    scores = {v: {k: float(np.mean([per_seed[s][v][k] for s in seeds])) for k in keys} for v in VARIANTS}
    base = scores["fp32"]["mean"]
    rows: list[list[object]] = []
    for v in VARIANTS:
        change = scores[v]["mean"] - base
        rows.append([v, f"{ms[v]:.1f}", f"{err[v]:.3g}", *(f"{scores[v][k]:.3f}" for k in keys), f"{change:+.3f}"])
    print(f"### mn04 (layer_11+layer_12, default scoring), official score per machine type, mean of seeds "
          f"{args.seeds} ({args.train_source} source + {args.train_target} target training clips, "
          f"{args.test_per_class} test clips per class); latency: batch 1, 1 thread, median of {args.repeats}\n")
    print(benchlib.table(["variant", "ms/window", "rel err vs fp32", *keys, "Δ mean"], rows))
    eligible = [v for v in VARIANTS[1:] if abs(scores[v]["mean"] - base) < MAX_SCORE_CHANGE and ms[v] < ms["fp32"]]
    print(f"\neligible as a default (|Δ mean| < {MAX_SCORE_CHANGE} and faster than fp32): "
          f"{', '.join(eligible) or 'none'}")
    raw: dict[str, Any] = {"machine": info, "settings": vars(args) | {"json_dir": None}, "ms_per_window": ms,
                           "rel_error": err, "scores": scores,
                           "per_seed": {str(s): per_seed[s] for s in seeds}, "eligible": eligible}
    benchlib.write_json("int8_study", raw, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
