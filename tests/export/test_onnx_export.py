"""export_model: ONNX graph, metadata, verification against PyTorch, fp16 and int8 variants."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_agent.model_info import ModelInfo
from export import EXPORTER_VERSION, efficientat, onnx_export
from export.base import CheckpointError
from export.checkpoints import sha256_file
from export.onnx_export import ExportError, ExportResult, export_model, read_model_info

MN04_SHA256 = "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"  # the official release file


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _audio(batch: int, seed: int = 5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, 320000)) * 0.1).astype(np.float32)


def test_real_mn04_export_matches_pytorch(mn04_real_export: ExportResult, mn04_checkpoint: Path) -> None:
    result = mn04_real_export
    assert result.path.name == "mn04.onnx" and result.path.is_file()
    assert result.max_rel_error is not None and result.max_rel_error < 1e-4
    info = result.info
    assert info.checkpoint_sha256 == MN04_SHA256 == sha256_file(mn04_checkpoint)
    assert info.layers == efficientat.available_layers("mn04")
    assert info.default_layers == ("layer_6", "layer_11", "layer_12")
    # independent check on other audio and another batch size than the exporter's own verification
    encoder = efficientat.build("mn04", info.layers, "time-mean", mn04_checkpoint)
    audio = _audio(3)
    with torch.no_grad():
        expected = [t.numpy() for t in encoder(torch.from_numpy(audio))]
    got = _session(result.path).run(None, {"waveform": audio})
    for name, g, e, dim in zip(info.layers, got, expected, info.dims, strict=True):
        assert g.shape == (3, dim), name
        assert np.abs(g - e).max() / np.abs(e).max() < 1e-4, name


def test_graph_io_and_metadata_round_trip(mn04_real_export: ExportResult) -> None:
    proto = onnx.load(str(mn04_real_export.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = proto.graph.input
    assert graph_input.name == "waveform"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 320000
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in proto.graph.output] == list(mn04_real_export.info.layers)
    info = read_model_info(mn04_real_export.path)
    assert info == mn04_real_export.info
    assert info == ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert info.family == "efficientat" and info.variant == "mn04"
    assert info.sample_rate == 32000 and info.window_samples == 320000
    assert info.exporter_version == EXPORTER_VERSION
    assert info.extra["precision"] == "fp32"


def test_random_init_export_verifies_and_hashes_written_checkpoint(mn04_random_export: ExportResult) -> None:
    result = mn04_random_export
    assert result.max_rel_error is not None and result.max_rel_error < 1e-4
    written = result.path.parent / "mn04.random-seed0.pt"
    assert result.info.checkpoint_sha256 == sha256_file(written) != MN04_SHA256
    out = _session(result.path).run(["embedding"], {"waveform": _audio(1)})[0]
    assert out.shape == (1, 384) and np.isfinite(out).all()


def test_export_is_deterministic_and_computes_only_needed_blocks(tmp_path: Path) -> None:
    first = export_model("mn04", tmp_path / "a", random_init=True, layers=["layer_3", "layer_2"], verify=False)
    second = export_model("mn04", tmp_path / "b", random_init=True, layers=["layer_3", "layer_2"], verify=False)
    assert hashlib.sha256(first.path.read_bytes()).digest() == hashlib.sha256(second.path.read_bytes()).digest()
    assert first.info.layers == ("layer_3", "layer_2") and first.info.dims == (512, 512)
    assert first.info.default_layers == ("layer_3", "layer_2")  # family defaults not exported
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(first.path)).graph.node)
    # the front-end's split DFT (stage 1 and the combination after stage 2, two grouped convs) + the stem fold (stem,
    # block 1's depthwise, block 2's expansion; no block 1 projection, as layer_1 is not an output) + block 2's
    # depthwise and projection + block 3 (3 convs); block 4 and beyond must not be in the graph
    assert first.info.extra["stem"] == "folded"
    assert convs == 2 + 3 + 2 + 3


def test_failed_verification_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "MAX_REL_ERROR", 0.0)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model("mn04", tmp_path, random_init=True, layers=["layer_16"])
    assert not (tmp_path / "mn04.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_fp16_variant_loads_and_reports(mn04_checkpoint: Path, tmp_path: Path) -> None:
    result = export_model("mn04", tmp_path, checkpoint=mn04_checkpoint, layers=["layer_8", "embedding"], fp16=True)
    assert result.precision == "fp16" and result.info.extra["precision"] == "fp16"
    assert result.precision_rel_error is not None and np.isfinite(result.precision_rel_error)
    assert result.ms_per_window is not None and result.ms_per_window > 0
    proto = onnx.load(str(result.path))
    initializer_types = {init.data_type for init in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializer_types
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    outputs = _session(result.path).run(None, {"waveform": _audio(2)})
    assert [o.dtype for o in outputs] == [np.float32, np.float32]
    assert [o.shape for o in outputs] == [(2, 256), (2, 384)]
    assert read_model_info(result.path).checkpoint_sha256 == MN04_SHA256


def test_int8_variant_loads_and_reports(mn04_checkpoint: Path, tmp_path: Path) -> None:
    result = export_model("mn04", tmp_path, checkpoint=mn04_checkpoint, layers=["layer_12"], quantize="int8")
    assert result.precision == "int8" and result.info.extra["precision"] == "int8"
    assert result.precision_rel_error is not None and np.isfinite(result.precision_rel_error)
    proto = onnx.load(str(result.path))
    assert any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger") for node in proto.graph.node)
    (out,) = _session(result.path).run(None, {"waveform": _audio(1)})
    assert out.shape == (1, 384) and np.isfinite(out).all()


def test_option_errors(tmp_path: Path, mn04_checkpoint: Path) -> None:
    with pytest.raises(ExportError, match="not both"):
        export_model("mn04", tmp_path, checkpoint=mn04_checkpoint, random_init=True)
    with pytest.raises(ExportError, match="one of fp16 and quantize"):
        export_model("mn04", tmp_path, random_init=True, fp16=True, quantize="int8")
    with pytest.raises(ExportError, match="layer_99"):
        export_model("mn04", tmp_path, random_init=True, layers=["layer_99"])
    with pytest.raises(KeyError, match="mn99"):
        export_model("mn99", tmp_path, random_init=True)
    with pytest.raises(CheckpointError, match="no pinned sha256"):
        export_model("mn10", tmp_path, weights_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


def _front_end_convs(proto: onnx.ModelProto) -> list[tuple[int, list[int], list[int]]]:
    """(group, kernel_shape, strides) of each Conv of the front-end."""
    out = []
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.name.startswith("/frontend/"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append((int(attrs.get("group", 1)), list(attrs.get("kernel_shape", [])),
                        list(attrs.get("strides", []))))
    return out


def test_real_mn04_default_front_end_is_the_split_dft_and_conv_stays_available(
        mn04_real_export: ExportResult, mn04_checkpoint: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(mn04_real_export.path))
    front_ops = {n.op_type for n in proto.graph.node if n.name.startswith("/frontend/")}
    assert "MatMul" in front_ops and not {"STFT", "DFT"} & front_ops
    # the split's stage 1: one grouped conv, a group per row sample b, 25 taps (the window's rows), stride 10;
    # after stage 2, a 1x1 conv with a group per k2 (16) forms the direct and mirrored bins
    assert _front_end_convs(proto) == [(32, [25], [10]), (16, [1], [1])]
    assert mn04_real_export.info.extra["frontend_stft"] == "fft"
    conv = export_model("mn04", tmp_path, checkpoint=mn04_checkpoint, layers=["layer_12"], stft="conv")
    assert conv.info.extra["frontend_stft"] == "conv" and conv.max_rel_error is not None
    # the direct DFT: one convolution over the whole 800-sample window, hop 320
    assert _front_end_convs(onnx.load(str(conv.path))) == [(1, [800], [320])]
    # the two front-ends give the same embedding within the export tolerance
    audio = _audio(2, seed=9)
    split = dict(zip(mn04_real_export.info.layers, _session(mn04_real_export.path).run(None, {"waveform": audio}),
                     strict=True))["layer_12"]
    direct = _session(conv.path).run(None, {"waveform": audio})[0]
    assert np.abs(split - direct).max() / np.abs(direct).max() < 1e-4


def test_stft_choice_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="stft 'dft' is not available; choose one of fft, conv"):
        export_model("mn04", tmp_path, random_init=True, stft="dft", verify=False)
    with pytest.raises(ExportError, match="ced-tiny: stft 'conv' is not available; choose one of fft, matmul"):
        export_model("ced-tiny", tmp_path, random_init=True, stft="conv", verify=False)
    with pytest.raises(ExportError, match="beats: stft 'fft' is not available; the beats front-end has one"):
        export_model("beats", tmp_path, random_init=True, stft="fft", verify=False)
