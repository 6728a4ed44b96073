"""Our mn04 ONNX export against the official EfficientAT mn04 in PyTorch eager, side by side in one run, one thread.

    .venv/bin/python bench/official_efficientat.py --official DIR [--repeats 30] [--json-dir bench/results]

DIR is a checkout of github.com/fschmid56/EfficientAT (its models/ and helpers/ packages); the official
code imports torchaudio (the Kaldi mel banks, at construction) and torchvision (ConvNormActivation). Where
those are not installed (the package registry's builds pin other torch versions than ours),
`--stand-ins bench/official_stand_ins` puts two minimal stand-ins on the path: the mel banks from
`export.mel_efficientat.kaldi_mel_banks` (tested against a Kaldi reference) and ConvNormActivation as the
Sequential(Conv2d, BatchNorm2d, activation) torchvision builds. Nothing of the official code is in this
repository; the checkpoint is the real mn04 AudioSet release (`../shared/models/efficientat`).

Rows, each the median of `--repeats` calls, interleaved call by call so that every ratio compares the same
moments of the same machine:
  - official: AugmentMelSTFT (eval mode) + get_model(width_mult=0.4), torch eager, 1 thread;
  - ours fft: `edge-export mn04` (the split-DFT front-end and the folded stem, the defaults; all 16 blocks and the
    embedding, the whole network as the official forward runs it), ONNX Runtime CPU, 1 thread;
  - ours fft with the official stem graph (`stem="official"`, export/stem_fold.py): what the fold alone gives;
  - ours conv: the export as it was before the FFT front-ends, the direct-DFT front-end (`--stft conv`) and the
    official stem graph;
  - the deployment export, `--layers default` (layers 6, 11, 12: the stem and blocks 1-12, what `.ci/setup`
    deploys), the same three, beside the official code run up to block 12 (`features[:13]`, what a user of the
    official code who wants those blocks would run);
  - the three front-ends alone (official torch.stft in torch; ours in ONNX Runtime).
And the embedding each computes from the same audio (official: the block-12 feature map's time mean).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import benchlib
import numpy as np


def _official(directory: Path, stand_ins: Path | None) -> tuple[Any, Any]:
    import torch

    if stand_ins is not None:
        sys.path.insert(0, str(stand_ins.resolve()))
    sys.path.insert(0, str(directory.resolve()))
    here = Path.cwd()
    os.chdir(directory)  # its helpers read metadata/class_labels_indices.csv relative to the checkout
    try:
        from models.mn.model import get_model  # the official code
        from models.preprocess import AugmentMelSTFT
    finally:
        os.chdir(here)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        front = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, freqm=0, timem=0).eval()
    net = get_model(width_mult=0.4, num_classes=527)
    net.load_state_dict(torch.load(benchlib.MN04_CHECKPOINT, map_location="cpu", weights_only=True))
    return front, net.eval()


# name -> (stft, stem) of the exports compared: ours as exported now, ours without the stem fold, and the export
# before the FFT front-ends (the direct DFT and the official stem graph)
EXPORTS = {"fft": ("fft", None), "fft official stem": ("fft", "official"), "conv": ("conv", "official")}


def _export(out: Path, stft: str, stem: str | None, layers: list[str] | None = None) -> Path:
    from export.onnx_export import export_model

    # without layers the default export (every block and the embedding: the whole network, as the official forward
    # runs it)
    result = export_model("mn04", out / f"{stft}-{stem}-{'-'.join(layers or ['all'])}",
                          checkpoint=benchlib.MN04_CHECKPOINT, stft=stft, stem=stem, layers=layers)
    return result.path


def _front_end_onnx(out: Path, stft: str) -> Path:
    import torch

    from export.mel_efficientat import MelEfficientAT

    path = out / f"frontend-{stft}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MelEfficientAT(stft).eval(), (torch.zeros(1, 320000),), str(path), input_names=["waveform"],
                          output_names=["mel"], opset_version=17, dynamo=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of fschmid56/EfficientAT")
    parser.add_argument("--stand-ins", type=Path, default=None,
                        help="a directory with torchaudio/torchvision stand-ins (see the module docstring)")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    front, net = _official(args.official, args.stand_ins)
    audio = (np.random.default_rng(3).standard_normal((1, 320000)) * 0.1).astype(np.float32)
    x = torch.from_numpy(audio)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        models = {name: benchlib.ort_session(_export(out, *how)) for name, how in EXPORTS.items()}
        deployed = {name: benchlib.ort_session(_export(out, *how, ["default"])) for name, how in EXPORTS.items()}
        fronts = {stft: benchlib.ort_session(_front_end_onnx(out, stft)) for stft in ("fft", "conv")}

        def official_model() -> object:
            with torch.inference_mode():
                return net(front(x).unsqueeze(1))

        def official_to_block_12() -> object:
            with torch.inference_mode():
                return net.features[:13](front(x).unsqueeze(1)).mean(dim=3)

        def official_front() -> object:
            with torch.inference_mode():
                return front(x)

        calls = {
            "official mn04 (torch eager)": official_model,
            "ours fft (ONNX Runtime)": lambda: models["fft"].run(None, {"waveform": audio}),
            "ours fft, official stem": lambda: models["fft official stem"].run(None, {"waveform": audio}),
            "ours conv, official stem (the export before)": lambda: models["conv"].run(None, {"waveform": audio}),
            "official mn04 to block 12 (torch eager)": official_to_block_12,
            "ours fft --layers default": lambda: deployed["fft"].run(None, {"waveform": audio}),
            "ours fft --layers default, official stem":
                lambda: deployed["fft official stem"].run(None, {"waveform": audio}),
            "ours conv --layers default, official stem": lambda: deployed["conv"].run(None, {"waveform": audio}),
            "official front-end (torch.stft)": official_front,
            "ours fft front-end": lambda: fronts["fft"].run(None, {"waveform": audio}),
            "ours conv front-end": lambda: fronts["conv"].run(None, {"waveform": audio}),
        }
        ms = benchlib.interleaved_ms(calls, args.repeats)
        # the same audio through each: the official block 12 (features[12]) map [B, C, F, T], its time mean laid
        # out as ours (frequency-major, then channels) vs our layer_12 output
        with torch.inference_mode():
            maps = net.features[:13](front(x).unsqueeze(1))
        official_emb = maps.mean(dim=3).permute(0, 2, 1).reshape(1, -1).numpy()
        ours = {name: models[name].run(["layer_12"], {"waveform": audio})[0] for name in models}
    official_ms, fft_ms, conv_ms = (ms["official mn04 (torch eager)"], ms["ours fft (ONNX Runtime)"],
                                    ms["ours conv, official stem (the export before)"])
    rows = [[name, f"{value:.2f}"] for name, value in ms.items()]
    print(f"### mn04 per 10 s window, batch 1, one thread, median of {args.repeats} interleaved calls\n")
    print(benchlib.table(["what", "ms"], rows))
    print(f"\nours fft vs official: {official_ms / fft_ms:.2f}x faster; vs the export before (conv, official stem): "
          f"{conv_ms / fft_ms:.2f}x faster; the stem fold alone: {ms['ours fft, official stem'] / fft_ms:.2f}x; "
          f"ours conv vs official: {official_ms / conv_ms:.2f}x")
    official12_ms = ms["official mn04 to block 12 (torch eager)"]
    fft12_ms, conv12_ms = ms["ours fft --layers default"], ms["ours conv --layers default, official stem"]
    fold12 = ms["ours fft --layers default, official stem"] / fft12_ms
    print(f"deployment export (--layers default) fft: vs the official code to block 12 {official12_ms / fft12_ms:.2f}x "
          f"faster; vs the export before with the same layers (conv, official stem) {conv12_ms / fft12_ms:.2f}x; the "
          f"stem fold alone {fold12:.2f}x; vs the export before with "
          f"every block (what the default setup exported before) {conv_ms / fft12_ms:.2f}x")
    front_ratio = ms["official front-end (torch.stft)"] / ms["ours fft front-end"]
    print(f"front-ends: ours fft vs official torch.stft {front_ratio:.2f}x; ours fft vs ours conv "
          f"{ms['ours conv front-end'] / ms['ours fft front-end']:.2f}x")
    agreement = {}
    for name, emb in ours.items():
        if official_emb.shape == emb.shape:
            agreement[name] = float(np.abs(emb - official_emb).max() / np.abs(official_emb).max())
    if agreement:
        print("layer_12 time-mean embedding vs the official code's block 12, max relative difference: "
              + ", ".join(f"ours {k} {v:.2e}" for k, v in agreement.items()))
    benchlib.write_json("official_efficientat", {"machine": info, "ms": ms, "repeats": args.repeats,
                                                 "embedding_rel_diff": agreement}, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
