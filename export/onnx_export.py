"""Export an encoder to DIR/NAME.onnx with edge-asd metadata, verified against PyTorch.

The graph: input `waveform` float32 [batch, window_samples] (dynamic batch), one output per layer and
pooling (layer by layer in the requested order, poolings in theirs: `layer_12`, `layer_12@max`, ...),
front-end inside. The file is written to a temp name in DIR, verified, and only
then renamed into place, so DIR/NAME.onnx is never a half-written or unverified model.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edge_agent.fsutil import replacing, sha256_file
from edge_agent.model_info import INPUT_NAME, ModelInfo
from export import EXPORTER_VERSION
from export.base import ExportableEncoder
from export.checkpoints import resolve_checkpoint
from export.pooling import DEFAULT_GEM_P, Poolings
from export.registry import family_for

OPSET = 17
MAX_REL_ERROR = 1e-4
VERIFY_BATCH = 2
QUANTIZE_MODES = ("int8", "int8-static")
SPEED_RUNS = 5
TONE_CYCLES_PER_SAMPLE = 0.0311  # ~1 kHz at 32 kHz, ~500 Hz at 16 kHz
# ONNX node-name prefixes that stay fp32 in --fp16 / int8 models: front-ends (DFT bases, mel matmul,
# log) lose accuracy badly at 16 bits or 8 bits. The scope comes from the submodule's attribute name;
# an encoder may list others in a `keep_fp32_scopes` attribute.
FRONTEND_SCOPES = ("/frontend/",)
# Dynamic int8 covers the matrix products only. Dynamic Conv quantization (ConvInteger, activations
# quantized per tensor at run time) measured 0.83 relative error and 2x the latency on mn04.
INT8_OP_TYPES = ("MatMul", "Gemm")
# "int8-static" is static QDQ quantization instead (export/static_quant.py): convolutions included, activation
# ranges calibrated on synthetic normal machine sound, per-channel weights, the front-end left fp32.


class ExportError(Exception):
    """The export itself failed: verification error too large, bad option combination."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    info: ModelInfo
    max_rel_error: float | None  # fp32 ONNX vs PyTorch, None with verify=False
    seconds: float
    precision: str = "fp32"  # "fp32" | "fp16" | "int8" | "int8-static"
    precision_rel_error: float | None = None  # fp16/int8 model vs the fp32 ONNX model
    ms_per_window: float | None = None  # CPU latency of the written model, batch 1 (fp16/int8 only)
    fp32_ms_per_window: float | None = None
    output_rel_errors: dict[str, float] | None = None  # fp32 ONNX vs PyTorch per output, None with verify=False


