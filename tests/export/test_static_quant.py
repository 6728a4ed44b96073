"""Static QDQ int8 (`quantize="int8-static"`): calibration audio, the written graph, its metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import static_quant
from export.cli import build_parser
from export.onnx_export import export_model, read_model_info


def test_calibration_windows_are_normal_audio_at_the_model_rate() -> None:
    windows = static_quant.calibration_windows(32_000 * 2, 32_000, count=5)
    assert windows.shape == (5, 64_000) and windows.dtype == np.float32
    assert np.isfinite(windows).all() and (np.abs(windows).max(axis=1) > 0).all()
    again = static_quant.calibration_windows(32_000 * 2, 32_000, count=5)
    np.testing.assert_array_equal(windows, again)  # deterministic
    with pytest.raises(ValueError):
        static_quant.calibration_windows(100, 16_000, count=0)


def test_reader_feeds_batches_and_rewinds() -> None:
    reader = static_quant.WindowReader(np.zeros((5, 8), np.float32), batch=2)
    sizes = []
    while (item := reader.get_next()) is not None:
        sizes.append(item["waveform"].shape[0])
    assert sizes == [2, 2, 1]
    reader.rewind()
    first = reader.get_next()
    assert first is not None and first["waveform"].shape == (2, 8)


def test_cli_offers_int8_static() -> None:
    assert build_parser().parse_args(["mn04", "--out", "x", "--quantize", "int8-static"]).quantize == "int8-static"


def test_int8_static_variant_loads_and_reports(mn04_checkpoint: Path, tmp_path: Path) -> None:
    result = export_model("mn04", tmp_path, checkpoint=mn04_checkpoint, layers=["layer_12"], quantize="int8-static")
    assert result.precision == "int8-static" and result.info.extra["precision"] == "int8-static"
    assert read_model_info(result.path).extra["precision"] == "int8-static"
    assert result.precision_rel_error is not None and np.isfinite(result.precision_rel_error)
    assert result.ms_per_window is not None and result.ms_per_window > 0
    proto = onnx.load(str(result.path))
    ops = [node.op_type for node in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the convolutions are quantized: int8 weights feed them through DequantizeLinear ...
    int8_inits = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert len(int8_inits) > 10
    # ... but the log-mel front-end stays fp32: nothing dequantized feeds its split-DFT products or its log
    producer = {out: node.op_type for node in proto.graph.node for out in node.output}
    frontend = [n for n in proto.graph.node if n.name.startswith("/frontend/") and n.op_type in ("MatMul", "Log")]
    assert {n.op_type for n in frontend} == {"MatMul", "Log"}
    assert all(producer.get(name) != "DequantizeLinear" for n in frontend for name in n.input)
    audio = (np.random.default_rng(5).standard_normal((1, 320000)) * 0.1).astype(np.float32)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"waveform": audio})
    assert out.shape == (1, 384) and np.isfinite(out).all()
