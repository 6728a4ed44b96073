"""Encoder session tests on a small hand-built ONNX graph (the exported encoders are tested in export/)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import EdgeAsdError, ModelMetadataError
from edge_agent.model.encoder import Encoder, choose_providers
from edge_agent.model_info import ModelInfo

from .toy_model import WINDOW
from .toy_model import toy_info as _info
from .toy_model import write_toy_model as _write_model


def test_embed_returns_one_array_per_layer(tmp_path: Path) -> None:
    encoder = Encoder(_write_model(tmp_path / "m.onnx", _info()))
    assert encoder.info.variant == "toy1" and encoder.info.default_layers == ("layer_1",)
    assert encoder.model_id.startswith("toy1-") and len(encoder.model_sha256) == 64
    windows = np.random.default_rng(0).standard_normal((3, WINDOW)).astype(np.float32)
    out = encoder.embed(windows)
    assert list(out) == ["layer_1", "layer_2"]
    np.testing.assert_allclose(out["layer_1"], windows.reshape(3, 100, 16).mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["layer_2"], windows.reshape(3, 100, 16).max(axis=1))


def test_embed_clip_resamples_and_tiles(tmp_path: Path) -> None:
    encoder = Encoder(_write_model(tmp_path / "m.onnx", _info()))
    clip = np.ones(400, np.float32)  # 0.5 s at 800 Hz -> 800 samples at 1600 Hz, tiled to 1600
    window = encoder.prepare(clip, 800)
    assert window.shape == (WINDOW,)
    assert encoder.embed_clip(clip, 800)["layer_1"].shape == (1, 16)


def test_wrong_window_shape_is_a_clear_error(tmp_path: Path) -> None:
    encoder = Encoder(_write_model(tmp_path / "m.onnx", _info()))
    with pytest.raises(EdgeAsdError, match=r"\[batch, 1600\], got \[2, 100\]"):
        encoder.embed(np.zeros((2, 100), np.float32))


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelMetadataError, match="lacks family"):
        Encoder(_write_model(tmp_path / "m.onnx", None))


def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path: Path) -> None:
    path = _write_model(tmp_path / "m.onnx", _info(), outputs=("a", "b"))
    with pytest.raises(ModelMetadataError, match="differ from metadata layers"):
        Encoder(path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(EdgeAsdError, match="not found"):
        Encoder(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeAsdError, match="cannot load ONNX model"):
        Encoder(tmp_path / "bad.onnx")


def test_provider_choice_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cpu_only = ["CPUExecutionProvider"]
    assert choose_providers(["auto"], cpu_only) == cpu_only
    with caplog.at_level(logging.WARNING):
        assert choose_providers(["cuda"], cpu_only) == cpu_only
    assert "cuda is not available" in caplog.text
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["auto"], gpu) == gpu
    assert choose_providers(["cuda", "cpu"], gpu) == gpu[1:]
    with pytest.raises(EdgeAsdError, match="unknown execution provider 'npu'"):
        choose_providers(["npu"], gpu)


def test_model_info_round_trip_and_mismatch() -> None:
    info = _info()
    assert ModelInfo.from_metadata(info.to_metadata()) == info
    assert ModelInfo.from_dict(info.as_dict()) == info
    other = _info(checkpoint_sha256="cd" * 32)
    assert info.mismatches(other) and not info.mismatches(_info())
    with pytest.raises(ModelMetadataError, match="default_layers"):
        _info(default_layers=("layer_9",))
