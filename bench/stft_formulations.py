"""Before/after of the split-DFT front-ends (issue 13): each encoder exported with every STFT formulation its family
offers, timed in ONNX Runtime on one thread, interleaved call by call in one run.

    .venv/bin/python bench/stft_formulations.py [--encoders mn04,ced-tiny] [--repeats 30] [--json-dir bench/results]

For each encoder: the whole model per 10 s window (the default export: every default-exported layer) and the
front-end alone, for the split DFT (`fft`, the default) and the direct DFT of earlier releases (`conv` for
EfficientAT, `matmul` for CED); the ratio is direct / split (times faster). mn04 uses the real checkpoint, CED
random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import benchlib
import numpy as np


def _front_end(model: Any, out: Path) -> Path:
    """The model's front-end module alone, exported to ONNX."""
    import torch

    path = out / "frontend.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.frontend.eval(), (torch.zeros(1, model.window_samples),), str(path),
                          input_names=["waveform"], output_names=["features"], opset_version=17, dynamo=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="mn04,ced-tiny")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    from export.onnx_export import export_model
    from export.registry import family_for

    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.encoders.split(","):
            family = family_for(name)
            methods = family.STFT_METHODS
            checkpoint = benchlib.MN04_CHECKPOINT if name == "mn04" else None
            calls = {}
            samples = 0
            for method in methods:
                out = Path(tmp) / name / method
                result = export_model(name, out, checkpoint=checkpoint, random_init=checkpoint is None, stft=method)
                model = family.build(name, family.default_exported_layers(name), "time-mean",
                                     checkpoint if checkpoint is not None else out / next(
                                         p.name for p in out.iterdir() if p.suffix in (".pt", ".safetensors")),
                                     0, stft=method)
                samples = model.window_samples
                calls[f"{method} model"] = benchlib.ort_session(result.path)
                calls[f"{method} front-end"] = benchlib.ort_session(_front_end(model, out))
            audio = (np.random.default_rng(3).standard_normal((1, samples)) * 0.1).astype(np.float32)
            runs = {key: (lambda s=session, a=audio: s.run(None, {"waveform": a})) for key, session in calls.items()}
            results[name] = {key: {"median_ms": ms} for key, ms in benchlib.interleaved_ms(runs, args.repeats).items()}
            print(f"done {name}", flush=True)
    print(f"\n### Whole model and front-end per 10 s window, batch 1, one thread, median of {args.repeats} "
          "interleaved calls\n")
    rows = []
    for name, r in results.items():
        split, direct = next(iter(family_for(name).STFT_METHODS)), family_for(name).STFT_METHODS[1]
        for part in ("model", "front-end"):
            after, before = r[f"{split} {part}"]["median_ms"], r[f"{direct} {part}"]["median_ms"]
            rows.append([name, part, f"{before:.2f} ({direct})", f"{after:.2f} ({split})", f"{before / after:.2f}x"])
    print(benchlib.table(["encoder", "what", "before ms (direct DFT)", "after ms (split DFT)", "speed-up"], rows))
    benchlib.write_json("stft_formulations", {"machine": info, "repeats": args.repeats, "results": results},
                        args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
