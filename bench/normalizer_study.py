"""Official score, AUC source/target and pAUC per normalizer, for a model's default layers (or --layers).

    .venv/bin/python bench/normalizer_study.py --model models/mn04.onnx --dataset ROOT [--dataset ROOT2 ...]

Embeddings are computed once per dataset and model; each normalizer re-scores them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.evaluation.evaluate import embed_dataset, score_embeddings
from edge_agent.scoring.config import NORMALIZERS, ScoringConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="repeat for an ensemble")
    parser.add_argument("--dataset", type=Path, action="append", required=True)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: the model's defaults)")
    parser.add_argument("--normalizers", default=",".join(NORMALIZERS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    layers = tuple(args.layers.split(",")) if args.layers else None
    normalizers = args.normalizers.split(",")
    print("| dataset | normalizer | layers | official | AUC source | AUC target | pAUC |")
    print("|---|---|---|---:|---:|---:|---:|")
    for dataset in args.dataset:
        embeddings = embed_dataset(args.model, dataset, progress=sys.stderr.isatty())
        for normalizer in normalizers:
            result = score_embeddings(embeddings, ScoringConfig(normalizer=normalizer, layers=layers))
            s = result.summary
            used = "+".join(result.models[0]["layers"])
            print(f"| {dataset.name} | `{normalizer}` | {used} | {s.official:.4f} | {s.auc_source:.4f} | "
                  f"{s.auc_target:.4f} | {s.pauc:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
