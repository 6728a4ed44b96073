"""The microphone path with sounddevice.InputStream replaced at the library boundary.

The fake stream is driven by a thread that calls the agent's callback the way PortAudio does;
everything from the callback on (ring buffer, windowing, resampling, inference, alerts) is real.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sounddevice

from edge_agent.agent.config import SourceConfig, parse_config
from edge_agent.agent.daemon import Agent
from edge_agent.agent.sdnotify import SystemdNotifier
from edge_agent.agent.sources import MicSource
from edge_agent.audio.quality import AudioChecks
from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import Window

from .agent_helpers import noise


class FakeDevice:
    """Stands in for the sound card: what InputStream opens, and the audio its callback receives."""

    def __init__(self, channels: int = 2) -> None:
        self.channels = channels
        self.fail_opens = 0  # the next N opens raise PortAudioError (device absent)
        self.stalled = False  # streams stay "active" but deliver nothing (device unplugged)
        self.opens: list[dict] = []
        self.fed: list[np.ndarray] = []  # every block delivered, [frames, channels]
        self.signal = lambda n: np.zeros((n, self.channels), dtype=np.float32)
        self.overflow_every = 0
        self.streams: list[FakeInputStream] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        device = self

        def factory(**kwargs: object) -> FakeInputStream:
            device.opens.append(kwargs)
            if device.fail_opens > 0:
                device.fail_opens -= 1
                raise sounddevice.PortAudioError("Error querying device -1")
            stream = FakeInputStream(device, kwargs)
            device.streams.append(stream)
            return stream

        monkeypatch.setattr(sounddevice, "InputStream", factory)


class FakeInputStream:
    def __init__(self, device: FakeDevice, kwargs: dict) -> None:
        self.device = device
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.blocksize = int(kwargs["blocksize"])  # type: ignore[arg-type]
        self.rate = float(kwargs["samplerate"])  # type: ignore[arg-type]
        self.active = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def start(self) -> None:
        self.active = True
        self._thread.start()

    def close(self) -> None:
        self.active = False
        self._closed.set()
        self._thread.join(2)

    def _pump(self) -> None:
        count = 0
        while not self._closed.wait(self.blocksize / self.rate / 4):  # 4x real time
            if self.device.stalled:
                continue
            block = self.device.signal(self.blocksize).astype(np.float32)
            self.device.fed.append(block.copy())
            flags = sounddevice.CallbackFlags()
            count += 1
            if self.device.overflow_every and count % self.device.overflow_every == 0:
                flags.input_overflow = True
            self.callback(block, self.blocksize, None, flags)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDevice]:
    dev = FakeDevice()
    dev.install(monkeypatch)
    yield dev


def _wait(predicate, timeout: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mic_cfg(**changes: object) -> SourceConfig:
    base = dict(name="mic", type="mic", device="USB Mic", sample_rate=16000, channels=2, channel=1,
                window_seconds=0.5, hop_seconds=0.25, block_seconds=0.05, stall_seconds=0.4,
                retry_initial_seconds=0.05, retry_max_seconds=0.2, bank=Path("unused"),
                # constants and ramps test the device mechanics: the broken-audio checks are off
                audio_checks=AudioChecks(rms_floor=0.0, band_drop_db=0.0))
    base.update(changes)
    return SourceConfig(**base)  # type: ignore[arg-type]


def test_callback_audio_reaches_windows_with_the_chosen_channel(device: FakeDevice) -> None:
    ramp = iter(range(10**9))
    # channel 0 is silence, channel 1 carries a counter so continuity can be checked exactly
    device.signal = lambda n: np.stack([np.zeros(n), [next(ramp) * 1e-6 for _ in range(n)]], 1)
    device.overflow_every = 5
    windows: list[Window] = []
    source = MicSource(_mic_cfg(), model_rate=8000)
    source.start(lambda w: windows.append(w) or True)
    try:
        _wait(lambda: len(windows) >= 6, what="six windows")
    finally:
        source.stop()
    opened = device.opens[0]
    assert opened["device"] == "USB Mic" and opened["samplerate"] == 16000 and opened["channels"] == 2
    first = windows[0]
    assert first.sample_rate == 16000 and len(first.samples) == 8000
    fed = np.concatenate(device.fed)[:, 1]
    np.testing.assert_array_equal(first.samples, fed[:8000].astype(np.float32))
    for a, b in itertools.pairwise(windows):  # hop of 4000 samples, contiguous stream
        np.testing.assert_array_equal(b.samples[:4000], a.samples[4000:])
        assert b.start_time == pytest.approx(a.start_time + 0.25, abs=1e-6)
    assert abs(first.start_time - time.time()) < 30
    assert source.health.overflows >= 1
    assert source.health.state == "stopped"


def test_absent_then_lost_device_is_reported_and_recovered(device: FakeDevice,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    device.fail_opens = 3
    device.signal = lambda n: np.full((n, 2), 0.1, dtype=np.float32)
    windows: list[Window] = []
    source = MicSource(_mic_cfg(), model_rate=8000)
    caplog.set_level(logging.WARNING, logger="edge_agent.agent.sources")
    source.start(lambda w: windows.append(w) or True)
    try:
        _wait(lambda: source.health.state == "running" and len(windows) >= 2, what="recovery after absence")
        assert len(device.opens) == 4
        assert sum("event=device_lost" in r.message for r in caplog.records) == 3
        assert "cannot open device" in caplog.records[0].message
        device.stalled = True  # unplugged: the stream stays open but no frames come
        _wait(lambda: source.health.state == "lost", what="stall detection")
        assert "no audio frames" in source.health.detail
        assert device.streams[0].active is False, "a stalled stream must be closed before reopening"
        count = len(windows)
        device.stalled = False
        _wait(lambda: source.health.state == "running" and len(windows) >= count + 2, what="recovery after stall")
        assert source.health.reconnects >= 4
    finally:
        source.stop()


def test_agent_with_mic_source_alerts_and_reports_device_loss(device: FakeDevice, tmp_path: Path,
                                                              toy_model: Path, bank_dir: Path) -> None:
    loud = {"on": False}
    # the bank's noise is white at 8 kHz: the mic's 16 kHz noise has the same band after resampling
    quiet = iter(np.tile(resample(noise(5, 0.05, seed=3), 8000, 16000), 1000))

    def signal(n: int) -> np.ndarray:
        mono = np.fromiter((next(quiet) for _ in range(n)), dtype=np.float32, count=n)
        if loud["on"]:
            mono = mono + 0.5 * np.sin(np.arange(n) * 0.3).astype(np.float32)
        return np.stack([mono, mono], 1)

    device.signal = signal
    cfg = parse_config(f"""
