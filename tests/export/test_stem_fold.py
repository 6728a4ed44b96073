"""The stem fold (export/stem_fold.py): the same maps as the official graph, where it applies, and refused elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import efficientat
from export.onnx_export import ExportError, export_model
from export.stem_fold import HARDSWISH_MIN, StemFold, foldable


def _wave(batch: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal((batch, 320000)) * scale).astype(np.float32))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_real_mn04_folded_outputs_equal_the_official_graph(mn04_checkpoint: Path, scale: float) -> None:
    layers = efficientat.available_layers("mn04")
    official = efficientat.build("mn04", layers, "time-mean", mn04_checkpoint, stem="official")
    folded = efficientat.build("mn04", layers, "time-mean", mn04_checkpoint)
    assert (official.stem, folded.stem) == ("official", "folded")
    wave = _wave(2, 7, scale)
    with torch.no_grad():
        for name, a, b in zip(layers, folded(wave), official(wave), strict=True):
            assert _max_rel(a, b) < 1e-5, name


def test_fold_passes_the_hardswish_minimum_through(mn04_checkpoint: Path) -> None:
    """The identity half carries s + 3/8 through a ReLU: exact only because hardswish never goes below -3/8. Loud
    audio drives the stem into that corner; the maps still agree."""
    net = efficientat.build("mn04", ["layer_3"], "time-mean", mn04_checkpoint, stem="official").net
    image = torch.randn(2, 1, 128, 200, generator=torch.Generator().manual_seed(0)) * 20
    fold = StemFold(net.features, keep_block_1=True)
    with torch.no_grad():
        stem = net.features[0](image)
        block_1 = net.features[1](stem)
        block_2 = net.features[2](block_1)
        folded_1, folded_2 = fold(image)
    assert float(stem.min()) == pytest.approx(HARDSWISH_MIN, abs=1e-3)  # the corner is reached
    assert folded_1 is not None
    assert _max_rel(folded_1, block_1) < 1e-5 and _max_rel(folded_2, block_2) < 1e-5
    without = StemFold(net.features, keep_block_1=False)
    with torch.no_grad():
        none, again = without(image)
    assert none is None and torch.equal(again, folded_2)


def test_mn05_random_weights_fold_too() -> None:
    layers = ["layer_1", "layer_2", "layer_5"]
    official = efficientat.build("mn05", layers, "time-mean", None, seed=3, stem="official")
    folded = efficientat.build("mn05", layers, "time-mean", None, seed=3)
    assert folded.stem == "folded"
    wave = _wave(1, 2)
    with torch.no_grad():
        for name, a, b in zip(layers, folded(wave), official(wave), strict=True):
            assert _max_rel(a, b) < 1e-5, name


def test_where_the_fold_applies() -> None:
    assert foldable(efficientat.MobileNetAudio("mn04").features)
    assert foldable(efficientat.MobileNetAudio("mn05").features)
    assert not foldable(efficientat.MobileNetAudio("mn10").features)  # 16 channels: folding only adds work
    assert efficientat.build("mn10", ["layer_3"], "time-mean", None).stem == "official"
    # only layer_1: block 2 is not needed, so nothing to fold into
    assert efficientat.build("mn04", ["layer_1"], "time-mean", None).stem == "official"
    with pytest.raises(ValueError, match="block 1 has 16 channels"):
        efficientat.build("mn10", ["layer_3"], "time-mean", None, stem="folded")
    with pytest.raises(ValueError, match="no output here needs it"):
        efficientat.build("mn04", ["layer_1"], "time-mean", None, stem="folded")
    with pytest.raises(ValueError, match="stem 'fused' is not one of"):
        efficientat.build("mn04", ["layer_3"], "time-mean", None, stem="fused")


def test_export_records_the_stem_and_refuses_what_does_not_apply(tmp_path: Path) -> None:
    folded = export_model("mn04", tmp_path / "f", random_init=True, layers=["layer_1", "layer_4"])
    official = export_model("mn04", tmp_path / "o", random_init=True, layers=["layer_1", "layer_4"], stem="official")
    assert folded.info.extra["stem"] == "folded" and official.info.extra["stem"] == "official"
    assert folded.max_rel_error is not None and folded.max_rel_error < 1e-4
    audio = _wave(2, 11).numpy()
    outputs = [ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"]).run(None, {"waveform": audio})
               for r in (folded, official)]
    for a, b in zip(*outputs, strict=True):
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 1e-5
    with pytest.raises(ExportError, match=r"mn10: .*block 1 has 16 channels"):
        export_model("mn10", tmp_path / "w", random_init=True, layers=["layer_3"], stem="folded")
    with pytest.raises(ExportError, match="stem 'fused' is not available; choose one of folded, official"):
        export_model("mn04", tmp_path / "x", random_init=True, stem="fused")
    with pytest.raises(ExportError, match="the ced network has one graph"):
        export_model("ced-tiny", tmp_path / "c", random_init=True, stem="official")
    assert not (tmp_path / "w" / "mn10.onnx").exists() and not (tmp_path / "c" / "ced-tiny.onnx").exists()
