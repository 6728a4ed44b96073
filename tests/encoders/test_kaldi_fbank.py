"""The BEATs Kaldi fbank against an independent float64 numpy reference of the Kaldi equations.

Each mutation of the reference (one constant or edge case done differently) must move the output by
far more than our tolerance, so the comparison pins every one of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.kaldi_fbank import KaldiFbank, num_frames

SAMPLES = 160000
EPS32 = float(np.finfo(np.float32).eps)
# max |ours - reference| in normalized fbank units (1 unit = 2 * 6.55582 nats of mel energy).
# Measured: 1.5e-5 on noise; float32 rounding of the DFT grows it on quiet bins next to loud ones.
TOLERANCE = 1e-4


def reference_fbank(wave: np.ndarray, *, window_power: float = 0.85, periodic: bool = False,
                    preemph_first: str = "self", dc_first: bool = True, low_freq: float = 20.0,
                    floor: float = EPS32, scale: float = 32768.0,
                    n_fft: int = 512) -> np.ndarray:
    """Kaldi fbank (snip_edges, povey window, 128 bins, dither 0) then BEATs normalization, float64."""
    x = wave.astype(np.float64) * scale
    count = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160 : i * 160 + 400] for i in range(count)])

    def remove_dc(f: np.ndarray) -> np.ndarray:
        return f - f.mean(axis=1, keepdims=True)

    def preemphasis(f: np.ndarray) -> np.ndarray:
        first = {"self": f[:, :1], "zero": np.zeros_like(f[:, :1])}[preemph_first]
        return f - 0.97 * np.concatenate([first, f[:, :-1]], axis=1)

    frames = preemphasis(remove_dc(frames)) if dc_first else remove_dc(preemphasis(frames))
    n = np.arange(400)
    hann = 0.5 - 0.5 * np.cos(2 * math.pi * n / (400 if periodic else 399))
    frames = frames * hann**window_power
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1 + np.asarray(f, dtype=np.float64) / 700)

    low, high = mel(low_freq), mel(8000.0)
    step = (high - low) / 129
    bin_mel = mel(np.arange(n_fft // 2) * 16000.0 / n_fft)
    banks = np.zeros((128, n_fft // 2 + 1))
    for m in range(128):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        up = (bin_mel - left) / (centre - left)
        down = (right - bin_mel) / (right - centre)
        banks[m, : n_fft // 2] = np.maximum(0.0, np.minimum(up, down))
    energies = power @ banks.T
    return (np.log(np.maximum(energies, floor)) - 15.41663) / (2 * 6.55582)


def _test_audio() -> np.ndarray:
    """Noise with a DC offset, a tone, and a stretch of digital silence (exercises the log floor)."""
    rng = np.random.default_rng(7)
    t = np.arange(SAMPLES) / 16000.0
    wave = 0.05 + 0.1 * rng.standard_normal(SAMPLES) + 0.2 * np.sin(2 * math.pi * 1234.5 * t)
    wave[40000:48000] = 0.0
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def fbank() -> KaldiFbank:
    return KaldiFbank(SAMPLES)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return _test_audio()


@pytest.fixture(scope="module")
def ours(fbank: KaldiFbank, audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fbank(torch.from_numpy(audio[None]))[0].numpy().astype(np.float64)


def test_frame_count_is_snip_edges() -> None:
    assert num_frames(SAMPLES) == 998
    assert num_frames(400) == 1
    assert num_frames(559) == 1 and num_frames(560) == 2


def test_matches_float64_kaldi_reference(ours: np.ndarray, audio: np.ndarray) -> None:
    reference = reference_fbank(audio)
    assert ours.shape == reference.shape == (998, 128)
    assert np.abs(ours - reference).max() < TOLERANCE
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-5


def test_silence_hits_the_float32_eps_floor(fbank: KaldiFbank) -> None:
    with torch.no_grad():
        out = fbank(torch.zeros(1, SAMPLES)).numpy()
    assert np.allclose(out, (math.log(EPS32) - 15.41663) / (2 * 6.55582), atol=1e-6)


def test_constant_offset_is_removed_per_frame(fbank: KaldiFbank) -> None:
    """DC removal comes before pre-emphasis: a constant waveform leaves nothing but the log floor."""
    with torch.no_grad():
        out = fbank(torch.full((1, SAMPLES), 0.25)).numpy()
    assert np.allclose(out, (math.log(EPS32) - 15.41663) / (2 * 6.55582), atol=1e-6)


@pytest.mark.parametrize(
    "mutation",
    [
        {"window_power": 1.0},  # plain Hann instead of povey
        {"periodic": True},  # periodic instead of symmetric Hann
        {"dc_first": False},  # DC removal after pre-emphasis
        {"low_freq": 0.0},  # mel filters from 0 Hz instead of 20 Hz
        {"floor": 1e-10},  # another log floor
        {"scale": 1.0},  # no int16 scaling
        {"n_fft": 400},  # no zero padding to 512
    ],
    ids=lambda m: next(iter(m)),
)
def test_each_constant_is_pinned(ours: np.ndarray, audio: np.ndarray, mutation: dict) -> None:
    mutated = reference_fbank(audio, **mutation)
    assert np.abs(ours - mutated).max() > 100 * TOLERANCE


def test_first_sample_rule_is_invisible_behind_the_povey_window(audio: np.ndarray) -> None:
    """Kaldi pre-emphasizes sample 0 against itself; the window is exactly 0 there, so no variant of
    that rule can change the output (which is why no test can pin it)."""
    same = reference_fbank(audio, preemph_first="zero")
    assert np.abs(same - reference_fbank(audio)).max() < 1e-9


def test_batch_rows_are_independent(fbank: KaldiFbank, audio: np.ndarray) -> None:
    quiet = (0.01 * np.random.default_rng(1).standard_normal(SAMPLES)).astype(np.float32)
    with torch.no_grad():
        batch = fbank(torch.from_numpy(np.stack([audio, quiet]))).numpy()
        single = fbank(torch.from_numpy(quiet[None])).numpy()
    assert np.abs(batch[1] - single[0]).max() < 1e-6
