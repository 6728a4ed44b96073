from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.wavio import write_wav
from edge_agent.errors import AudioError
from edge_agent.model.embedding import audio_files, embed_windows, file_windows
from edge_agent.model.encoder import Encoder

from .toy_model import WINDOW, toy_info, write_toy_model


@pytest.fixture()
def encoder(tmp_path: Path) -> Encoder:
    return Encoder(write_toy_model(tmp_path / "toy.onnx", toy_info()))


def _wav(path: Path, seconds: float, rate: int = 1600) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    write_wav(path, (0.1 * np.sin(2 * np.pi * 50 * t)).astype(np.float32), rate)
    return path


def test_short_and_dcase_length_clips_give_one_window(tmp_path: Path, encoder: Encoder) -> None:
    # toy model: 1 s windows at 1600 Hz
    for seconds in (0.3, 1.0, 1.2, 2.0):
        windows = list(file_windows(_wav(tmp_path / f"{seconds}.wav", seconds), encoder))
        assert len(windows) == 1 and windows[0].samples.shape == (WINDOW,)


def test_long_recordings_are_cut_into_windows(tmp_path: Path, encoder: Encoder) -> None:
    path = _wav(tmp_path / "long.wav", 5.5)
    windows = list(file_windows(path, encoder))
    assert [w.start_time for w in windows] == [0, 1, 2, 3, 4]
    assert windows[2].name == "long.wav@2s"
    hopped = list(file_windows(path, encoder, hop_s=0.5))
    assert len(hopped) == 10


def test_resampled_from_capture_rate(tmp_path: Path, encoder: Encoder) -> None:
    windows = list(file_windows(_wav(tmp_path / "hi.wav", 1.0, rate=4800), encoder))
    assert len(windows) == 1 and windows[0].samples.shape == (WINDOW,)


def test_audio_files_walks_directories_and_rejects_missing(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    b = _wav(tmp_path / "d" / "sub" / "b.wav", 0.1)
    a = _wav(tmp_path / "d" / "a.wav", 0.1)
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert audio_files([tmp_path / "d"]) == [a, b]
    with pytest.raises(AudioError, match="no such file"):
        audio_files([tmp_path / "missing"])


def test_embed_windows_batches(encoder: Encoder) -> None:
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(WINDOW).astype(np.float32) for _ in range(5)]
    seen: list[int] = []
    out = embed_windows(encoder, windows, batch_size=2, on_batch=seen.append)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(out["layer_1"], np.stack(windows).reshape(5, 100, 16).mean(1), atol=1e-6)
    assert embed_windows(encoder, [], batch_size=2)["layer_2"].shape == (0, 16)
