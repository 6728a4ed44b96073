"""Session fixtures shared by all test areas: paths to ../shared and the ONNX models exported once per session.

Two lanes (see .ci/run):
  full lane     torch is installed: the models are exported here, and also copied to $EDGE_ASD_TEST_MODELS
                when it is set, with the ModelInfo the exporter reported.
  runtime lane  no torch (the runtime's dependencies only): the models are read from $EDGE_ASD_TEST_MODELS,
                as the full lane left them; tests/export and tests/encoders are not collected there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.model_info import ModelInfo

from .exported import ExportedModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MN04_CHECKPOINT = SHARED / "models" / "efficientat" / "mn04_as_mAP_432.pt"
DCASE_SAMPLE = SHARED / "data" / "dcase2023t2_dev_sample"
MODELS_ENV = "EDGE_ASD_TEST_MODELS"
HAVE_TORCH = importlib.util.find_spec("torch") is not None

if not HAVE_TORCH:  # the runtime lane: these areas test the exporter itself
    collect_ignore = ["export", "encoders"]


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


def _exported(key: str, export: Callable[[], Any]) -> ExportedModel:
    """Export with torch (and share the file), or, without torch, take the file the full lane shared."""
    shared = Path(os.environ[MODELS_ENV]) if os.environ.get(MODELS_ENV) else None
    if HAVE_TORCH:
        result = export()
        if shared is not None:
            shared.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.path, shared / f"{key}.onnx")
            (shared / f"{key}.json").write_text(json.dumps(result.info.as_dict()))
        return ExportedModel(result.path, result.info)
    if shared is None or not (shared / f"{key}.onnx").is_file():
        raise RuntimeError(f"no torch to export {key}, and no {key}.onnx in ${MODELS_ENV} "
                           f"({shared}): run the full test lane first with {MODELS_ENV} set (.ci/run does)")
    info = ModelInfo.from_dict(json.loads((shared / f"{key}.json").read_text()))
    return ExportedModel(shared / f"{key}.onnx", info)


@pytest.fixture(scope="session")
def mn04_random_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random-init mn04 (every layer) exported to ONNX once per session (full lane: an ExportResult)."""
    from export.onnx_export import export_model

    return export_model("mn04", tmp_path_factory.mktemp("mn04_random"), random_init=True, seed=0)


@pytest.fixture(scope="session")
def mn04_real_export(tmp_path_factory: pytest.TempPathFactory, mn04_checkpoint: Path) -> Any:
    """The real AudioSet mn04 weights from ../shared exported to ONNX once per session (full lane)."""
    from export.onnx_export import export_model

    return export_model("mn04", tmp_path_factory.mktemp("mn04_real"), checkpoint=mn04_checkpoint)


@pytest.fixture(scope="session")
def beats_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Full-size BEATs (random weights in the official layout, all 12 layers) exported once per session."""
    from export.onnx_export import export_model

    return export_model("beats", tmp_path_factory.mktemp("beats_onnx"), random_init=True, seed=2)


@pytest.fixture(scope="session")
def ced_tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """ced-tiny from a random checkpoint in the Hugging Face safetensors layout, end to end."""
    from export import ced
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("ced_onnx")
    checkpoint = out / "model.safetensors"
    ced.write_random_checkpoint(checkpoint, "ced-tiny", seed=2)
    return export_model("ced-tiny", out, checkpoint=checkpoint, layers=("layer_7", "layer_10", "layer_12"))


@pytest.fixture(scope="session")
def mn04_random_model(request: pytest.FixtureRequest) -> ExportedModel:
    return _exported("mn04_random", lambda: request.getfixturevalue("mn04_random_export"))


@pytest.fixture(scope="session")
def mn04_real_model(request: pytest.FixtureRequest) -> ExportedModel:
    return _exported("mn04_real", lambda: request.getfixturevalue("mn04_real_export"))


@pytest.fixture(scope="session")
def beats_model(request: pytest.FixtureRequest) -> ExportedModel:
    return _exported("beats", lambda: request.getfixturevalue("beats_export"))


@pytest.fixture(scope="session")
def ced_tiny_model(request: pytest.FixtureRequest) -> ExportedModel:
    return _exported("ced_tiny", lambda: request.getfixturevalue("ced_tiny_export"))


@pytest.fixture(scope="session")
def mn04_random_onnx(mn04_random_model: ExportedModel) -> Path:
    return mn04_random_model.path


@pytest.fixture(scope="session")
def mn04_real_onnx(mn04_real_model: ExportedModel) -> Path:
    return mn04_real_model.path


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
