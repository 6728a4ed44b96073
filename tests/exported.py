"""What the test areas outside export/ need of an exported model: the ONNX file and the exporter's ModelInfo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.model_info import ModelInfo


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    info: ModelInfo
