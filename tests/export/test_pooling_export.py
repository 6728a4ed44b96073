"""Several poolings from one export: output names, dims, metadata, ONNX vs PyTorch per output, runtime reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_agent.model.encoder import Encoder
from edge_agent.model_info import INPUT_NAME, ModelInfo
from export import beats, ced, efficientat
from export.cli import main
from export.onnx_export import MAX_REL_ERROR, ExportError, ExportResult, export_model, read_model_info
from export.pooling import Poolings

from .pooling_reference import reference_pool, rel_error

MN04_POOLINGS = ("time-mean", "time-meanstd", "time-max", "gem", "time-delta")
MN04_LAYERS = ("layer_11", "layer_12", "embedding")


def _audio(batch: int, samples: int, seed: int = 11) -> np.ndarray:
    """Noise at two levels with a silent stretch: the verification audio is another one."""
    rng = np.random.default_rng(seed)
    wave = rng.standard_normal((batch, samples)) * np.linspace(0.3, 0.01, batch)[:, None]
    wave[:, samples // 10: samples // 8] = 0.0
    return wave.astype(np.float32)


def _run(path: Path, names: tuple[str, ...], audio: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(list(names), {INPUT_NAME: audio}), strict=True))


def _check_against_torch(result: ExportResult, model: torch.nn.Module, audio: np.ndarray) -> dict[str, np.ndarray]:
    """Every output: the exporter's own per-output verification and an independent one on other audio."""
    info = result.info
    assert result.output_rel_errors is not None and list(result.output_rel_errors) == list(info.layers)
    assert all(error < MAX_REL_ERROR for error in result.output_rel_errors.values()), result.output_rel_errors
    got = _run(result.path, info.layers, audio)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(audio))]
    for (name, g), e, dim in zip(got.items(), expected, info.dims, strict=True):
        assert g.shape == e.shape == (audio.shape[0], dim), name
        assert rel_error(g, e) < MAX_REL_ERROR, name
    return got


@pytest.fixture(scope="module")
def mn04_poolings(tmp_path_factory: pytest.TempPathFactory, mn04_checkpoint: Path) -> ExportResult:
    return export_model("mn04", tmp_path_factory.mktemp("mn04_poolings"), checkpoint=mn04_checkpoint,
                        layers=MN04_LAYERS, pooling=MN04_POOLINGS)


def test_mn04_outputs_and_metadata(mn04_poolings: ExportResult) -> None:
    info = mn04_poolings.info
    assert info.layers == (
        "layer_11", "layer_11@meanstd", "layer_11@max", "layer_11@gem", "layer_11@delta",
        "layer_12", "layer_12@meanstd", "layer_12@max", "layer_12@gem", "layer_12@delta",
        "embedding",
    )
    assert info.dims == (384, 768, 384, 384, 384) * 2 + (384,)  # 8 bands x 48 channels; meanstd twice
    assert info.output_poolings == (*MN04_POOLINGS, *MN04_POOLINGS, "spatial")
    assert info.pooling == "time-mean" and info.gem_p == 3.0
    assert info.default_layers == ("layer_11", "layer_12")
    proto = onnx.load(str(mn04_poolings.path))
    assert [o.name for o in proto.graph.output] == list(info.layers)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["output_poolings"] == ",".join(info.output_poolings) and props["gem_p"] == "3.0"
    assert props["pooling"] == "time-mean" and props["layers"] == ",".join(info.layers)
    assert read_model_info(mn04_poolings.path) == info == ModelInfo.from_metadata(props)


