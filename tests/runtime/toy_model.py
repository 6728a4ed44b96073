"""A tiny hand-built ONNX graph with edge-asd metadata, for runtime tests that need no real encoder."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edge_agent.model_info import ModelInfo

WINDOW = 1600


def write_toy_model(path: Path, info: ModelInfo | None, outputs: tuple[str, ...] = ("layer_1", "layer_2")) -> Path:
    """waveform [B, 1600] -> layer_1 = mean over 100 frames of 16 samples, layer_2 = max over frames."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 100, 16])
    nodes = [
        helper.make_node("Reshape", ["waveform", "shape"], ["frames"]),
        helper.make_node("ReduceMean", ["frames"], [outputs[0]], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["frames"], [outputs[1]], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", WINDOW])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 16]) for name in outputs],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if info is not None:
        helper.set_model_props(model, info.to_metadata())
    onnx.save(model, path)
    return path


def toy_info(**changes: object) -> ModelInfo:
    base = dict(family="toy", variant="toy1", sample_rate=1600, window_samples=WINDOW,
                layers=("layer_1", "layer_2"), dims=(16, 16), default_layers=("layer_1",),
                checkpoint_sha256="ab" * 32, exporter_version="test")
    base.update(changes)
    return ModelInfo(**base)  # type: ignore[arg-type]


