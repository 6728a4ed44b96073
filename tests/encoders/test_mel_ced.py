"""The CED front-end against an independent float64 reference of torchaudio's MelSpectrogram +
AmplitudeToDB(top_db=120) + eval BatchNorm, with top_db taken per clip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.mel_ced import STFT_METHODS, MelCED, num_frames

SAMPLES = 160000
TOLERANCE_DB = 1e-3  # max |ours - reference| in dB; measured ~1e-4 (float32 DFT rounding on quiet bins)


def reference_db(wave: np.ndarray, *, center: bool = True, periodic: bool = True, slaney: bool = False,
                 top_db: float | None = 120.0) -> np.ndarray:
    """[64, T] dB features in float64, one clip (so top_db is per clip)."""
    x = wave.astype(np.float64)
    if center:
        x = np.pad(x, 256, mode="reflect")
    count = 1 + (len(x) - 512) // 160
    frames = np.stack([x[i * 160 : i * 160 + 512] for i in range(count)])
    n = np.arange(512)
    frames = frames * (0.5 - 0.5 * np.cos(2 * math.pi * n / (512 if periodic else 511)))
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [T, 257]

    if slaney:  # librosa's default scale: linear below 1 kHz, logarithmic above
        def to_mel(f: np.ndarray) -> np.ndarray:
            f = np.asarray(f, dtype=np.float64)
            return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / math.log(6.4))

        def to_hz(m: np.ndarray) -> np.ndarray:
            return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * math.log(6.4) / 27))
    else:
        def to_mel(f: np.ndarray) -> np.ndarray:
            return 2595 * np.log10(1 + np.asarray(f, dtype=np.float64) / 700)

        def to_hz(m: np.ndarray) -> np.ndarray:
            return 700 * (10 ** (m / 2595) - 1)

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(8000.0), 66))
    freqs = np.arange(257) * 8000.0 / 256
    banks = np.zeros((257, 64))
    for m in range(64):
        up = (freqs - edges[m]) / (edges[m + 1] - edges[m])
        down = (edges[m + 2] - freqs) / (edges[m + 2] - edges[m + 1])
        banks[:, m] = np.maximum(0, np.minimum(up, down))
    db = 10 * np.log10(np.maximum(power @ banks, 1e-10)).T
    if top_db is not None:
        db = np.maximum(db, db.max() - top_db)
    return db


def _audio(seed: int, level: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / 16000.0
    wave = level * (rng.standard_normal(SAMPLES) + 2 * np.sin(2 * math.pi * 440.0 * t))
    wave[20000:30000] = 0.0  # digital silence: -100 dB before the top_db clamp
    return wave.astype(np.float32)


@pytest.fixture(scope="module", params=STFT_METHODS)
def frontend(request: pytest.FixtureRequest) -> MelCED:
    """Every test runs on both STFT formulations: the split DFT (the default) and the direct MatMul."""
    return MelCED(SAMPLES, request.param)


def test_frame_count_is_center_true() -> None:
    assert num_frames(SAMPLES) == 1001


@pytest.mark.parametrize("samples", [257, 1000, 16007, SAMPLES + 80])
def test_split_and_direct_dft_agree_on_any_length(samples: int) -> None:
    wave = _audio(5, 0.1)[:samples] if samples <= SAMPLES else np.resize(_audio(5, 0.1), samples)
    with torch.no_grad():
        split, direct = (MelCED(samples, stft).decibels(torch.from_numpy(wave[None]))[0].numpy()
                         for stft in ("fft", "matmul"))
    assert split.shape == direct.shape == (64, num_frames(samples))
    assert np.abs(split - reference_db(wave)).max() < TOLERANCE_DB
    assert np.abs(split - direct).max() < TOLERANCE_DB
    with pytest.raises(ValueError, match="stft"):
        MelCED(samples, "conv")
    with pytest.raises(ValueError, match="too short"):
        MelCED(256, "fft")


def test_decibels_match_float64_reference(frontend: MelCED) -> None:
    wave = _audio(0, 0.1)
    with torch.no_grad():
        ours = frontend.decibels(torch.from_numpy(wave[None]))[0].numpy()
    reference = reference_db(wave)
    assert ours.shape == reference.shape == (64, 1001)
    assert np.abs(ours - reference).max() < TOLERANCE_DB
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-5


@pytest.mark.parametrize(
    "mutation",
    [{"center": False}, {"periodic": False}, {"slaney": True}, {"top_db": None}],
    ids=lambda m: next(iter(m)),
)
def test_each_setting_is_pinned(frontend: MelCED, mutation: dict) -> None:
    wave = _audio(0, 0.1)
    with torch.no_grad():
        ours = frontend.decibels(torch.from_numpy(wave[None]))[0].numpy()
    mutated = reference_db(wave, **mutation)
    if mutated.shape != ours.shape:  # center=False gives 997 frames
        assert mutated.shape[1] == 997
        mutated = mutated[:, :997]
        ours = ours[:, 2:999]  # the nearest alignment still differs
    assert np.abs(ours - mutated).max() > 100 * TOLERANCE_DB


def test_top_db_is_per_clip_not_per_batch(frontend: MelCED) -> None:
    loud, quiet = _audio(1, 0.5), _audio(2, 1e-4)
    with torch.no_grad():
        batch = frontend.decibels(torch.from_numpy(np.stack([loud, quiet]))).numpy()
        alone = frontend.decibels(torch.from_numpy(quiet[None])).numpy()
    assert np.abs(batch[1] - alone[0]).max() < 1e-4
    assert np.abs(batch[1] - reference_db(quiet)).max() < TOLERANCE_DB
    # the loud clip's silent stretch sits at its own max - 120 dB: the clamp is active ...
    assert np.isclose(batch[0].min(), batch[0].max() - 120.0, atol=1e-3)
    # ... and a batch-wide clamp (torchaudio's) would have moved the quiet clip by many dB
    batch_wide = np.maximum(reference_db(quiet, top_db=None), batch[0].max() - 120.0)
    assert np.abs(batch_wide - batch[1]).max() > 1.0


def test_batchnorm_uses_running_statistics(frontend: MelCED) -> None:
    rng = np.random.default_rng(3)
    weight, bias = rng.uniform(0.5, 1.5, 64), rng.normal(0, 0.5, 64)
    mean, var = rng.normal(-20, 8, 64), rng.uniform(40, 200, 64)
    module = MelCED(SAMPLES, frontend.stft)
    module.load_batchnorm(*(torch.tensor(v, dtype=torch.float32) for v in (weight, bias, mean, var)))
    wave = _audio(4, 0.05)
    with torch.no_grad():
        ours = module(torch.from_numpy(wave[None]))[0].numpy()
    expected = (reference_db(wave) - mean[:, None]) / np.sqrt(var[:, None] + 1e-5) * weight[:, None] + bias[:, None]
    assert np.abs(ours - expected).max() < 1e-4
