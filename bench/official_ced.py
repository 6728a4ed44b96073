"""Our CED ONNX export against the official CED code in PyTorch eager, side by side in one run, one thread.

    .venv/bin/python bench/official_ced.py --official DIR [--libs DIR] [--stand-ins bench/official_stand_ins]
        [--variants ced-tiny] [--repeats 20] [--json-dir bench/results]

DIR is a checkout of github.com/RicherMans/CED (its models/ package); it imports einops and loguru (`pip install
--target LIBS einops loguru`, then `--libs LIBS`) and torchaudio's MelSpectrogram and AmplitudeToDB, for which
`--stand-ins bench/official_stand_ins` has stand-ins where torchaudio is not installed (torch.stft with
torchaudio's defaults: the official front-end's formulation, not its code). Nothing of the official code is in
this repository. Both sides get the same random weights: our `write_random_checkpoint` writes the official key
layout, which the official model loads with `load_state_dict(strict=True)`.

Rows (median of `--repeats` interleaved calls, batch 1, 10 s at 16 kHz): the official model (front-end +
transformer + head) in torch eager, one thread; ours with the split-DFT front-end (the default) and with the
MatMul DFT of earlier releases, ONNX Runtime CPU, one thread, every default-exported layer.
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

OFFICIAL_NAMES = {"ced-tiny": "ced_tiny", "ced-mini": "ced_mini", "ced-small": "ced_small", "ced-base": "ced_base"}


def _official(directory: Path, variant: str, checkpoint: Path) -> Any:
    import torch

    sys.path.insert(0, str(directory.resolve()))
    from models import audiotransformer  # the official code

    model = getattr(audiotransformer, OFFICIAL_NAMES[variant])(pretrained=False)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state), strict=True)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of RicherMans/CED")
    parser.add_argument("--libs", type=Path, default=None, help="a directory with einops and loguru")
    parser.add_argument("--stand-ins", type=Path, default=None, help="torchaudio stand-ins (module docstring)")
    parser.add_argument("--variants", default="ced-tiny")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    for extra in (args.libs, args.stand_ins):
        if extra is not None:
            sys.path.insert(0, str(extra.resolve()))
    import torch

    from export import ced
    from export.onnx_export import export_model

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            out = Path(tmp) / variant
            checkpoint = out / "official-layout.pt"
            out.mkdir(parents=True)
            ced.write_random_checkpoint(checkpoint, variant, seed=0)
            official = _official(args.official, variant, checkpoint)
            ours = {stft: benchlib.ort_session(export_model(variant, out / stft, checkpoint=checkpoint, stft=stft).path)
                    for stft in ced.STFT_METHODS}
            audio = (np.random.default_rng(3).standard_normal((1, 160000)) * 0.1).astype(np.float32)
            x = torch.from_numpy(audio)

            def run_official(model: Any = official, wave: Any = x) -> object:
                with torch.inference_mode():
                    return model(wave)

            calls = {"official (torch eager)": run_official,
                     **{f"ours {stft} (ONNX Runtime)": (lambda s=session, a=audio: s.run(None, {"waveform": a}))
                        for stft, session in ours.items()}}
            results[variant] = benchlib.interleaved_ms(calls, args.repeats)
            print(f"done {variant}", flush=True)
    benchlib.print_against_official("CED", results, args.repeats)
    benchlib.write_json("official_ced", {"machine": info, "repeats": args.repeats, "ms": results}, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
