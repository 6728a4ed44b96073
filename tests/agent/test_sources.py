"""File, folder and stdin sources, the windower and the ring buffer (no inference)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.config import SourceConfig
from edge_agent.agent.sources import FileSource, RingBuffer, StdinSource, make_source
from edge_agent.audio.quality import AudioChecks
from edge_agent.audio.wavio import write_wav
from edge_agent.audio.windowing import Window, Windower


def _cfg(**changes: object) -> SourceConfig:
    # The signals here (ramps, constants, zeros) test windowing and pacing: the broken-audio checks are off.
    base = dict(name="s", type="file", window_seconds=1.0, hop_seconds=0.5, block_seconds=0.1,
                realtime=False, bank=Path("unused"), audio_checks=AudioChecks(rms_floor=0.0, band_drop_db=0.0))
    base.update(changes)
    return SourceConfig(**base)  # type: ignore[arg-type]


def _collect(source, timeout: float = 20.0) -> list[Window]:  # type: ignore[no-untyped-def]
    out: list[Window] = []
    source.start(lambda w: out.append(w) or True)
    deadline = time.monotonic() + timeout
    while not source.done and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    return out


def test_windower_hop_and_timestamps_are_in_sample_time() -> None:
    w = Windower("s", 100, window_seconds=1.0, hop_seconds=0.25)
    out = []
    for i in range(10):  # 10 blocks of 30 samples, timestamps say nothing after the first
        out += w.push(np.arange(i * 30, (i + 1) * 30, dtype=np.float32), 1000.0 + i * 0.3)
    assert [len(x.samples) for x in out] == [100] * len(out)
    assert [x.start_time for x in out] == pytest.approx([1000.0 + 0.25 * i for i in range(len(out))])
    assert [x.samples[0] for x in out] == [25.0 * i for i in range(len(out))]
    assert len(out) == 1 + (300 - 100) // 25
    assert w.push(np.zeros(10, np.float32), 5000.0, gap=True) == []  # a gap starts over


def test_ring_buffer_drops_oldest_when_full_and_reports_the_gap() -> None:
    ring = RingBuffer(capacity_samples=100)
    for i in range(5):
        ring.write(np.full(40, i, np.float32), float(i))
    samples, start, gap = ring.read(timeout=0.1)  # type: ignore[misc]
    assert gap and ring.overflows == 3 and start == 3.0
    assert samples.tolist() == [3.0] * 40 + [4.0] * 40
    assert ring.read(timeout=0.01) is None


def test_file_source_as_fast_as_possible_covers_the_file(tmp_path: Path) -> None:
    audio = np.arange(8000 * 3, dtype=np.float32) / 1e5
    write_wav(tmp_path / "a.wav", audio, 8000, float32=True)
    windows = _collect(FileSource(_cfg(path=tmp_path / "a.wav"), 16000))
    assert len(windows) == 5  # 3 s, 1 s windows, 0.5 s hop
    np.testing.assert_allclose(windows[2].samples, audio[8000:16000], atol=1e-7)
    assert windows[1].start_time - windows[0].start_time == pytest.approx(0.5)


def test_folder_source_plays_sorted_files_without_windows_across_files(tmp_path: Path) -> None:
    for name, value in (("b.wav", 0.2), ("a.wav", 0.1)):
        write_wav(tmp_path / name, np.full(8000 + 4000, value, np.float32), 8000, float32=True)
    source = make_source(_cfg(type="folder", path=tmp_path), 8000)
    windows = _collect(source)
    assert [round(float(w.samples.mean()), 3) for w in windows] == [0.1, 0.1, 0.2, 0.2]
    assert source.health.state == "finished"


def test_realtime_replay_paces_and_loop_restarts(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", np.zeros(800, np.float32), 800)
    source = FileSource(_cfg(path=tmp_path / "a.wav", realtime=True, speed=4.0, loop=True,
                             window_seconds=0.5, hop_seconds=0.5), 800)
    out: list[Window] = []
    source.start(lambda w: out.append(w) or True)
    time.sleep(1.2)
    source.stop()
    assert 2 <= len(out) <= 12  # ~0.25 s of wall time per 1 s file at 4x: looping, but paced
    assert source.health.state == "stopped"


def test_blocking_source_waits_for_a_full_queue_instead_of_dropping(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", np.zeros(8000 * 4, np.float32), 8000)
    accepted: list[Window] = []
    refused = threading.Semaphore(0)
    gate = threading.Event()

    def sink(w: Window) -> bool:
        if not gate.is_set() and len(accepted) >= 1:
            refused.release()
            return False
        accepted.append(w)
        return True

    source = FileSource(_cfg(path=tmp_path / "a.wav"), 8000)
    source.start(sink)
    for _ in range(3):  # the source offers the same window again and again while the queue is full
        assert refused.acquire(timeout=10), "the source did not retry the refused window"
    assert len(accepted) == 1
    gate.set()
    deadline = time.monotonic() + 10
    while not source.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 7 and source.health.dropped_windows == 0


def test_stdin_source_reads_s16le_and_selects_a_channel() -> None:
    rate = 4000
    left = (np.arange(rate * 2) % 100).astype(np.int16)
    right = -left
    pcm = np.stack([left, right], 1).astype("<i2").tobytes()
    cfg = _cfg(type="stdin", sample_rate=rate, channels=2, channel=1)
    windows = _collect(StdinSource(cfg, 8000, stream=io.BytesIO(pcm)))
    assert len(windows) == 3
    np.testing.assert_allclose(windows[0].samples, -left[:rate] / 32768.0, atol=1e-7)
    mixed = _collect(StdinSource(_cfg(type="stdin", sample_rate=rate, channels=2), 8000,
                                 stream=io.BytesIO(pcm)))
    assert np.abs(mixed[0].samples).max() == 0.0  # the mean of +x and -x
