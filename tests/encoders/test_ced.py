"""CED: both checkpoint layouts, errors, token order, layer outputs, batched vs single-clip agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export import beats, ced
from export.base import CheckpointError

SAMPLES = ced.WINDOW_SAMPLES
LAYERS = ("layer_1", "layer_3", "layer_12")


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ced") / "audiotransformer_tiny_mAP_4814.pt"
    ced.write_random_checkpoint(path, "ced-tiny", seed=4)
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ced_hf") / "model.safetensors"
    ced.write_random_checkpoint(path, "ced-tiny", seed=4)
    return path


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    rng = np.random.default_rng(1)
    wave = rng.standard_normal((2, SAMPLES)) * np.array([[0.5], [1e-3]])
    wave[:, 50000:60000] = 0.0  # silence, so the per-clip top_db clamp is active
    return torch.from_numpy(wave.astype(np.float32))


def _run(model: ced.CEDEncoder, audio: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [out.numpy() for out in model(audio)]


def test_original_layout_on_disk(tiny_pt: Path) -> None:
    state = torch.load(tiny_pt, weights_only=True)
    assert state["time_pos_embed"].shape == (1, 192, 1, 63)
    assert state["freq_pos_embed"].shape == (1, 192, 4, 1)
    assert "init_bn.1.running_var" in state and "front_end.0.mel_scale.fb" in state
    assert state["blocks.11.attn.qkv.weight"].shape == (576, 192)


def test_hf_layout_on_disk(tiny_hf: Path) -> None:
    keys = set(load_file(str(tiny_hf)))
    assert "encoder.init_bn.running_mean" in keys and "encoder.blocks.0.attn.qkv.bias" in keys
    assert "outputlayer.1.weight" in keys and not any(k.startswith("front_end") for k in keys)
    assert json.loads((tiny_hf.parent / "config.json").read_text())["embed_dim"] == 192


def test_both_layouts_give_the_same_model(tiny_pt: Path, tiny_hf: Path, audio: torch.Tensor,
                                          tmp_path: Path) -> None:
    original = _run(ced.build("ced-tiny", LAYERS, "time-mean", tiny_pt), audio)
    hugging = _run(ced.build("ced-tiny", LAYERS, "time-mean", tiny_hf), audio)
    random = _run(ced.build("ced-tiny", LAYERS, "time-mean", None, seed=4), audio)
    torch.save({"model": torch.load(tiny_pt, weights_only=True)}, tmp_path / "wrapped.pt")
    wrapped = _run(ced.build("ced-tiny", LAYERS, "time-mean", tmp_path / "wrapped.pt"), audio)
    for a, b, c, d in zip(original, hugging, random, wrapped, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)


def test_dims_and_frequency_major_tokens(tiny_pt: Path, audio: torch.Tensor) -> None:
    model = ced.build("ced-tiny", LAYERS, "time-mean", tiny_pt)
    assert model.dims == (4 * 192,) * 3
    with torch.no_grad():
        features = model.frontend(audio).unsqueeze(1)
        patches = model.patch_embed.proj(features) + model.time_pos_embed + model.freq_pos_embed
        first = model.blocks[0](patches.flatten(2).transpose(1, 2))  # the official f*62+t order
        grids = model.token_grids(audio)
    assert patches.shape == (2, 192, 4, 62)
    assert grids[0].shape == (2, 62, 4, 192)
    # grid[b, t, f] must be token f * 62 + t
    assert torch.equal(grids[0][:, 5, 2], first[:, 2 * 62 + 5])
    assert torch.equal(grids[0][:, 61, 3], first[:, 3 * 62 + 61])


def test_time_position_table_is_sliced_to_62(tiny_pt: Path) -> None:
    stored = torch.load(tiny_pt, weights_only=True)["time_pos_embed"]
    model = ced.build("ced-tiny", ("layer_1",), "time-mean", tiny_pt)
    assert torch.equal(model.time_pos_embed, stored[..., :62])


def test_batchnorm_comes_from_the_checkpoint(tiny_pt: Path, audio: torch.Tensor) -> None:
    state = torch.load(tiny_pt, weights_only=True)
    model = ced.build("ced-tiny", ("layer_1",), "time-mean", tiny_pt)
    with torch.no_grad():
        db = model.frontend.decibels(audio)
        normed = model.frontend(audio)
    mean, var = state["init_bn.1.running_mean"][:, None], state["init_bn.1.running_var"][:, None]
    weight, bias = state["init_bn.1.weight"][:, None], state["init_bn.1.bias"][:, None]
    expected = (db - mean) / torch.sqrt(var + 1e-5) * weight + bias
    assert torch.allclose(normed, expected, atol=1e-4)


def test_batched_and_single_clip_agree(tiny_pt: Path, audio: torch.Tensor) -> None:
    model = ced.build("ced-tiny", LAYERS, "time-mean", tiny_pt)
    batched = _run(model, audio)
    single = _run(model, audio[1:])
    for a, b in zip(batched, single, strict=True):
        assert np.abs(a[1:] - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("variant,dim", [("ced-mini", 256), ("ced-small", 384), ("ced-base", 768)])
def test_variant_sizes(variant: str, dim: int) -> None:
    shapes = ced.official_shapes(variant)
    assert shapes["patch_embed.proj.weight"] == (dim, 1, 16, 16)
    assert shapes["blocks.11.mlp.fc1.weight"] == (4 * dim, dim)
    assert ced.CEDEncoder(variant, ("layer_7", "layer_10"), "time-mean").dims == (4 * dim, 4 * dim)


def test_wrong_size_names_the_keys(tiny_pt: Path) -> None:
    with pytest.raises(CheckpointError) as caught:
        ced.build("ced-mini", ("layer_1",), "time-mean", tiny_pt)
    message = str(caught.value)
    assert "audiotransformer_tiny_mAP_4814.pt" in message and "ced-mini" in message
    assert "patch_embed.proj.weight (192, 1, 16, 16) != (256, 1, 16, 16)" in message


def test_beats_file_is_not_a_ced_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "BEATs_iter3.pt"
    beats.write_random_checkpoint(path, "beats")
    with pytest.raises(CheckpointError, match=r"BEATs_iter3\.pt.*(not a CED state dict|missing)"):
        ced.build("ced-tiny", ("layer_1",), "time-mean", path)


def test_foreign_state_dict_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "mn04_as.pt"
    torch.save({"features.0.0.weight": torch.zeros(16, 1, 3, 3), "classifier.5.bias": torch.zeros(527)}, path)
    with pytest.raises(CheckpointError) as caught:
        ced.build("ced-tiny", ("layer_1",), "time-mean", path)
    message = str(caught.value)
    assert "mn04_as.pt" in message and "missing init_bn.1.weight" in message
    assert "unexpected features.0.0.weight" in message


def test_other_front_end_settings_are_refused(tiny_pt: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_pt, weights_only=True)
    state["front_end.0.spectrogram.window"] = torch.hann_window(512, periodic=False)
    torch.save(state, tmp_path / "symmetric.pt")
    with pytest.raises(CheckpointError, match=r"front_end\.0\.spectrogram\.window"):
        ced.build("ced-tiny", ("layer_1",), "time-mean", tmp_path / "symmetric.pt")


def test_corrupt_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        ced.build("ced-tiny", ("layer_1",), "time-mean", tmp_path / "model.safetensors")


def test_defaults() -> None:
    assert ced.default_layers("ced-small") == ("layer_7", "layer_10")
    assert len(ced.default_exported_layers("ced-tiny")) == 12
    with pytest.raises(ValueError, match="ced-huge"):
        ced.available_layers("ced-huge")
