"""EfficientAT MN: official key layout, strict loading of the real mn04 weights, outputs, wrong checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export import efficientat
from export.base import CheckpointError
from export.registry import family_for

# AudioSet class indices (EfficientAT metadata/class_labels_indices.csv)
SINE_WAVE, BEEP, STATIC, WHITE_NOISE, PINK_NOISE = 501, 481, 515, 520, 521
# Parameter counts published with the EfficientAT models (README table, millions)
PUBLISHED_PARAMS_M = {"mn04": 0.983, "mn05": 1.43, "mn10": 4.88, "mn20": 17.91, "mn30": 39.09, "mn40": 68.43}


def test_registry_serves_all_widths() -> None:
    for variant in ("mn04", "mn05", "mn10", "mn20", "mn30", "mn40"):
        assert family_for(variant) is efficientat


@pytest.mark.parametrize("variant", efficientat.VARIANTS)
def test_parameter_count_matches_published(variant: str) -> None:
    count = sum(p.numel() for p in efficientat.MobileNetAudio(variant).parameters())
    assert round(count / 1e6, 2) == pytest.approx(PUBLISHED_PARAMS_M[variant], abs=0.006)


def test_real_mn04_loads_strictly_with_official_keys(mn04_checkpoint: Path) -> None:
    state = torch.load(mn04_checkpoint, map_location="cpu", weights_only=True)
    assert len(state) == 312
    net_state = efficientat.MobileNetAudio("mn04").state_dict()
    assert list(net_state) == list(state)
    assert all(net_state[k].shape == v.shape for k, v in state.items())
    encoder = efficientat.build("mn04", ["embedding"], "time-mean", mn04_checkpoint)
    assert torch.equal(encoder.net.features[16][1].running_var, state["features.16.1.running_var"])


def test_random_checkpoint_has_official_layout_and_perturbed_norms(tmp_path: Path, mn04_checkpoint: Path) -> None:
    path = tmp_path / "r.pt"
    efficientat.write_random_checkpoint(path, "mn04", seed=1)
    state = torch.load(path, map_location="cpu", weights_only=True)
    official = torch.load(mn04_checkpoint, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in official.items()}
    bn = "features.5.block.1.1"
    assert (state[f"{bn}.running_mean"].abs() > 1e-3).any()
    assert (state[f"{bn}.running_var"] - 1).abs().max() > 0.1
    assert (state[f"{bn}.weight"] - 1).abs().max() > 0.1
    assert state[f"{bn}.bias"].abs().max() > 0.1
    assert state["features.5.block.2.conc_se_layers.0.fc1.bias"].abs().max() > 0.1
    again = tmp_path / "r2.pt"
    efficientat.write_random_checkpoint(again, "mn04", seed=1)
    reloaded = torch.load(again, map_location="cpu", weights_only=True)
    assert all(torch.equal(v, reloaded[k]) for k, v in state.items())


def test_norm_statistics_matter_for_outputs() -> None:
    """Resetting the BatchNorms to identity moves outputs far more than the 1e-4 verification bound."""
    encoder = efficientat.build("mn04", ["layer_4", "embedding"], "time-mean", None, seed=2)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 320000)).astype(np.float32) * 0.1)
    with torch.no_grad():
        before = encoder(wave)
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
        after = encoder(wave)
    for b, a in zip(before, after, strict=True):
        assert float((b - a).abs().max() / b.abs().max()) > 1e-2


def test_output_dims_and_shapes_agree(mn04_checkpoint: Path) -> None:
    layers = efficientat.available_layers("mn04")
    encoder = efficientat.build("mn04", layers, "time-mean", mn04_checkpoint)
    wave = torch.zeros(2, efficientat.WINDOW_SAMPLES)
    with torch.no_grad():
        outputs = encoder(wave)
    assert [tuple(o.shape) for o in outputs] == [(2, d) for d in encoder.dims]
    dims = dict(zip(layers, encoder.dims, strict=True))
    assert dims["layer_1"] == 64 * 8 and dims["layer_8"] == 8 * 32 and dims["layer_12"] == 8 * 48
    assert dims["layer_15"] == 4 * 64 and dims["layer_16"] == 4 * 384 and dims["embedding"] == 384


def test_layer_output_is_time_mean_of_feature_map(mn04_checkpoint: Path) -> None:
    encoder = efficientat.build("mn04", ["layer_7", "embedding"], "time-mean", mn04_checkpoint)
    wave = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 320000)).astype(np.float32) * 0.1)
    with torch.no_grad():
        layer7, embedding = encoder(wave)
        maps = encoder.net.feature_maps(encoder.frontend(wave).unsqueeze(1), 16)
    c, f, _ = efficientat.map_shapes("mn04")[7]
    expected = maps[7].mean(dim=3)  # [B, C, F] -> flattened frequency-major [F, C]
    torch.testing.assert_close(layer7, expected.permute(0, 2, 1).reshape(2, f * c))
    torch.testing.assert_close(embedding, maps[16].mean(dim=(2, 3)))
    spatial = efficientat.build("mn04", ["layer_7"], "spatial", mn04_checkpoint)
    with torch.no_grad():
        (pooled,) = spatial(wave)
    torch.testing.assert_close(pooled, maps[7].mean(dim=(2, 3)))


def test_real_mn04_tags_tone_and_noise_like_audioset(mn04_checkpoint: Path) -> None:
    encoder = efficientat.build("mn04", ["embedding"], "time-mean", mn04_checkpoint)
    t = np.arange(320000) / 32000
    tone = 0.3 * np.sin(2 * np.pi * 1000 * t)
    noise = 0.1 * np.random.default_rng(0).standard_normal(t.size)
    with torch.no_grad():
        logits = encoder.logits(torch.tensor(np.stack([tone, noise]), dtype=torch.float32))
    tone_top = set(torch.topk(logits[0], 3).indices.tolist())
    noise_top = set(torch.topk(logits[1], 3).indices.tolist())
    assert SINE_WAVE in tone_top and tone_top & {SINE_WAVE, BEEP}
    assert noise_top & {STATIC, WHITE_NOISE, PINK_NOISE}
    assert logits[0, SINE_WAVE] > logits[1, SINE_WAVE] + 2
    assert logits[1, WHITE_NOISE] > logits[0, WHITE_NOISE] + 2


def test_wider_checkpoint_is_refused_naming_keys(tmp_path: Path) -> None:
    path = tmp_path / "mn10_random.pt"
    efficientat.write_random_checkpoint(path, "mn10")
    with pytest.raises(CheckpointError) as info:
        efficientat.build("mn04", ["embedding"], "time-mean", path)
    message = str(info.value)
    assert str(path) in message
    assert "shape mismatch" in message and "features.0.0.weight (16, 1, 3, 3) != (8, 1, 3, 3)" in message


def test_foreign_family_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "beats_like.pt"
    torch.save(
        {"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4), "features.0.0.weight": torch.zeros(8, 1, 3, 3)},
        path,
    )
    with pytest.raises(CheckpointError) as info:
        efficientat.build("mn04", ["layer_1"], "time-mean", path)
    message = str(info.value)
    assert str(path) in message
    assert "unexpected: encoder.layers.0.self_attn.k_proj.weight" in message
    assert "missing: features.0.1.weight" in message


def test_truncated_and_non_checkpoint_files_are_refused(tmp_path: Path, mn04_checkpoint: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(mn04_checkpoint.read_bytes()[:100_000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    pickled_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], pickled_list)
    for path, reason in (
        (truncated, "truncated"),
        (text, "not a torch checkpoint"),
        (pickled_list, "not a state_dict"),
    ):
        with pytest.raises(CheckpointError, match=reason) as info:
            efficientat.build("mn04", ["layer_1"], "time-mean", path)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        efficientat.build("mn04", ["layer_1"], "time-mean", tmp_path / "absent.pt")


def test_unknown_layer_and_variant_are_refused() -> None:
    with pytest.raises(ValueError, match="layer_17"):
        efficientat.build("mn04", ["layer_17"], "time-mean", None)
    with pytest.raises(ValueError, match="mn07"):
        efficientat.available_layers("mn07")