def test_mn04_every_output_matches_pytorch_and_the_formulas(mn04_poolings: ExportResult,
                                                            mn04_checkpoint: Path) -> None:
    info = mn04_poolings.info
    model = efficientat.build("mn04", MN04_LAYERS, Poolings(MN04_POOLINGS), mn04_checkpoint)
    assert model.output_names == info.layers and model.dims == info.dims
    audio = _audio(3, efficientat.WINDOW_SAMPLES)
    got = _check_against_torch(mn04_poolings, model, audio)
    # each output is its pooling of its block's map, by the definitions (float64)
    with torch.no_grad():
        maps = model.net.feature_maps(model.frontend(torch.from_numpy(audio)).unsqueeze(1), 16)
    for name, pooling in zip(info.layers, info.output_poolings, strict=True):
        block = 16 if name == "embedding" else int(name.split("@")[0].removeprefix("layer_"))
        grid = maps[block].permute(0, 3, 2, 1).numpy()  # [B, C, F, T] -> [B, T, F, C]
        assert rel_error(got[name], reference_pool(grid, pooling, 3.0)) < MAX_REL_ERROR, name
    # the plain names are what a single time-mean export gives (existing banks and configs name them)
    single = efficientat.build("mn04", MN04_LAYERS, "time-mean", mn04_checkpoint)
    with torch.no_grad():
        plain = dict(zip(single.output_names, single(torch.from_numpy(audio)), strict=True))
    for name in MN04_LAYERS:
        assert rel_error(got[name], plain[name].numpy()) < MAX_REL_ERROR, name


def test_runtime_encoder_reads_the_pooled_outputs(mn04_poolings: ExportResult) -> None:
    encoder = Encoder(mn04_poolings.path, providers=["cpu"])
    assert encoder.info == mn04_poolings.info
    out = encoder.embed(_audio(2, efficientat.WINDOW_SAMPLES))
    assert list(out) == list(mn04_poolings.info.layers)
    assert out["layer_12@meanstd"].shape == (2, 768) and out["layer_12@gem"].shape == (2, 384)
    assert out["layer_12@delta"].shape == (2, 384) and np.all(out["layer_12@delta"] >= 0)
    assert encoder.info.output_pooling("layer_12@delta") == "time-delta"
    assert encoder.info.output_pooling("layer_11@max") == "time-max"
    assert encoder.info.dim("layer_12@meanstd") == 768


