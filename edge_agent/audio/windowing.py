"""Windows: fit clips to the encoder's fixed window, cut recordings and live streams into windows.

Short clips are tiled, never zero-padded: the embedding is a temporal mean, and a silent tail would
shift it towards silence.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_agent.audio.stream_resample import StreamResampler


@dataclass(frozen=True)
class Window:
    """One stretch of mono audio for the encoder, and where it came from.

    Live (the agent's sources): `source` is the source's name and `start_time` the UTC epoch seconds of
    the first sample. Offline (files): `source` is the file and `start_time` the offset into it in seconds.
    """

    source: str
    start_time: float
    samples: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int
    index: int = 0  # live: per-source counter since the source started
    captured_at: float = 0.0  # live: time.monotonic() when the window was complete (latency)
    # live: the same window cut from the stream resampled once to other rates (model rate -> samples)
    resampled: Mapping[int, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Offline: `clip.wav`, or `recording.wav@20s` for a window cut further into a file."""
        file = Path(self.source).name
        return f"{file}@{self.start_time:g}s" if self.start_time else file


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


class Windower:
    """Cuts a timestamped live stream into windows of `window_seconds` every `hop_seconds`."""

    def __init__(self, source: str, sample_rate: int, window_seconds: float, hop_seconds: float):
        self.source = source
        self.sample_rate = int(sample_rate)
        self.window = max(1, round(window_seconds * sample_rate))
        self.hop = max(1, round(hop_seconds * sample_rate))
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_time = 0.0  # capture time of _buf[0]
        self._count = 0

    def reset(self) -> None:
        """Forget buffered samples: the next window starts after a gap (new file, lost device)."""
        self._buf = np.zeros(0, dtype=np.float32)

    def push(self, samples: np.ndarray, start_time: float, gap: bool = False) -> list[Window]:
        if gap:
            self.reset()
        if len(self._buf) == 0:
            self._buf_time = start_time
        self._buf = np.concatenate([self._buf, np.asarray(samples, dtype=np.float32)])
        out = []
        now = time.monotonic()
        while len(self._buf) >= self.window:
            out.append(Window(self.source, self._buf_time, self._buf[: self.window].copy(), self.sample_rate,
                              self._count, now))
            self._count += 1
            self._buf = self._buf[self.hop:]
            self._buf_time += self.hop / self.sample_rate
        return out


class MultiRateWindower:
    """A `Windower` at the capture rate that also cuts every window from the stream resampled once to each of
    `rates` (a `StreamResampler` per rate), so that overlapping windows are not resampled again for each window.

    A rate is streamed only where the window and the hop are whole numbers of samples at both rates (then window
    k covers the same span at every rate); the others are left to per-window resampling. A window goes out as
    soon as it is complete at the capture rate: the resampler lags a few samples behind, so the last samples of
    its copy are computed as at the end of a stream (zeros after the input so far, as per-window resampling
    does at a window's end), and the stream's own copy of that window, once complete, is skipped.
    """

    def __init__(self, source: str, sample_rate: int, window_seconds: float, hop_seconds: float,
                 rates: Sequence[int]) -> None:
        self.base = Windower(source, sample_rate, window_seconds, hop_seconds)
        self.sample_rate = self.base.sample_rate
        self._streams: dict[int, tuple[StreamResampler, Windower]] = {}
        for rate in sorted(set(int(r) for r in rates) - {self.sample_rate}):
            if all(_whole(seconds * r) for seconds in (window_seconds, hop_seconds) for r in (rate, sample_rate)):
                self._streams[rate] = (StreamResampler(self.sample_rate, rate),
                                       Windower(source, rate, window_seconds, hop_seconds))
        self._pending: deque[Window] = deque()
        self._ready: dict[int, deque[np.ndarray]] = {rate: deque() for rate in self._streams}
        self._skip: dict[int, int] = {rate: 0 for rate in self._streams}  # copies already handed out early

    @property
    def streamed_rates(self) -> list[int]:
        return list(self._streams)

    def reset(self) -> list[Window]:
        """A gap: the windows still waiting for their copies, then a fresh start at every rate."""
        out = list(self._pending)
        self._pending.clear()
        self.base.reset()
        for rate, (resampler, windower) in self._streams.items():
            resampler.reset()
            windower.reset()
            self._ready[rate].clear()
            self._skip[rate] = 0
        return out

    def push(self, samples: np.ndarray, start_time: float, gap: bool = False) -> list[Window]:
        out = self.reset() if gap else []
        self._pending.extend(self.base.push(samples, start_time))
        for rate, (resampler, windower) in self._streams.items():
            for window in windower.push(resampler.process(samples), start_time):
                if self._skip[rate]:
                    self._skip[rate] -= 1
                else:
                    self._ready[rate].append(window.samples)
        while self._pending:
            window = self._pending.popleft()
            copies = {}
            for rate in self._streams:
                if self._ready[rate]:
                    copies[rate] = self._ready[rate].popleft()
                else:
                    copies[rate] = self._early_copy(rate)
                    self._skip[rate] += 1
            out.append(replace(window, resampled=copies))
        return out

    def _early_copy(self, rate: int) -> np.ndarray:
        """The next window's copy at `rate` now: the stream's samples so far and, for the last few, the
        resampler's output as if the stream ended here."""
        resampler, windower = self._streams[rate]
        start = self._skip[rate] * windower.hop  # copies handed out early and not yet cut from the stream
        joined = np.concatenate([windower._buf, resampler.peek_tail()])
        return joined[start:start + windower.window].copy()


def make_windower(source: str, sample_rate: int, window_seconds: float, hop_seconds: float,
                  rates: Sequence[int] = ()) -> Windower | MultiRateWindower:
    """Overlapping windows (hop < window) to be resampled: resample the stream once; else a plain Windower."""
    if hop_seconds < window_seconds and set(rates) - {int(sample_rate)}:
        return MultiRateWindower(source, sample_rate, window_seconds, hop_seconds, rates)
    return Windower(source, sample_rate, window_seconds, hop_seconds)


def _whole(samples: float) -> bool:
    return abs(samples - round(samples)) < 1e-6
