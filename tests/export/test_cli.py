"""edge-export end to end: exit codes, printed summary, one line per error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.cli import main
from export.onnx_export import read_model_info


def test_cli_exports_random_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["mn04", "--random-init", "--out", str(tmp_path), "--layers", "layer_8,embedding", "--seed", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'mn04.onnx'}" in printed
    assert "layer_8 [256], embedding [384]" in printed
    assert "verification: max relative error ONNX vs PyTorch" in printed
    info = read_model_info(tmp_path / "mn04.onnx")
    assert info.layers == ("layer_8", "embedding") and info.default_layers == ("layer_8", "embedding")


def test_cli_default_layers_make_a_deployment_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--layers default: the scoring default layers, and only the blocks they need in the graph."""
    code = main(["mn04", "--random-init", "--out", str(tmp_path), "--layers", "default,layer_3,default"])
    assert code == 0
    assert "default layers: layer_6, layer_11, layer_12" in capsys.readouterr().out
    info = read_model_info(tmp_path / "mn04.onnx")
    assert info.layers == ("layer_6", "layer_11", "layer_12", "layer_3")
    assert info.default_layers == ("layer_6", "layer_11", "layer_12")
    blocks = {node.name.split("/")[1] for node in onnx.load(str(tmp_path / "mn04.onnx")).graph.node
              if node.name.startswith(("/features.", "/stem_fold/"))}
    # the stem and blocks 1..12 (the stem, block 1 and block 2 as export/stem_fold.py folds them), no later block,
    # no head
    assert blocks == {"stem_fold", *(f"features.{i}" for i in range(3, 13))}
    assert main(["mn04", "--random-init", "--out", str(tmp_path / "all"), "--layers", "all", "--no-verify"]) == 0
    assert len(read_model_info(tmp_path / "all" / "mn04.onnx").layers) == 17


def test_cli_with_weights_dir_quantized(
    mn04_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = str(mn04_checkpoint.parents[1])
    code = main(
        ["mn04", "--weights-dir", weights, "--out", str(tmp_path), "--layers", "layer_12", "--quantize", "int8"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "int8 vs fp32 ONNX: max relative error" in printed and "CPU latency per window" in printed
    assert read_model_info(tmp_path / "mn04.onnx").extra["precision"] == "int8"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["mn04", "--checkpoint", "{tmp}/missing.pt"], "missing.pt: checkpoint file not found"),
        (["mn04", "--random-init", "--layers", "layer_0"], "no layer layer_0"),
        (["mn04", "--random-init", "--layers", "defaults"], "(or default: the scoring default layers, all: every"),
        (["mn04", "--random-init", "--layers", " , ,"], "--layers names nothing (got ' , ,')"),
        (["mn04", "--random-init", "--poolings", ","], "--poolings names nothing (got ',')"),
        (["mn04", "--random-init", "--layers", "default,layer_3,layer_3"],
         "repeat: layer_6, layer_11, layer_12, layer_3, layer_3"),
        (["nope", "--random-init"], "unknown encoder 'nope'"),
        (["mn20"], "no pinned sha256"),
        (["ced-tiny", "--random-init", "--stft", "conv"], "ced-tiny: stft 'conv' is not available"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path), "--no-download"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "mn04.onnx").exists()


def test_cli_wrong_checkpoint_subprocess(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "export.cli", "mn04", "--checkpoint", str(bogus), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edge-export: error: {bogus}: not a torch checkpoint (no complete zip archive: truncated or another format)"
    ]
