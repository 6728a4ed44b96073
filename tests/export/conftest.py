"""Fixtures for export tests: the real mn04 weights from ../shared and session-wide exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.onnx_export import ExportResult, export_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MN04_FILE = SHARED / "models" / "efficientat" / "mn04_as_mAP_432.pt"


@pytest.fixture(scope="session")
def mn04_checkpoint() -> Path:
    if not MN04_FILE.is_file():
        pytest.skip(f"real EfficientAT weights not found: {MN04_FILE} is missing (../shared beside the repo)")
    return MN04_FILE


@pytest.fixture(scope="session")
def mn04_real_export(mn04_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_model("mn04", tmp_path_factory.mktemp("mn04_real"), checkpoint=mn04_checkpoint)


@pytest.fixture(scope="session")
def mn04_random_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_model("mn04", tmp_path_factory.mktemp("mn04_random"), random_init=True, seed=3)
