"""Audio files -> windows at the model rate -> embeddings, in batches (offline enroll/score/evaluate)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edge_agent.audio.resample import resample
from edge_agent.audio.wavio import read_wav
from edge_agent.audio.windowing import Window, fit_to_window, sliding_windows
from edge_agent.errors import AudioError
from edge_agent.model.encoder import Encoder


def audio_files(inputs: Iterable[Path]) -> list[Path]:
    """WAV files named directly or found (recursively, sorted) in the named directories."""
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()))
        elif item.is_file():
            found.append(item)
        else:
            raise AudioError(f"{item}: no such file or directory")
    return found


def file_windows(path: Path, encoder: Encoder, hop_s: float | None = None) -> Iterator[Window]:
    """Windows of one file at the model rate.

    hop_s None: a clip up to two windows long gives one window (cropped or tiled, DCASE style);
    a longer recording is cut into consecutive windows. hop_s given: always cut with that hop.
    """
    info = encoder.info
    audio, rate = read_wav(path)
    audio = resample(audio, rate, info.sample_rate)
    window = info.window_samples
    if hop_s is None and audio.shape[0] <= 2 * window:
        yield Window(str(path), 0.0, fit_to_window(audio, window), info.sample_rate)
        return
    hop = window if hop_s is None else max(1, round(hop_s * info.sample_rate))
    if audio.shape[0] < window:
        yield Window(str(path), 0.0, fit_to_window(audio, window), info.sample_rate)
        return
    for start, samples in sliding_windows(audio, window, hop):
        yield Window(str(path), start / info.sample_rate, samples, info.sample_rate)


def embed_windows(encoder: Encoder, windows: Sequence[np.ndarray], batch_size: int = 8,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Stack windows into batches -> {layer: [N, D]}."""
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in encoder.info.layers}
    for first in range(0, len(windows), batch_size):
        batch = np.stack(windows[first:first + batch_size])
        for layer, values in encoder.embed(batch).items():
            parts[layer].append(values)
        if on_batch is not None:
            on_batch(batch.shape[0])
    if not windows:
        dims = zip(encoder.info.layers, encoder.info.dims, strict=True)
        return {layer: np.zeros((0, dim), np.float32) for layer, dim in dims}
    return {layer: np.concatenate(values) for layer, values in parts.items()}