def export_model(
    name: str,
    out_dir: Path | str,
    checkpoint: Path | str | None = None,
    random_init: bool = False,
    layers: Sequence[str] | None = None,
    pooling: str | Sequence[str] = "time-mean",
    fp16: bool = False,
    quantize: str | None = None,
    seed: int = 0,
    verify: bool = True,
    weights_dir: Path | str | None = None,
    allow_download: bool = True,
    gem_p: float = DEFAULT_GEM_P,
    stft: str | None = None,
    stem: str | None = None,
) -> ExportResult:
    """pooling: one mode, or several: the first names the plain outputs, the others `<layer>@<suffix>`.
    stft: the front-end's STFT formulation where the family has a choice (EfficientAT: "fft", the default,
    or "conv", the direct DFT of earlier releases); None: the family's default.
    stem: EfficientAT's features[0..2] "folded" (export/stem_fold.py) or "official" (the graph of earlier releases,
    for comparison); None: folded where that is faster (mn04, mn05)."""
    start = time.perf_counter()
    if random_init and checkpoint is not None:
        raise ExportError("give either a checkpoint or random_init, not both")
    if fp16 and quantize:
        raise ExportError("choose one of fp16 and quantize")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ExportError(f"quantize {quantize!r} is not one of {QUANTIZE_MODES}")
    try:
        poolings = Poolings((pooling,) if isinstance(pooling, str) else tuple(pooling), gem_p)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    family = family_for(name)
    methods = getattr(family, "STFT_METHODS", None)
    if stft is not None and (methods is None or stft not in methods):
        raise ExportError(f"{name}: stft {stft!r} is not available; " + (
            f"choose one of {', '.join(methods)}" if methods else f"the {family.FAMILY} front-end has one formulation"))
    stems = getattr(family, "STEMS", None)
    if stem is not None and (stems is None or stem not in stems):
        raise ExportError(f"{name}: stem {stem!r} is not available; " + (
            f"choose one of {', '.join(stems)}" if stems else f"the {family.FAMILY} network has one graph"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = _expand_layers(layers, family, name)
    _check_layers(name, chosen, family.available_layers(name))

    if random_init:
        ckpt_path = out / f"{name}.random-seed{seed}.pt"
        family.write_random_checkpoint(ckpt_path, name, seed)
    else:
        ckpt_path = resolve_checkpoint(family, name, checkpoint, weights_dir, allow_download)
    options = {key: value for key, value in (("stft", stft), ("stem", stem)) if value is not None}
    try:
        model = family.build(name, chosen, poolings, ckpt_path, seed, **options).eval()
    except ValueError as exc:  # a stem fold that does not apply (a wide variant, no output past block 1)
        if stem is None:
            raise
        raise ExportError(f"{name}: {exc}") from None
    precision = "fp16" if fp16 else (quantize or "fp32")
    info = model_info(model, sha256_file(ckpt_path), precision)

    target = out / f"{name}.onnx"
    fp32_tmp = _temp_path(out, f"{name}.fp32")
    try:
        with replacing(target, mode=0o644) as final_tmp:  # a model is not a secret
            _torch_to_onnx(model, fp32_tmp)
            _write_metadata(fp32_tmp, info)
            per_output = verify_outputs(model, fp32_tmp, seed) if verify else None
            max_rel = max(per_output.values()) if per_output else None
            bad = {k: v for k, v in (per_output or {}).items() if not v <= MAX_REL_ERROR}  # NaN fails too
            if bad:
                worst = max(bad, key=lambda k: -1.0 if np.isnan(bad[k]) else bad[k])
                raise ExportError(
                    f"{name}: ONNX output {worst} differs from PyTorch by {bad[worst]:.3g} (relative) > "
                    f"{MAX_REL_ERROR:g}" + (f" (and {len(bad) - 1} more output(s))" if len(bad) > 1 else "")
                )
            reduced_error = ms = fp32_ms = None
            if precision == "fp32":
                os.replace(fp32_tmp, final_tmp)
            else:
                scopes = tuple(getattr(model, "keep_fp32_scopes", FRONTEND_SCOPES))
                if fp16:
                    _convert_fp16(fp32_tmp, final_tmp, scopes)
                elif quantize == "int8-static":
                    _quantize_int8_static(fp32_tmp, final_tmp, scopes, info)
                else:
                    _quantize_int8(fp32_tmp, final_tmp, scopes)
                _write_metadata(final_tmp, info)
                reduced_error = compare_onnx(fp32_tmp, final_tmp, info.window_samples, seed)
                if not np.isfinite(reduced_error):
                    raise ExportError(f"{name}: the {precision} model gives non-finite outputs (fp16 overflow?); "
                                      "not written")
                ms, fp32_ms = cpu_ms_per_window(final_tmp, info), cpu_ms_per_window(fp32_tmp, info)
    finally:
        fp32_tmp.unlink(missing_ok=True)
    return ExportResult(target, info, max_rel, time.perf_counter() - start, precision, reduced_error, ms, fp32_ms,
                        per_output)


DEFAULT_LAYERS_KEYWORD = "default"  # in `layers`: the family's scoring default layers (a deployment export)
ALL_LAYERS_KEYWORD = "all"


def _expand_layers(layers: Sequence[str] | None, family: Any, name: str) -> tuple[str, ...]:
    """The outputs to export: every block without `layers`; "default" stands for the scoring default layers (only
    the blocks they need are computed), "all" for every block."""
    if not layers:
        return tuple(family.default_exported_layers(name))
    keywords = {DEFAULT_LAYERS_KEYWORD: family.default_layers(name), ALL_LAYERS_KEYWORD: family.available_layers(name)}
    chosen: list[str] = []
    for layer in layers:
        if layer in keywords:
            chosen += [each for each in keywords[layer] if each not in chosen]
        else:
            chosen.append(layer)  # a repeat is refused by _check_layers
    return tuple(chosen)


def _check_layers(name: str, chosen: Sequence[str], available: Sequence[str]) -> None:
    unknown = [layer for layer in chosen if layer not in available]
    if unknown:
        raise ExportError(f"{name} has no layer {', '.join(unknown)}; available: {', '.join(available)} "
                          f"(or {DEFAULT_LAYERS_KEYWORD}: the scoring default layers, {ALL_LAYERS_KEYWORD}: every one)")
    if len(set(chosen)) != len(chosen):
        raise ExportError(f"layers repeat: {', '.join(chosen)}")


def model_info(model: ExportableEncoder, checkpoint_sha256: str, precision: str = "fp32") -> ModelInfo:
    return ModelInfo(
        family=model.family,
        variant=model.variant,
        sample_rate=model.sample_rate,
        window_samples=model.window_samples,
        layers=tuple(model.output_names),
        dims=tuple(model.dims),
        default_layers=tuple(model.default_layers),
        pooling=model.pooling,
        checkpoint_sha256=checkpoint_sha256,
        exporter_version=EXPORTER_VERSION,
        output_poolings=tuple(model.output_poolings),
        gem_p=model.gem_p if "gem" in model.output_poolings else None,
        extra={"precision": precision, "opset": str(OPSET), **_graph_metadata(model)},
    )


def _graph_metadata(model: ExportableEncoder) -> dict[str, str]:
    """The front-end's STFT formulation and the network's stem graph, for families that have a choice."""
    found = {"frontend_stft": getattr(model, "frontend_stft", None), "stem": getattr(model, "stem", None)}
    return {key: str(value) for key, value in found.items() if value is not None}


def _temp_path(directory: Path, stem: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    return Path(name)


def _torch_to_onnx(model: ExportableEncoder, path: Path) -> None:
    dummy = torch.zeros(1, model.window_samples)
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in model.output_names}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notices
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(model.output_names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _write_metadata(path: Path, info: ModelInfo) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(info.to_metadata().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "edge-export"
    proto.producer_version = info.exporter_version
    onnx.save(proto, str(path))


def read_model_info(path: Path | str) -> ModelInfo:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelInfo.from_metadata(dict(session.get_modelmeta().custom_metadata_map), source=str(path))


def verification_audio(batch: int, samples: int, seed: int) -> np.ndarray:
    """Noise at several levels plus a rising tone: exercises loud and quiet spectrogram bins alike."""
    rng = np.random.default_rng(seed)
    ramp = np.arange(samples) / samples
    noise = rng.standard_normal((batch, samples)) * np.linspace(0.02, 0.3, batch)[:, None]
    tone = 0.2 * np.sin(2 * np.pi * TONE_CYCLES_PER_SAMPLE * np.arange(samples)) * ramp
    return (noise + tone).astype(np.float32)


def _session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_against_torch(model: ExportableEncoder, path: Path, seed: int = 0) -> float:
    """max over outputs of max|onnx - torch| / max|torch| on a random batch."""
    return max(verify_outputs(model, path, seed).values())


def verify_outputs(model: ExportableEncoder, path: Path, seed: int = 0) -> dict[str, float]:
    """Per output name: max|onnx - torch| / max|torch| on a random batch."""
    audio = verification_audio(VERIFY_BATCH, model.window_samples, seed)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(audio))]
    got = _session(path).run(list(model.output_names), {INPUT_NAME: audio})
    return {name: _rel_error(g, e) for name, g, e in zip(model.output_names, got, expected, strict=True)}


def compare_onnx(reference: Path, candidate: Path, samples: int, seed: int = 0) -> float:
    audio = verification_audio(VERIFY_BATCH, samples, seed)
    ref_out = _session(reference).run(None, {INPUT_NAME: audio})
    cand_out = _session(candidate).run(None, {INPUT_NAME: audio})
    return max(_rel_error(c, r) for c, r in zip(cand_out, ref_out, strict=True))


def _rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        raise ExportError(f"output shape {got.shape} != PyTorch {expected.shape}")
    scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(got.astype(np.float64) - expected))) / max(scale, 1e-12)


