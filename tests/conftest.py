"""Session fixtures shared by all test areas: paths to ../shared and models exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MN04_CHECKPOINT = SHARED / "models" / "efficientat" / "mn04_as_mAP_432.pt"
DCASE_SAMPLE = SHARED / "data" / "dcase2023t2_dev_sample"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing (../shared beside the checkout holds it)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def mn04_checkpoint() -> Path:
    return _require(MN04_CHECKPOINT)


@pytest.fixture(scope="session")
def dcase_sample() -> Path:
    return _require(DCASE_SAMPLE)


@pytest.fixture(scope="session")
def mn04_random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init mn04 exported to ONNX (default layers), once per session."""
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("mn04_random")
    return export_model("mn04", out, random_init=True, seed=0).path


@pytest.fixture(scope="session")
def mn04_real_onnx(tmp_path_factory: pytest.TempPathFactory, mn04_checkpoint: Path) -> Path:
    """The real AudioSet mn04 weights from ../shared exported to ONNX, once per session."""
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("mn04_real")
    return export_model("mn04", out, checkpoint=mn04_checkpoint).path
