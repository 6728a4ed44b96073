"""Layer and normalizer study: the official DCASE score per layer (set) and normalizer.

Layers are chosen on a development set and only then reported on a held-out set, so the choice never
sees the labels it is judged on:

    .venv/bin/python bench/layer_study.py --model models/mn04.onnx --dev DEV_ROOT [--test TEST_ROOT]

Embeddings are computed once per dataset; every (layers, normalizer) pair re-scores them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.evaluation.evaluate import embed_dataset, score_embeddings
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.config import NORMALIZERS, ScoringConfig


def study(model: Path, dataset: Path, layer_sets: list[tuple[str, ...]], normalizers: list[str]) -> dict:
    embeddings = embed_dataset([model], dataset, progress=sys.stderr.isatty())
    table: dict[tuple[tuple[str, ...], str], float] = {}
    for layers in layer_sets:
        for normalizer in normalizers:
            result = score_embeddings(embeddings, ScoringConfig(normalizer=normalizer, layers=layers))
            table[(layers, normalizer)] = result.summary.official
    return table


def _order(output: str) -> tuple[int, str]:
    """`layer_12@gem` -> (12, "gem"): blocks in order, each block's poolings together."""
    base, _, pooling = output.partition("@")
    number = base.split("_")[-1]
    return (int(number) if number.isdigit() else 99, pooling)


def markdown(table: dict, normalizers: list[str], title: str) -> str:
    rows = sorted({layers for layers, _ in table}, key=lambda ls: [_order(x) for x in ls])
    lines = [f"### {title}", "", "| layers | " + " | ".join(normalizers) + " |",
             "|---|" + "---|" * len(normalizers)]
    for layers in rows:
        cells = " | ".join(f"{table[(layers, n)]:.3f}" for n in normalizers)
        lines.append(f"| {'+'.join(layers)} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True, help="development set (DCASE layout): picks layers")
    parser.add_argument("--test", type=Path, default=None, help="held-out set: reports the picked layers")
    parser.add_argument("--normalizers", default=",".join(n for n in NORMALIZERS if n != "zscore-test"))
    parser.add_argument("--layers", default=None, help="comma-separated single layers to try (default: all)")
    parser.add_argument("--pairs", type=int, default=3, help="also try pairs of the best N single layers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # one fit per cell: per-fit warnings would drown the tables
    info = Encoder(args.model, providers=["cpu"]).info
    normalizers = args.normalizers.split(",")
    singles = [(layer,) for layer in (args.layers.split(",") if args.layers else info.layers)]
    dev = study(args.model, args.dev, singles, normalizers)
    print(markdown(dev, normalizers, f"{info.variant} on {args.dev} (development): single layers"), "\n")
    best = sorted(singles, key=lambda ls: -dev[(ls, "ld-domain" if "ld-domain" in normalizers else normalizers[0])])
    top = [ls[0] for ls in best[: args.pairs]]
    pairs = [tuple(sorted((a, b), key=info.layers.index)) for i, a in enumerate(top) for b in top[i + 1:]]
    candidates = [*best[: args.pairs], *pairs, info.default_layers]
    if pairs:
        dev_pairs = study(args.model, args.dev, pairs, normalizers)
        print(markdown(dev_pairs, normalizers, "development: pairs of the best single layers"), "\n")
    if args.test is not None:
        test = study(args.model, args.test, list(dict.fromkeys(candidates)), normalizers)
        print(markdown(test, normalizers, f"held-out {args.test}: candidates picked on development"), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
