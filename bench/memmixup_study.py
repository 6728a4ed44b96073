"""MemMixup beside each normalizer: the official score and AUC_target per machine type, with and without the mixes.

    .venv/bin/python bench/memmixup_study.py [--seeds 0,1,2,3] [--grid] [--json-dir bench/results]

Synthetic sets of all four machine types (30 source + 10 target training clips, 10 test clips per class, as the
quality study), the real mn04 (every block exported), each set embedded once. Blocks 11+12 with the kNN scores
alone (no statistics term, raw mean: what the normalizers do) under each normalizer, then the scoring defaults;
each without MemMixup and with it (lam 0.9, k 5, the agent's `enroll.memmixup` settings) on every section's
target bank. `--grid`: the scoring defaults only, with MemMixup at k in 1, 5, 15, 30 (30: every source ref of a
section, as the GenRep code's best setting mixes with all) and lam in 0.9, 0.8, 0.7
(memmixup_grid.json).
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

from edge_agent.evaluation.dcase import scan_dataset
from edge_agent.evaluation.dcase_metrics import summarize
from edge_agent.evaluation.evaluate import DatasetEmbeddings, embed_dataset, score_embeddings
from edge_agent.evaluation.synthetic import MACHINE_TYPES, synthesize_dataset
from edge_agent.scoring.bank import MixupSpec
from edge_agent.scoring.config import ScoringConfig

BLOCKS = ("layer_11", "layer_12")
NORMALIZERS = ("none", "ld", "ld-domain", "zscore-domain")
MIXUP = MixupSpec(lam=0.9, k=5)


def configs() -> dict[str, ScoringConfig]:
    out = {f"11+12 kNN, {n}": ScoringConfig(normalizer=n, layers=BLOCKS, feature_stats="off", fusion="mean")
           for n in NORMALIZERS}
    out["the defaults (6+11+12, statistics term, standardized), ld-domain"] = ScoringConfig(
        layers=("layer_6", *BLOCKS))
    return out


GRID = tuple(MixupSpec(lam, k) for k in (1, 5, 15, 30) for lam in (0.9, 0.8, 0.7))


def runs(grid: bool) -> list[tuple[str, ScoringConfig, MixupSpec | None]]:
    if grid:
        return [(f"the defaults, MemMixup {f'k {m.k} lam {m.lam:g}' if m else 'off'}", ScoringConfig(
            layers=("layer_6", *BLOCKS)), m) for m in (None, *GRID)]
    return [(f"{name}, MemMixup {'on' if mixup else 'off'}", cfg, mixup)
            for name, cfg in configs().items() for mixup in (None, MIXUP)]


def score(embeddings: DatasetEmbeddings, grid: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{config + mixup: {machine: {official, auc_target}}}"""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for key, cfg, mixup in runs(grid):
        result = score_embeddings(embeddings, cfg, mixup)
        table[key] = {}
        for machine in result.machine_names():
            summary = summarize([s.metrics for s in result.machine_sections(machine)])
            table[key][machine] = {"official": summary.official, "auc_target": summary.auc_target}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--grid", action="store_true", help="the defaults at several MemMixup k and lam")
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    from export.onnx_export import export_model  # torch only here

    models_dir = benchlib.MODELS_DIR / "memmixup"
    model = models_dir / "mn04.onnx"
    if not model.is_file():
        export_model("mn04", models_dir, checkpoint=benchlib.MN04_CHECKPOINT, layers=["layer_6", *BLOCKS])
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for seed in seeds:
            root = Path(tmp_name) / f"synthetic-{seed}"
            synthesize_dataset(root, machines=list(MACHINE_TYPES), n_train_source=30, n_train_target=10,
                               n_test_per_class=10, seed=seed)
            per_seed.append(score(embed_dataset([model], scan_dataset(root), progress=sys.stderr.isatty()), args.grid))
    machines = list(MACHINE_TYPES)
    table = {key: {m: {v: float(np.mean([t[key][m][v] for t in per_seed])) for v in ("official", "auc_target")}
                   for m in machines} for key in per_seed[0]}
    print(f"### official score (AUC_target) per machine type, mean of seeds {args.seeds}\n")
    rows = [[key, *(f"{table[key][m]['official']:.3f} ({table[key][m]['auc_target']:.2f})" for m in machines),
             f"{np.mean([table[key][m]['official'] for m in machines]):.3f}"] for key in table]
    print(benchlib.table(["configuration", *machines, "mean official"], rows))
    raw: dict[str, Any] = {"machine": info, "seeds": seeds, "mixup": MIXUP.as_dict(), "table": table}
    benchlib.write_json("memmixup_grid" if args.grid else "memmixup_study", raw, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
