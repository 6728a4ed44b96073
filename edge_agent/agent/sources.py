"""Audio sources for the agent: microphone (sounddevice), wav file/folder replay, raw PCM on stdin.

Each source runs its own capture thread, cuts the stream into windows of `window_seconds` with
`hop_seconds`, and hands each `Window` to a sink (the daemon's inference queue). No inference runs
here. A window's `start_time` is the wall-clock UTC capture time of its first sample.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_agent.agent.config import SourceConfig
from edge_agent.audio.quality import window_fault
from edge_agent.audio.wavio import read_wav
from edge_agent.audio.windowing import MultiRateWindower, Window, Windower, make_windower
from edge_agent.errors import AudioError
from edge_agent.logs import get_logger

log = get_logger(__name__)


# A sink returns False when it refused the window (queue full); the source counts a drop.
WindowSink = Callable[[Window], bool]


@dataclass
class SourceHealth:
    state: str = "starting"  # starting | running | degraded (broken audio) | lost | finished | stopped | failed
    detail: str = ""
    overflows: int = 0  # capture overruns (sounddevice status or ring buffer full)
    dropped_windows: int = 0  # windows the inference queue refused
    windows: int = 0
    reconnects: int = 0
    last_frame_time: float | None = None
    # windows not scored, or files not played, per fault kind (audio/quality.py, and unreadable_file)
    faults: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "detail": self.detail, "overflows": self.overflows,
                "dropped_windows": self.dropped_windows, "windows": self.windows,
                "reconnects": self.reconnects, "last_frame_time": self.last_frame_time, "faults": dict(self.faults)}


class RingBuffer:
    """Bounded FIFO of timestamped sample blocks between an audio callback and a reader thread.

    The writer never blocks (it runs in the audio callback); when full, the oldest blocks are
    discarded, counted as an overflow, and the reader is told about the gap.
    """

    def __init__(self, capacity_samples: int):
        self.capacity = int(capacity_samples)
        self._blocks: deque[tuple[np.ndarray, float]] = deque()
        self._size = 0
        self._gap = False
        self.overflows = 0
        self._cond = threading.Condition()

    def write(self, samples: np.ndarray, start_time: float) -> None:
        with self._cond:
            self._blocks.append((samples, start_time))
            self._size += len(samples)
            while self._size > self.capacity and len(self._blocks) > 1:
                old, _ = self._blocks.popleft()
                self._size -= len(old)
                self.overflows += 1
                self._gap = True
            self._cond.notify()

    def read(self, timeout: float) -> tuple[np.ndarray, float, bool] | None:
        """All buffered samples as one block: (samples, start time of the first, gap before it)."""
        with self._cond:
            if not self._blocks and not self._cond.wait_for(lambda: bool(self._blocks), timeout):
                return None
            blocks = list(self._blocks)
            self._blocks.clear()
            self._size = 0
            gap, self._gap = self._gap, False
        start = blocks[0][1]
        # Blocks are contiguous in sample time unless a gap was recorded; the first timestamp anchors them.
        return np.concatenate([b for b, _ in blocks]), start, gap

    def clear(self) -> None:
        with self._cond:
            self._blocks.clear()
            self._size = 0
            self._gap = True


class AudioSource:
    """Base: a capture thread feeding a Windower; subclasses implement `_capture`."""

    finite = False  # ends by itself (file without loop, stdin EOF)
    blocking = False  # waits for a full inference queue instead of dropping windows

    def __init__(self, cfg: SourceConfig, model_rate: int):
        self.cfg = cfg
        self.name = cfg.name
        self.model_rate = model_rate
        # the model rates whose copies of overlapping windows are cut from the stream resampled once (set by the
        # runtime; read when a windower is made: at a new file or stream)
        self.resample_to: tuple[int, ...] = ()
        self.health = SourceHealth()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink: WindowSink | None = None
        self._windower: Windower | MultiRateWindower | None = None
        self._lock = threading.Lock()
        self._fault_kind: str | None = None

    def start(self, sink: WindowSink) -> None:
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.health.state not in ("finished", "failed"):
            self._set_state("stopped")

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._capture()
            if not self._stop.is_set() and self.finite:
                self._set_state("finished")
        except Exception as exc:  # a capture thread must report, never die silently
            log.exception("capture_failed", source=self.name, error=str(exc))
            self._set_state("failed", str(exc))

    def _capture(self) -> None:
        raise NotImplementedError

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._lock:
            if (state, detail) != (self.health.state, self.health.detail):
                self.health.state = state
                self.health.detail = detail

    def _fault(self, kind: str, detail: str) -> None:
        """Count a fault; its first window or file after a change of kind is logged and sets the health."""
        self.health.faults[kind] = self.health.faults.get(kind, 0) + 1
        if self._fault_kind != kind:
            self._fault_kind = kind
            log.warning("audio_fault", source=self.name, kind=kind, detail=detail)
            self._set_state("degraded", f"{kind}: {detail}")

    def _audio_ok(self) -> None:
        if self._fault_kind is not None:
            log.info("audio_ok", source=self.name, after=self._fault_kind)
            self._fault_kind = None
            self._set_state("running")

    def _windower_for(self, rate: int) -> Windower | MultiRateWindower:
        windower = make_windower(self.name, rate, self.cfg.window_seconds, self.cfg.hop_seconds, self.resample_to)
        if isinstance(windower, MultiRateWindower) and windower.streamed_rates:
            log.info("stream_resampling", source=self.name, rate=rate, rates=",".join(map(str,
                                                                                            windower.streamed_rates)))
        return windower

    def _emit(self, samples: np.ndarray, start_time: float, gap: bool = False) -> None:
        assert self._windower is not None and self._sink is not None
        self.health.last_frame_time = start_time + len(samples) / self._windower.sample_rate
        self._deliver(self._windower.push(samples, start_time, gap))

    def _end_stream(self) -> None:
        """The stream ended (a file's end): windows still waiting for their resampled copies go out without."""
        if isinstance(self._windower, MultiRateWindower):
            self._deliver(self._windower.reset())

    def _deliver(self, windows: list[Window]) -> None:
        assert self._sink is not None
        for window in windows:
            fault = window_fault(window.samples, window.sample_rate, self.cfg.audio_checks)
            if fault is not None:  # reported, never scored: broken input is not an anomaly of the machine
                self._fault(fault.kind, fault.detail)
                continue
            self._audio_ok()
            if self.blocking:
                while not self._sink(window):
                    if self._stop.wait(0.05):
                        return
            elif not self._sink(window):
                self.health.dropped_windows += 1
                log.warning("window_dropped", source=self.name, reason="inference_queue_full")
                continue
            self.health.windows += 1


class FileSource(AudioSource):
    """Replays a wav file or every *.wav in a folder (sorted), in real time or as fast as possible."""

    blocking = True

    def __init__(self, cfg: SourceConfig, model_rate: int):
        super().__init__(cfg, model_rate)
        self.finite = not cfg.loop
        self._clock_end = 0.0
        self._skipped: set[Path] = set()

    def files(self) -> list[Path]:
        assert self.cfg.path is not None
        if self.cfg.type == "file":
            return [self.cfg.path]
        found = sorted(p for p in self.cfg.path.iterdir() if p.suffix.lower() == ".wav")
        if not found:
            raise AudioError(f"{self.cfg.path}: no .wav files in the folder of source {self.name!r}")
        return found

    def _capture(self) -> None:
        self._set_state("running")
        played = False
        while not self._stop.is_set():
            for path in self.files():
                if self._stop.is_set():
                    return
                try:
                    self._play(path)
                    played = True
                except AudioError as exc:
                    if self.cfg.type == "file":
                        raise  # the one file of the source: the source fails with the reason
                    if path not in self._skipped:  # a folder goes on: the file is skipped and reported once
                        self._skipped.add(path)
                        self._fault("unreadable_file", str(exc))
            if not self.cfg.loop or not played:
                return

    def _play(self, path: Path) -> None:
        audio, rate = read_wav(path, channel=self.cfg.channel, strict=True)
        if len(audio) < round(self.cfg.window_seconds * rate):
            raise AudioError(f"{path}: {len(audio) / rate:.3g} s of audio, shorter than one "
                             f"{self.cfg.window_seconds:g} s window")
        if self._windower is None or self._windower.sample_rate != rate:
            self._windower = self._windower_for(rate)
        block = max(1, round(self.cfg.block_seconds * rate))
        # Replayed audio is stamped in audio time: one second of a recording spans one second of stamps whatever
        # the replay speed, and a file never starts before the last one ended. (Evidence clips place samples by
        # these stamps; at speed > 1 they run ahead of the wall clock.)
        t0 = max(time.time(), self._clock_end)
        self._clock_end = t0 + len(audio) / rate
        pace = time.time() if self.cfg.realtime else None
        for offset in range(0, len(audio), block):
            if self._stop.is_set():
                return
            if pace is not None:  # like a sound card: a block is delivered once its last sample is "captured"
                due = pace + min(offset + block, len(audio)) / rate / self.cfg.speed
                delay = due - time.time()
                if delay > 0 and self._stop.wait(delay):
                    return
            self._emit(audio[offset: offset + block], t0 + offset / rate, gap=offset == 0)
        self._end_stream()


class StdinSource(AudioSource):
    """Raw PCM s16le, interleaved `channels`, at `sample_rate`, read from stdin (or a given stream)."""

    finite = True
    blocking = True

    def __init__(self, cfg: SourceConfig, model_rate: int, stream: BinaryIO | None = None):
        super().__init__(cfg, model_rate)
        self.stream = stream

    def _capture(self) -> None:
        assert self.cfg.sample_rate is not None
        rate, channels = self.cfg.sample_rate, self.cfg.channels
        stream = self.stream if self.stream is not None else sys.stdin.buffer
        self._windower = self._windower_for(rate)
        frame_bytes = 2 * channels
        block_bytes = max(1, round(self.cfg.block_seconds * rate)) * frame_bytes
        pending = b""
        samples_seen = 0
        t0: float | None = None
        self._set_state("running")
        while not self._stop.is_set():
            data = stream.read(block_bytes)
            if not data:
                self._end_stream()
                return
            pending += data
            usable = len(pending) - len(pending) % frame_bytes
            if usable == 0:
                continue
            frames = np.frombuffer(pending[:usable], dtype="<i2").reshape(-1, channels)
            pending = pending[usable:]
            now = time.time()
            if t0 is None:
                t0 = now - len(frames) / rate
            mono = _select_channel(frames.astype(np.float32) / 32768.0, self.cfg.channel)
            self._emit(mono, t0 + samples_seen / rate)
            samples_seen += len(frames)


class MicSource(AudioSource):
    """Microphone via sounddevice.InputStream; the callback only copies into a ring buffer.

    A device that fails to open, stops delivering frames for `stall_seconds`, or whose stream goes
    inactive is reported as `lost` (health + log) and reopened with exponential backoff.
    """

    def __init__(self, cfg: SourceConfig, model_rate: int):
        super().__init__(cfg, model_rate)
        self.rate = cfg.sample_rate or model_rate
        self.ring = RingBuffer(int(cfg.buffer_seconds * self.rate))
        self._status_overflows = 0

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        now = time.time()
        if status and getattr(status, "input_overflow", False):
            self._status_overflows += 1
        mono = _select_channel(np.asarray(indata, dtype=np.float32), self.cfg.channel)
        self.ring.write(mono.copy(), now - frames / self.rate)

    def _open(self) -> object:
        import sounddevice  # imported here so that agents without a mic never load PortAudio

        stream = sounddevice.InputStream(
            device=self.cfg.device, samplerate=self.rate, channels=self.cfg.channels, dtype="float32",
            blocksize=max(1, round(self.cfg.block_seconds * self.rate)), callback=self._callback)
        stream.start()
        return stream

    def _capture(self) -> None:
        self._windower = self._windower_for(self.rate)
        delay = self.cfg.retry_initial_seconds
        while not self._stop.is_set():
            reason, had_audio = self._stream_once()
            if self._stop.is_set():
                return
            if had_audio:  # the device worked for a while: start the backoff over
                delay = self.cfg.retry_initial_seconds
            self.health.reconnects += 1
            self._set_state("lost", f"{reason}; retry in {delay:.1f}s")
            log.warning("device_lost", source=self.name, device=self.cfg.device, reason=reason, retry_in=delay)
            if self._stop.wait(delay):
                return
            delay = min(self.cfg.retry_max_seconds, delay * 2)

    def _stream_once(self) -> tuple[str, bool]:
        """Capture until the device is lost; returns why, and whether any audio arrived."""
        try:
            stream = self._open()
        except Exception as exc:  # PortAudioError, ValueError (no such device), OSError
            return f"cannot open device: {exc}", False
        self.ring.clear()
        last_data = time.monotonic()
        reported_running = False
        try:
            while not self._stop.is_set():
                got = self.ring.read(timeout=min(0.2, self.cfg.stall_seconds))
                self.health.overflows = self.ring.overflows + self._status_overflows
                if got is not None:
                    samples, start, gap = got
                    last_data = time.monotonic()
                    if not reported_running:
                        self._set_state("running")
                        log.info("device_running", source=self.name, device=self.cfg.device, rate=self.rate)
                        reported_running = True
                    self._emit(samples, start, gap)
                    continue
                if not getattr(stream, "active", True):
                    return "stream stopped", reported_running
                if time.monotonic() - last_data > self.cfg.stall_seconds:
                    return f"no audio frames for {self.cfg.stall_seconds:g}s", reported_running
            return "stopped", reported_running
        finally:
            try:
                stream.close()  # type: ignore[attr-defined]
            except Exception as exc:
                log.debug("device_close_failed", source=self.name, error=str(exc))
            if self._windower is not None:
                self._windower.reset()



def _select_channel(frames: np.ndarray, channel: int | None) -> np.ndarray:
    if frames.ndim == 1:
        return frames
    if channel is None:
        return frames.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(frames[:, channel])


SOURCE_TYPES: dict[str, type[AudioSource]] = {
    "mic": MicSource, "file": FileSource, "folder": FileSource, "stdin": StdinSource}


def make_source(cfg: SourceConfig, model_rate: int) -> AudioSource:
    return SOURCE_TYPES[cfg.type](cfg, model_rate)
