"""BEATs and CED through export_model: the ONNX graph runs in onnxruntime and matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_agent.model_info import INPUT_NAME
from export import beats, ced
from export.onnx_export import ExportResult, read_model_info

MAX_REL_ERROR = 1e-4


def _audio(samples: int) -> np.ndarray:
    """A loud and a very quiet clip with silent stretches: per-clip top_db and the log floor both matter."""
    rng = np.random.default_rng(9)
    wave = rng.standard_normal((2, samples)) * np.array([[0.4], [3e-4]])
    wave[:, 30000:36000] = 0.0
    return wave.astype(np.float32)


def _compare(result: ExportResult, model: torch.nn.Module) -> float:
    audio = _audio(result.info.window_samples)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(list(result.info.layers), {INPUT_NAME: audio})
    single = session.run(list(result.info.layers), {INPUT_NAME: audio[1:]})
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(audio))]
    errors = []
    for g, s, e in zip(got, single, expected, strict=True):
        errors.append(np.abs(g - e).max() / np.abs(e).max())
        assert np.abs(g[1:] - s).max() <= 1e-5 * np.abs(s).max()  # batch mates do not leak in
    return float(max(errors))


def _plain_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_ced_tiny_export(ced_tiny_export: ExportResult) -> None:
    result = ced_tiny_export
    assert result.max_rel_error is not None and result.max_rel_error < MAX_REL_ERROR
    info = read_model_info(result.path)
    assert (info.family, info.variant, info.sample_rate, info.window_samples) == ("ced", "ced-tiny", 16000, 160000)
    assert info.layers == ("layer_7", "layer_10", "layer_12") and info.dims == (768, 768, 768)
    assert info.default_layers == ("layer_7", "layer_10")
    model = ced.build("ced-tiny", info.layers, "time-mean", result.path.parent / "model.safetensors")
    assert _compare(result, model) < MAX_REL_ERROR
    # the split DFT's MatMuls after a reflect Pad (as EfficientAT's), no STFT/DFT ops
    assert not {"STFT", "DFT"} & _plain_ops(result.path) and info.extra["frontend_stft"] == "fft"


@pytest.mark.slow
def test_beats_export(beats_export: ExportResult) -> None:
    result = beats_export
    assert result.max_rel_error is not None and result.max_rel_error < MAX_REL_ERROR
    info = read_model_info(result.path)
    assert (info.family, info.variant, info.sample_rate, info.window_samples) == ("beats", "beats", 16000, 160000)
    assert info.layers == tuple(f"layer_{i}" for i in range(1, 13)) and set(info.dims) == {6144}
    assert info.default_layers == ("layer_11", "layer_12")
    checkpoint = result.path.parent / "beats.random-seed2.pt"
    model = beats.build("beats", info.layers, "time-mean", checkpoint)
    assert _compare(result, model) < MAX_REL_ERROR
    assert not {"STFT", "DFT", "Pad"} & _plain_ops(result.path)
