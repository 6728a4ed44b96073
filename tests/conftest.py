"""Session fixtures shared by all test areas: paths to ../shared and models exported once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from export.onnx_export import ExportResult, export_model

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
def mn04_random_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """A random-init mn04 (every layer) exported to ONNX once per session."""
    return export_model("mn04", tmp_path_factory.mktemp("mn04_random"), random_init=True, seed=0)


@pytest.fixture(scope="session")
def mn04_real_export(tmp_path_factory: pytest.TempPathFactory, mn04_checkpoint: Path) -> ExportResult:
    """The real AudioSet mn04 weights from ../shared exported to ONNX once per session."""
    return export_model("mn04", tmp_path_factory.mktemp("mn04_real"), checkpoint=mn04_checkpoint)


@pytest.fixture(scope="session")
def mn04_random_onnx(mn04_random_export: ExportResult) -> Path:
    return mn04_random_export.path


@pytest.fixture(scope="session")
def mn04_real_onnx(mn04_real_export: ExportResult) -> Path:
    return mn04_real_export.path


@pytest.fixture(scope="session")
def beats_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """Full-size BEATs (random weights in the official layout, all 12 layers) exported once per session."""
    return export_model("beats", tmp_path_factory.mktemp("beats_onnx"), random_init=True, seed=2)


@pytest.fixture(scope="session")
def ced_tiny_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """ced-tiny from a random checkpoint in the Hugging Face safetensors layout, end to end."""
    from export import ced

    out = tmp_path_factory.mktemp("ced_onnx")
    checkpoint = out / "model.safetensors"
    ced.write_random_checkpoint(checkpoint, "ced-tiny", seed=2)
    return export_model("ced-tiny", out, checkpoint=checkpoint, layers=("layer_7", "layer_10", "layer_12"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI (CI=true, as .ci/run is run) a skipped test is a failure: every path must run there."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reasons = sorted({str(report.longrepr[-1]) for report in skipped if isinstance(report.longrepr, tuple)})
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped, which CI does not allow: {'; '.join(reasons)}",
                            red=True)
        session.exitstatus = 1
