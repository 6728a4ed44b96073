"""edge-export: write DIR/NAME.onnx for an encoder, verified against PyTorch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.errors import EdgeAsdError
from edge_agent.model_info import POOLINGS, ModelInfo
from export.base import CheckpointError
from export.checkpoints import WEIGHTS_DIR_ENV
from export.onnx_export import QUANTIZE_MODES, ExportError, ExportResult, export_model
from export.pooling import DEFAULT_GEM_P
from export.registry import families


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-export",
        description="Export a pretrained audio encoder (front-end included) to ONNX with edge-asd metadata.",
    )
    parser.add_argument("name", metavar="NAME", help=f"encoder: {', '.join(sorted(families()))}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="official checkpoint file")
    source.add_argument(
        "--random-init", action="store_true", help="random weights in the official layout (tests, demos)"
    )
    parser.add_argument(
        "--weights-dir", type=Path, help=f"where to look for official files (default: ${WEIGHTS_DIR_ENV})"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/NAME.onnx")
    parser.add_argument("--layers", help="comma-separated outputs, e.g. layer_8,layer_12,embedding (default: every "
                        "block); 'default' names the scoring default layers: a deployment export that computes "
                        "only the blocks they need")
    pooling = parser.add_mutually_exclusive_group()
    pooling.add_argument("--pooling", choices=POOLINGS, help="one pooling for every layer (default: time-mean)")
    pooling.add_argument(
        "--poolings",
        metavar="LIST",
        help=f"comma-separated poolings of {', '.join(POOLINGS)}: the first gives layer_<i>, "
        "each other one more output per layer, layer_<i>@<suffix> (e.g. time-mean,time-meanstd,time-max)",
    )
    parser.add_argument(
        "--gem-p", type=float, default=DEFAULT_GEM_P, metavar="P", help="GeM exponent (default: %(default)s)"
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 weights, fp32 input/outputs")
    precision.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="int8: dynamic quantization of the matrix products; int8-static: static QDQ int8 of convolutions "
        "and matrix products too, calibrated on synthetic normal machine sound (front-end kept fp32)",
    )
    parser.add_argument("--stft", choices=("fft", "conv", "matmul"), default=None,
                        help="the front-end's STFT: fft (a two-stage split DFT, the default for EfficientAT and CED) "
                             "or the direct DFT of earlier releases: conv (EfficientAT), matmul (CED)")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed and verification audio seed")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX-vs-PyTorch check")
    parser.add_argument("--no-download", action="store_true", help="never download official weights")
    return parser


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layers = _names(args.layers)
    poolings = _names(args.poolings)
    for option, given, names in (("--layers", args.layers, layers), ("--poolings", args.poolings, poolings)):
        if given is not None and not names:
            print(f"edge-export: error: {option} names nothing (got {given!r})", file=sys.stderr)
            return 2
    try:
        result = export_model(
            args.name,
            args.out,
            checkpoint=args.checkpoint,
            random_init=args.random_init,
            layers=layers,
            pooling=poolings or args.pooling or "time-mean",
            gem_p=args.gem_p,
            fp16=args.fp16,
            quantize=args.quantize,
            seed=args.seed,
            verify=not args.no_verify,
            weights_dir=args.weights_dir,
            allow_download=not args.no_download,
            stft=args.stft,
        )
    except (CheckpointError, ExportError, EdgeAsdError, ValueError) as exc:
        print(f"edge-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown encoder name
        print(f"edge-export: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0


def _poolings(info: ModelInfo) -> str:
    suffixed = [pooling for name, pooling in zip(info.layers, info.output_poolings, strict=True) if "@" in name]
    used = list(dict.fromkeys([info.pooling, *suffixed]))
    named = [f"gem p={info.gem_p:g}" if p == "gem" else p for p in used]
    return f"{named[0]} pooling" if len(named) == 1 else f"poolings {', '.join(named)}"


def describe(result: ExportResult) -> str:
    info = result.info
    lines = [
        f"wrote {result.path} ({info.family} {info.variant}, {result.precision}, {_poolings(info)})",
        f"input: waveform [batch, {info.window_samples}] at {info.sample_rate} Hz",
        "outputs: " + ", ".join(f"{name} [{dim}]" for name, dim in zip(info.layers, info.dims, strict=True)),
        f"default layers: {', '.join(info.default_layers)}",
        f"checkpoint sha256: {info.checkpoint_sha256}",
    ]
    if result.max_rel_error is None:
        lines.append("verification: skipped")
    else:
        lines.append(f"verification: max relative error ONNX vs PyTorch {result.max_rel_error:.2e}")
    if result.precision_rel_error is not None:
        lines.append(f"{result.precision} vs fp32 ONNX: max relative error {result.precision_rel_error:.2e}")
    if result.ms_per_window is not None and result.fp32_ms_per_window is not None:
        lines.append(
            f"CPU latency per window (batch 1): {result.precision} {result.ms_per_window:.1f} ms, "
            f"fp32 {result.fp32_ms_per_window:.1f} ms"
        )
    lines.append(f"seconds: {result.seconds:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
