"""BEATs: checkpoint layouts, errors, layer outputs, and the pieces of the architecture that can be pinned
without the official code (relative-position buckets, weight norm, deep-norm scaling).

Full-size BEATs is ~90M parameters, so most tests build the model only up to block 2 (the graph stops at
the deepest requested block) and share one random checkpoint per module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export import beats, ced
from export.base import CheckpointError

SAMPLES = beats.WINDOW_SAMPLES
SHORT = ("layer_1", "layer_2")


@pytest.fixture(scope="module")
def iter3_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("beats") / "BEATs_iter3.pt"
    beats.write_random_checkpoint(path, "beats", seed=11, kind="iter3")
    return path


@pytest.fixture(scope="module")
def finetuned_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("beats_ft") / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
    beats.write_random_checkpoint(path, "beats", seed=11, kind="as2m-finetuned")
    return path


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy((rng.standard_normal((2, SAMPLES)) * np.array([[0.3], [0.02]])).astype(np.float32))


def _run(model: beats.BEATsEncoder, audio: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [out.numpy() for out in model(audio)]


def test_official_layout_on_disk(iter3_file: Path, finetuned_file: Path) -> None:
    payload = torch.load(iter3_file, weights_only=True)
    assert set(payload) == {"cfg", "model"}
    assert payload["cfg"]["deep_norm"] and payload["cfg"]["gru_rel_pos"] and not payload["cfg"]["finetuned_model"]
    assert "encoder.pos_conv.0.weight_g" in payload["model"]
    assert "encoder.layers.11.self_attn.relative_attention_bias.weight" in payload["model"]
    assert not any(key.startswith("predictor.") for key in payload["model"])
    tuned = torch.load(finetuned_file, weights_only=True)
    assert tuned["cfg"]["finetuned_model"] and tuned["model"]["predictor.weight"].shape == (527, 768)


def test_iter3_and_finetuned_layouts_load_to_the_same_encoder(
    iter3_file: Path, finetuned_file: Path, audio: torch.Tensor
) -> None:
    """Same seed, same encoder tensors: the predictor head of the fine-tuned layout is ignored."""
    plain = _run(beats.build("beats", SHORT, "time-mean", iter3_file), audio)
    tuned = _run(beats.build("beats", SHORT, "time-mean", finetuned_file), audio)
    random = _run(beats.build("beats", SHORT, "time-mean", None, seed=11), audio)
    for a, b, c in zip(plain, tuned, random, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_layer_outputs_and_dims(iter3_file: Path, audio: torch.Tensor) -> None:
    model = beats.build("beats", ("layer_2", "layer_1"), "time-mean", iter3_file)
    assert model.output_names == ("layer_2", "layer_1")
    assert model.dims == (6144, 6144)
    with torch.no_grad():
        grids = model.token_grids(audio)
        outputs = model(audio)
    assert len(grids) == 2 and grids[0].shape == (2, 62, 8, 768)
    assert torch.allclose(outputs[0], grids[1].mean(dim=1).reshape(2, -1))
    assert torch.allclose(outputs[1], grids[0].mean(dim=1).reshape(2, -1))
    spatial = beats.build("beats", ("layer_1",), "spatial", iter3_file)
    assert spatial.dims == (768,)


def test_a_shallower_graph_gives_the_same_layer(iter3_file: Path, audio: torch.Tensor) -> None:
    deep = _run(beats.build("beats", ("layer_1", "layer_3"), "time-mean", iter3_file), audio)
    shallow = _run(beats.build("beats", ("layer_1",), "time-mean", iter3_file), audio)
    assert np.array_equal(deep[0], shallow[0])


def test_batched_and_single_clip_agree(iter3_file: Path, audio: torch.Tensor) -> None:
    model = beats.build("beats", SHORT, "time-mean", iter3_file)
    batched = _run(model, audio)
    single = _run(model, audio[1:])
    for a, b in zip(batched, single, strict=True):
        assert np.abs(a[1:] - b).max() <= 1e-5 * np.abs(b).max()


def test_defaults_follow_the_genrep_dcase_2025_pairing_with_ld_domain() -> None:
    assert beats.default_layers("beats") == ("layer_11", "layer_12")
    assert beats.default_exported_layers("beats") == tuple(f"layer_{i}" for i in range(1, 13))


def test_relative_position_buckets_match_the_t5_formula() -> None:
    buckets = beats.relative_position_buckets(496, 320, 800).numpy()

    def bucket(relative: int) -> int:
        base = 160 if relative > 0 else 0
        distance = abs(relative)
        if distance < 80:
            return base + distance
        return base + min(159, 80 + int(math.log(distance / 80) / math.log(800 / 80) * 80))

    for i, j in [(0, 0), (0, 1), (1, 0), (0, 79), (0, 80), (80, 0), (0, 81), (0, 200), (300, 5), (0, 495), (495, 0)]:
        assert buckets[i, j] == bucket(j - i), (i, j)
    assert buckets.min() == 0 and buckets.max() < 320


def test_positional_conv_folds_weight_norm(iter3_file: Path) -> None:
    state = torch.load(iter3_file, weights_only=True)["model"]
    model = beats.build("beats", ("layer_1",), "time-mean", iter3_file)
    expected = torch._weight_norm(state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"], 2)
    assert torch.allclose(model.encoder.pos_conv.weight, expected, rtol=1e-6, atol=1e-7)


def test_new_style_weight_norm_keys_load(iter3_file: Path, tmp_path: Path, audio: torch.Tensor) -> None:
    payload = torch.load(iter3_file, weights_only=True)
    state = payload["model"]
    state["encoder.pos_conv.0.parametrizations.weight.original0"] = state.pop("encoder.pos_conv.0.weight_g")
    state["encoder.pos_conv.0.parametrizations.weight.original1"] = state.pop("encoder.pos_conv.0.weight_v")
    torch.save(payload, tmp_path / "resaved.pt")
    a = _run(beats.build("beats", ("layer_1",), "time-mean", iter3_file), audio)
    b = _run(beats.build("beats", ("layer_1",), "time-mean", tmp_path / "resaved.pt"), audio)
    assert np.array_equal(a[0], b[0])


def test_deep_norm_alpha() -> None:
    model = beats.BEATsEncoder(("layer_1",), "time-mean")
    assert model.encoder.layers[0].alpha == pytest.approx((2 * 12) ** 0.25)


def test_ced_file_is_not_a_beats_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audiotransformer_tiny_mAP_4814.pt"
    ced.write_random_checkpoint(path, "ced-tiny")
    with pytest.raises(CheckpointError, match=r"audiotransformer_tiny_mAP_4814\.pt.*'cfg' and 'model'"):
        beats.build("beats", SHORT, "time-mean", path)


def test_wrong_size_names_the_cfg_field(iter3_file: Path, tmp_path: Path) -> None:
    payload = torch.load(iter3_file, weights_only=True)
    payload["cfg"]["encoder_embed_dim"] = 1024
    torch.save(payload, tmp_path / "large.pt")
    with pytest.raises(CheckpointError, match=r"large\.pt.*encoder_embed_dim=1024"):
        beats.build("beats", SHORT, "time-mean", tmp_path / "large.pt")


def test_mismatching_keys_are_listed(iter3_file: Path, tmp_path: Path) -> None:
    payload = torch.load(iter3_file, weights_only=True)
    del payload["model"]["encoder.layers.3.fc1.bias"]
    payload["model"]["encoder.layers.0.fc2.weight"] = torch.zeros(768, 1024)
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as caught:
        beats.build("beats", SHORT, "time-mean", tmp_path / "broken.pt")
    message = str(caught.value)
    assert "broken.pt" in message and "missing encoder.layers.3.fc1.bias" in message
    assert "encoder.layers.0.fc2.weight (768, 1024) != (768, 3072)" in message


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        beats.build("beats", SHORT, "time-mean", tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        beats.build("beats", SHORT, "time-mean", tmp_path / "missing.pt")


def test_unknown_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="layer_13"):
        beats.BEATsEncoder(("layer_13",), "time-mean")