node: mic-node
state_dir: {tmp_path / "state"}
model: {{path: {toy_model}}}
sources:
  - name: mic
    type: mic
    device: 1
    sample_rate: 16000
    channels: 2
    channel: 0
    block_seconds: 0.05
    window_seconds: 1
    hop_seconds: 0.5
    stall_seconds: 0.5
    retry_initial_seconds: 0.05
    retry_max_seconds: 0.1
    bank: {bank_dir}
    hysteresis: {{raise_after: 2, clear_after: 2}}
    audio_checks: {{band_drop_db: 0}}  # 8 kHz noise in a 16 kHz stream, on purpose (the bank's band)
output: {{stdout: false}}
metrics: {{port: 0}}
""", source="test")
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edge-agent-test-{time.monotonic_ns()}"
    notify_sock.bind("\0" + name)
    notify_sock.settimeout(0.2)
    received: list[bytes] = []
    listening = threading.Event()
    listening.set()

    def listen() -> None:  # like systemd: keep reading the notify socket
        while listening.is_set():
            try:
                received.append(notify_sock.recv(256))
            except TimeoutError:
                continue

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    agent = Agent(cfg, None, notifier=SystemdNotifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "600000"}))
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(agent.run()), daemon=True)
    thread.start()
    try:
        _wait(lambda: b"WATCHDOG=1" in received, what="a watchdog ping")
        ready = [m for m in received if m.startswith(b"READY=1")]
        assert ready and received.index(ready[0]) < received.index(b"WATCHDOG=1")
        assert any(m.startswith(b"STATUS=ok: 1 source(s)") for m in received)
        pipeline = agent.runtime.pipelines["mic"]
        sample = agent.metrics.registry.get_sample_value
        _wait(lambda: (sample("edge_agent_windows_total", {"source": "mic"}) or 0) >= 4, what="scored windows")
        assert pipeline.tracker.episode is None, "quiet normal audio must not raise an alert"
        last_score = sample("edge_agent_last_score", {"source": "mic"})
        assert last_score is not None and last_score < pipeline.threshold
        loud["on"] = True
        alerts_file = tmp_path / "state" / "alerts.jsonl"
        _wait(lambda: alerts_file.exists() and '"type":"new"' in alerts_file.read_text(), what="an alert")
        device.stalled = True
        _wait(lambda: agent.state()["health"] == "degraded", what="degraded health")
        assert agent.state()["sources"][0]["health"]["state"] == "lost"
        _wait(lambda: any(m.startswith(b"STATUS=degraded: 1 source(s); mic lost") for m in received),
              what="the loss reported to systemd")
        device.stalled = False
        _wait(lambda: agent.state()["health"] == "ok", what="recovered health")
        import urllib.request

        port = agent.metrics_server.port  # type: ignore[union-attr]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'edge_agent_windows_total{source="mic"}' in text
        assert 'edge_agent_alerts_total{source="mic",type="new"} 1' in text
        assert 'edge_agent_stage_seconds_bucket{le="+Inf",stage="embed"}' in text
        assert 'edge_agent_source_up{source="mic"} 1' in text
    finally:
        agent.request_stop("test")
        thread.join(30)
    assert exit_code == [0]
    listening.clear()
    listener.join(5)
    notify_sock.close()
    assert b"STOPPING=1" in received
    events = [json.loads(line) for line in (tmp_path / "state" / "alerts.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "new" and events[-1]["type"] == "end"
    assert events[-1]["reason"] == "stopped" or events[-1]["reason"] == "cleared"
    assert len(device.opens) >= 2 and all(o["device"] == 1 for o in device.opens)