def test_old_file_without_pooling_metadata_reads_as_before(tmp_path: Path) -> None:
    result = export_model("mn04", tmp_path, random_init=True, layers=["layer_2", "embedding"], verify=False)
    assert result.info.output_poolings == ("time-mean", "spatial") and result.info.gem_p is None
    proto = onnx.load(str(result.path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ("output_poolings", "gem_p")]
    assert len(kept) == len(proto.metadata_props) - 1  # no gem_p without gem
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = Encoder(tmp_path / "old.onnx", providers=["cpu"]).info
    assert old.layers == ("layer_2", "embedding") and old.dims == result.info.dims
    assert old.pooling == "time-mean" and old.output_poolings == ("time-mean", "time-mean") and old.gem_p is None
    assert not old.mismatches(result.info) and not result.info.mismatches(old)


def test_ced_tiny_meanstd_first_and_gem(tmp_path: Path) -> None:
    """ced-tiny, random weights: the first pooling (time-meanstd here) owns the plain names."""
    poolings = ("time-meanstd", "gem", "time-mean", "time-delta")
    result = export_model("ced-tiny", tmp_path, random_init=True, seed=2, layers=["layer_2", "layer_7"],
                          pooling=poolings, gem_p=2.5)
    info = read_model_info(result.path)
    assert info == result.info
    assert info.layers == ("layer_2", "layer_2@gem", "layer_2@mean", "layer_2@delta",
                           "layer_7", "layer_7@gem", "layer_7@mean", "layer_7@delta")
    assert info.dims == (1536, 768, 768, 768) * 2 and info.output_poolings == poolings * 2
    assert info.pooling == "time-meanstd" and info.gem_p == 2.5
    assert info.default_layers == ("layer_7",)  # the family default present (layer_10 is not exported)
    checkpoint = tmp_path / "ced-tiny.random-seed2.pt"
    model = ced.build("ced-tiny", ["layer_2", "layer_7"], Poolings(poolings, 2.5), checkpoint)
    audio = _audio(2, ced.WINDOW_SAMPLES)
    got = _check_against_torch(result, model, audio)
    with torch.no_grad():
        grids = model.token_grids(torch.from_numpy(audio))
    for name, pooling in zip(info.layers, info.output_poolings, strict=True):
        grid = grids[int(name.split("@")[0].removeprefix("layer_")) - 1].numpy()
        assert rel_error(got[name], reference_pool(grid, pooling, 2.5)) < MAX_REL_ERROR, name
    means, stds = got["layer_7"][:, :768], got["layer_7"][:, 768:]
    np.testing.assert_allclose(means, got["layer_7@mean"], rtol=1e-5, atol=1e-6)  # meanstd = [means, stds]
    assert np.all(stds >= 0) and stds.std() > 0


@pytest.mark.slow
def test_beats_meanstd_gem_max_delta(tmp_path: Path) -> None:
    """BEATs, random weights, one block (the graph stops there): four poolings of layer_1."""
    result = export_model("beats", tmp_path, random_init=True, seed=2, layers=["layer_1"],
                          pooling=["time-meanstd", "gem", "time-max", "time-delta"])
    info = result.info
    assert info.layers == ("layer_1", "layer_1@gem", "layer_1@max", "layer_1@delta")
    assert info.dims == (12288, 6144, 6144, 6144)
    assert info.output_poolings == ("time-meanstd", "gem", "time-max", "time-delta") and info.gem_p == 3.0
    assert info.default_layers == ("layer_1",)
    model = beats.build("beats", ["layer_1"], Poolings(("time-meanstd", "gem", "time-max", "time-delta")),
                        tmp_path / "beats.random-seed2.pt")
    audio = _audio(2, beats.WINDOW_SAMPLES)
    got = _check_against_torch(result, model, audio)
    with torch.no_grad():
        (grid,) = model.token_grids(torch.from_numpy(audio))
    for name, pooling in zip(info.layers, info.output_poolings, strict=True):
        assert rel_error(got[name], reference_pool(grid.numpy(), pooling, 3.0)) < MAX_REL_ERROR, name


def test_cli_poolings_and_gem_p(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["mn04", "--random-init", "--out", str(tmp_path), "--layers", "layer_2,embedding",
                 "--poolings", "time-max, gem", "--gem-p", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "(efficientat mn04, fp32, poolings time-max, gem p=4)" in printed
    assert "outputs: layer_2 [512], layer_2@gem [512], embedding [384]" in printed
    info = read_model_info(tmp_path / "mn04.onnx")
    assert info.output_poolings == ("time-max", "gem", "spatial") and info.gem_p == 4.0
    assert info.default_layers == ("layer_2", "embedding")  # no family default exported: the plain outputs
    assert main(["mn04", "--random-init", "--out", str(tmp_path), "--layers", "layer_2", "--pooling", "time-max",
                 "--no-verify"]) == 0
    assert "time-max pooling" in capsys.readouterr().out
    assert read_model_info(tmp_path / "mn04.onnx").output_poolings == ("time-max",)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--poolings", "time-mean,time-median"], "'time-median' is not one of"),
        (["--poolings", "time-mean,time-mean"], "poolings repeat"),
        (["--poolings", "gem", "--gem-p", "0.5"], "gem p 0.5 must be a number in [1, 6]"),
        (["--layers", "layer_2@max"], "no layer layer_2@max"),
    ],
)
def test_cli_pooling_errors(args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mn04", "--random-init", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "mn04.onnx").exists()


def test_pooling_and_poolings_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["mn04", "--random-init", "--out", str(tmp_path), "--pooling", "time-max", "--poolings", "gem"])


def test_export_model_refuses_bad_poolings(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="non-empty"):
        export_model("mn04", tmp_path, random_init=True, pooling=[])
    with pytest.raises(ExportError, match="gem p"):
        export_model("mn04", tmp_path, random_init=True, pooling=["gem"], gem_p=float("nan"))
