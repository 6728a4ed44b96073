"""Fit clips to the encoder's fixed window, and cut streams into windows.

Short clips are tiled, never zero-padded: the embedding is a temporal mean, and a silent tail would
shift it towards silence.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def fit_to_window(audio: np.ndarray, window_samples: int) -> np.ndarray:
    """Crop to the first window_samples, or repeat a shorter clip until it fills the window."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [samples], got shape {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError("cannot fit an empty clip to a window")
    if audio.shape[0] >= window_samples:
        return audio[:window_samples]
    repeats = -(-window_samples // audio.shape[0])
    return np.tile(audio, repeats)[:window_samples]


def sliding_windows(
    audio: np.ndarray, window_samples: int, hop_samples: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, window) for every full window of a long recording."""
    if hop_samples <= 0:
        raise ValueError(f"hop must be positive (got {hop_samples})")
    for start in range(0, audio.shape[0] - window_samples + 1, hop_samples):
        yield start, audio[start:start + window_samples]
