"""Offline `evaluate` throughput: clips/s by batch size, and cost growth with dataset size.

    .venv/bin/python bench/evaluate_throughput.py [--model mn04] [--sizes 50,200,800]
                                                 [--batches 1,8,32] [--json-dir bench/results]

Datasets come from edge_agent.evaluation.synthetic (the generator behind `edge-agent synth`; three machine
types, 16 kHz 10 s clips) in a temporary directory. Two phases are timed separately, the same calls
`edge-agent evaluate` makes: embed (read WAV, resample, ONNX encoder, batch of clips per call) and
score (fit banks + normalizer per section, score test clips, DCASE metrics). Batch sizes are
compared on the middle dataset; growth with size uses the evaluate default batch 8.
The ONNX session uses all cores (what `evaluate` does).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
from threadpoolctl import threadpool_limits

from edge_agent.evaluation.dcase import scan_dataset
from edge_agent.evaluation.evaluate import embed_dataset, score_embeddings
from edge_agent.evaluation.synthetic import synthesize_dataset
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.config import ScoringConfig

MACHINES = ("fan", "pump", "gearbox")


def split_for(total: int) -> tuple[int, int, int]:
    """(train source, train target, test per (domain, label)) per machine giving ~total clips."""
    per_machine = total / len(MACHINES)
    n_test = max(1, round(per_machine * 0.18))
    n_target = max(2, round(per_machine * 0.04))
    n_source = max(2, round(per_machine - n_target - 4 * n_test))
    return n_source, n_target, n_test


def run_once(model: Path, root: Path, batch: int) -> dict[str, float]:
    dataset = scan_dataset(root)
    n = len(dataset.all_clips())
    t0 = time.perf_counter()
    emb = embed_dataset([model], dataset, batch_size=batch, progress=False, layers="default")
    t1 = time.perf_counter()
    result = score_embeddings(emb, ScoringConfig())
    t2 = time.perf_counter()
    return {"clips": n, "embed_s": t1 - t0, "score_s": t2 - t1, "clips_per_s": n / (t2 - t0),
            "embed_ms_per_clip": 1e3 * (t1 - t0) / n, "score_ms_per_clip": 1e3 * (t2 - t1) / n,
            "official": float(result.summary.official) if hasattr(result, "summary") else float("nan")}


def encoder_alone(model: Path, batches: list[int], repeats: int) -> dict[int, float]:
    """ms per clip of the ONNX encoder alone (random windows, all cores) at each batch size."""
    enc = Encoder(model)
    out = {}
    for batch in batches:
        windows = np.random.default_rng(0).standard_normal((batch, enc.info.window_samples)).astype(np.float32) * 0.1
        out[batch] = float(np.median(benchlib.timings(lambda w=windows: enc.embed(w), repeats)) * 1e3 / batch)
    return out


def best_of(model: Path, root: Path, batch: int, repeats: int) -> dict[str, float]:
    runs = [run_once(model, root, batch) for _ in range(repeats)]
    return min(runs, key=lambda r: r["embed_s"] + r["score_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mn04", help="encoder NAME (exported into models/bench/fp32)")
    parser.add_argument("--sizes", default="50,200,800")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--json-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs per point (the fastest is reported)")
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy/OpenBLAS threads; 1 is what the "
                        "edge-agent CLI sets (OPENBLAS_NUM_THREADS), more shows the oversubscription")
    args = parser.parse_args()
    with threadpool_limits(args.blas_threads):
        run_study(args)


def run_study(args: argparse.Namespace) -> None:
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    model = benchlib.model_path(args.model)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    results: dict[str, Any] = {"machine": info, "model": args.model, "blas_threads": args.blas_threads,
                               "by_batch": {}, "by_size": {}}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for size in sizes:
            root = Path(tmp) / f"set{size}"
            n_source, n_target, n_test = split_for(size)
            synthesize_dataset(root, MACHINES, n_train_source=n_source, n_train_target=n_target,
                               n_test_per_class=n_test, seed=0)
            roots[size] = root
        middle = sizes[len(sizes) // 2]
        results["encoder_ms_per_clip"] = encoder_alone(model, batches, max(5, args.repeats * 3))
        for batch in batches:
            results["by_batch"][batch] = best_of(model, roots[middle], batch, args.repeats)
            print(f"done batch {batch}: {results['by_batch'][batch]}", flush=True)
        for size in sizes:
            results["by_size"][size] = (results["by_batch"][8] if size == middle and 8 in batches
                                        else best_of(model, roots[size], 8, args.repeats))
            print(f"done size {size}: {results['by_size'][size]}", flush=True)

    print(f"\n### evaluate throughput, {args.model}, {middle}-clip set, by batch size, "
          f"{args.blas_threads} BLAS thread(s)\n")
    print(benchlib.table(["batch", "clips", "embed ms/clip", "of which encoder alone", "score ms/clip", "clips/s"],
                         [[b, r["clips"], r["embed_ms_per_clip"], results["encoder_ms_per_clip"][b],
                           r["score_ms_per_clip"], r["clips_per_s"]] for b, r in results["by_batch"].items()]))
    print(f"\n### evaluate cost by dataset size, {args.model}, batch 8\n")
    print(benchlib.table(["clips", "embed s", "score s", "embed ms/clip", "score ms/clip", "clips/s"],
                         [[r["clips"], r["embed_s"], r["score_s"], r["embed_ms_per_clip"], r["score_ms_per_clip"],
                           r["clips_per_s"]] for r in results["by_size"].values()]))
    benchlib.write_json(f"evaluate_throughput_{args.model}_blas{args.blas_threads}", results, args.json_dir)


if __name__ == "__main__":
    main()
