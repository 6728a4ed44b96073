"""bench/gpu.py on a CPU-only machine: provider detection, "n/a" cells, --require-gpu, and the CPU fallback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.model.encoder import Encoder
from export import EXPORTER_VERSION

from .toy_model import WINDOW, toy_info, write_toy_model

BENCH = Path(__file__).resolve().parents[2] / "bench"
CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # gpu.py imports its sibling benchlib, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def toy_models(tmp_path: Path) -> Path:
    """<dir>/<precision>/toy.onnx as benchlib.model_path finds them (no export: this exporter version wrote them)."""
    for precision in ("fp32", "fp16"):
        (tmp_path / precision).mkdir()
        write_toy_model(tmp_path / precision / "toy.onnx", toy_info(exporter_version=EXPORTER_VERSION))
    return tmp_path


def test_provider_detection(gpu: ModuleType) -> None:
    assert gpu.detect(CPU_ONLY) == {"cpu": True, "cuda": False, "tensorrt": False}
    assert gpu.missing_gpu(gpu.detect(CPU_ONLY)) == ["CUDAExecutionProvider", "TensorrtExecutionProvider"]
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu.missing_gpu(gpu.detect(both)) == []
    assert gpu.missing_gpu(gpu.detect(both[1:])) == ["TensorrtExecutionProvider"]
    assert gpu.detect() == gpu.detect(ort.get_available_providers())


def test_missing_gpu_providers_give_na_cells_and_exit_0(gpu: ModuleType, toy_models: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = gpu.main(["--encoders", "toy", "--batch", "1,4", "--repeats", "2", "--no-agent",
                     "--models-dir", str(toy_models)], available=CPU_ONLY)
    assert code == 0
    out = capsys.readouterr().out
    assert "onnxruntime.get_available_providers(): ['AzureExecutionProvider', 'CPUExecutionProvider']" in out
    assert "GPU: " in out and "machine: " in out
    assert "missing providers: CUDAExecutionProvider, TensorrtExecutionProvider" in out
    rows = [line for line in out.splitlines() if line.startswith("| toy |")]
    assert len(rows) == 6  # fp32, fp16 x cpu, cuda, tensorrt
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 + 1 + 2 + 1
        if cells[2] == "cpu":
            assert cells[3].endswith(" ms") and cells[4].endswith(" /s") and cells[5].endswith(" /s")
        else:
            assert cells[3:6] == ["n/a (provider missing)"] * 3


def test_require_gpu_exits_2_naming_the_missing_provider(gpu: ModuleType, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--require-gpu", "--encoders", "toy", "--models-dir", str(tmp_path), "--no-agent"]
    assert gpu.main(args, available=CPU_ONLY) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "CUDAExecutionProvider" in err and "TensorrtExecutionProvider" in err
    assert gpu.main(args, available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == 2
    err = capsys.readouterr().err.strip()
    assert "TensorrtExecutionProvider" in err and "missing execution provider(s) CUDA" not in err


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is present here")
def test_cuda_request_falls_back_to_cpu_and_runs(gpu: ModuleType, tmp_path: Path) -> None:
    path = write_toy_model(tmp_path / "toy.onnx", toy_info())
    encoder = Encoder(path, providers=["cuda"])  # logs provider_unavailable, does not raise
    assert encoder.providers == ["CPUExecutionProvider"]
    windows = np.random.default_rng(0).standard_normal((2, WINDOW)).astype(np.float32)
    np.testing.assert_allclose(encoder.embed(windows)["layer_1"], windows.reshape(2, 100, 16).mean(axis=1),
                               rtol=1e-5, atol=1e-6)
    # the bench does not time such a session as a GPU number
    assert gpu.measure_provider(path, "cuda", [1], 1) == {"error": gpu.FALLBACK, "used": ["CPUExecutionProvider"]}
