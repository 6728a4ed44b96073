"""Our BEATs ONNX export against the official BEATs code in PyTorch eager, side by side in one run, one thread.

    .venv/bin/python bench/official_beats.py --official DIR [--stand-ins bench/official_stand_ins] [--repeats 5]
        [--json-dir bench/results]

DIR is the beats/ folder of a checkout of github.com/microsoft/unilm (BEATs.py, backbone.py, modules.py); it
imports torchaudio.compliance.kaldi.fbank, for which `--stand-ins bench/official_stand_ins` has a stand-in where
torchaudio is not installed (this repository's Kaldi fbank: the official front-end's formulation, not its code;
1 % of BEATs's time). Nothing of the official code is in this repository. Both sides get the same random
weights: our `write_random_checkpoint` writes the official {cfg, model} layout.

Rows (median of `--repeats` interleaved calls, batch 1, 10 s at 16 kHz): the official `extract_features` (fbank,
patch embedding, the 12-layer encoder) in torch eager, one thread; ours, ONNX Runtime CPU, one thread, every
default-exported layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import numpy as np


def _official(directory: Path, checkpoint: Path) -> Any:
    import torch

    sys.path.insert(0, str(directory.resolve()))
    from BEATs import BEATs, BEATsConfig  # the official code

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = BEATs(BEATsConfig(state["cfg"]))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="the beats/ folder of microsoft/unilm")
    parser.add_argument("--stand-ins", type=Path, default=None, help="torchaudio stand-ins (module docstring)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.stand_ins is not None:
        sys.path.insert(0, str(args.stand_ins.resolve()))
    import torch

    from export import beats
    from export.onnx_export import export_model

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("beats",):
            out = Path(tmp) / variant
            checkpoint = out / "official-layout.pt"
            out.mkdir(parents=True)
            beats.write_random_checkpoint(checkpoint, variant, seed=0)
            official = _official(args.official, checkpoint)
            ours = benchlib.ort_session(export_model(variant, out / "export", checkpoint=checkpoint).path)
            audio = (np.random.default_rng(3).standard_normal((1, 160000)) * 0.1).astype(np.float32)
            x = torch.from_numpy(audio)

            def run_official(model: Any = official, wave: Any = x) -> object:
                with torch.inference_mode():
                    return model.extract_features(wave)

            calls = {"official (torch eager)": run_official,
                     "ours (ONNX Runtime)": lambda s=ours, a=audio: s.run(None, {"waveform": a})}
            results[variant] = benchlib.interleaved_ms(calls, args.repeats)
            print(f"done {variant}", flush=True)
    benchlib.print_against_official("BEATs", results, args.repeats)
    benchlib.write_json("official_beats", {"machine": info, "repeats": args.repeats, "ms": results}, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