def cpu_ms_per_window(path: Path, info: ModelInfo, runs: int = SPEED_RUNS) -> float:
    """Median CPU latency for one window (batch 1), after one warm-up run."""
    session = _session(path)
    audio = verification_audio(1, info.window_samples, 0)
    session.run(None, {INPUT_NAME: audio})
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        session.run(None, {INPUT_NAME: audio})
        times.append((time.perf_counter() - begin) * 1000.0)
    return float(np.median(times))


def _frontend_nodes(proto: onnx.ModelProto, scopes: tuple[str, ...] = FRONTEND_SCOPES) -> list[str]:
    return [node.name for node in proto.graph.node if node.name.startswith(scopes)]


def _convert_fp16(source: Path, dest: Path, scopes: tuple[str, ...]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(source))
    converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=_frontend_nodes(proto, scopes))
    onnx.save(converted, str(dest))


def _quantize_int8(source: Path, dest: Path, scopes: tuple[str, ...]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    quantize_dynamic(
        str(source),
        str(dest),
        op_types_to_quantize=list(INT8_OP_TYPES),
        weight_type=QuantType.QInt8,
        nodes_to_exclude=_frontend_nodes(proto, scopes),
    )


def _quantize_int8_static(source: Path, dest: Path, scopes: tuple[str, ...], info: ModelInfo) -> None:
    from export.static_quant import calibration_windows, quantize_static_qdq

    windows = calibration_windows(info.window_samples, info.sample_rate)
    quantize_static_qdq(source, dest, windows, exclude=_frontend_nodes(onnx.load(str(source)), scopes))
