"""The benches' model cache (bench/benchlib.py model_path): a file another exporter version wrote is exported again."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from export import EXPORTER_VERSION
from tests.runtime.toy_model import toy_info, write_toy_model

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def benchlib() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_benchlib", BENCH / "benchlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cached_export_of_this_version_is_reused_and_an_older_one_is_not(benchlib: ModuleType,
                                                                            tmp_path: Path) -> None:
    (tmp_path / "fp32").mkdir()
    current = write_toy_model(tmp_path / "fp32" / "toy.onnx", toy_info(exporter_version=EXPORTER_VERSION))
    assert benchlib.exporter_version(current) == EXPORTER_VERSION
    assert benchlib.model_path("toy", "fp32", tmp_path) == current  # no export
    write_toy_model(current, toy_info(exporter_version="0.1.0"))
    assert benchlib.exporter_version(current) == "0.1.0"
    # an older file is not reused: the export is attempted (and "toy" is no encoder the exporter knows)
    with pytest.raises(KeyError, match="unknown encoder 'toy'"):
        benchlib.model_path("toy", "fp32", tmp_path)
