"""Helpers for the agent tests: a tiny power-feature ONNX encoder, banks, audio, a real mosquitto."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as paho
import pytest
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.audio.wavio import write_wav
from edge_agent.model.encoder import Encoder
from edge_agent.model_info import ModelInfo
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer

RATE = 8000  # the toy encoder's rate; its window is one second
WINDOW = RATE
REPO = Path(__file__).resolve().parents[2]


def power_model_info() -> ModelInfo:
    return ModelInfo(family="toy", variant="power16", sample_rate=RATE, window_samples=WINDOW,
                     layers=("layer_1", "layer_2"), dims=(16, 16), default_layers=("layer_1",),
                     checkpoint_sha256="cd" * 32, exporter_version="agent-test")


def write_power_model(path: Path) -> Path:
    """waveform [B, 8000] -> layer_1: sqrt of the mean power per position of 16-sample frames, layer_2: peak."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, WINDOW // 16, 16])
    nodes = [
        helper.make_node("Reshape", ["waveform", "shape"], ["frames"]),
        helper.make_node("Mul", ["frames", "frames"], ["power"]),
        helper.make_node("ReduceMean", ["power"], ["mean_power"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["mean_power"], ["layer_1"]),
        helper.make_node("ReduceMax", ["power"], ["layer_2"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "power16",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", WINDOW])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in ("layer_1", "layer_2")],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, power_model_info().to_metadata())
    onnx.save(model, path)
    return path


def noise(seconds: float, amplitude: float, seed: int, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(seconds * rate))).astype(np.float32)


def build_bank(model: Path, bank_dir: Path, source_windows: int = 24, amplitude: float = 0.05,
               target: np.ndarray | None = None, seed: int = 1) -> MemoryBank:
    """A bank of `source_windows` one-second noise windows, calibrated (gamma, 0.99)."""
    encoder = Encoder(model)
    clips = noise(source_windows, amplitude, seed).reshape(source_windows, WINDOW)
    emb = encoder.embed(clips)
    embeddings: dict[str, dict[str, np.ndarray]] = {"source": emb}
    if target is not None:
        embeddings["target"] = encoder.embed(target.reshape(-1, WINDOW))
    bank = MemoryBank(encoder.info, embeddings)
    scorer = BankScorer.fit(bank, ScoringConfig(normalizer="ld-domain"))
    threshold = calibrate(scorer.loo_scores(), "gamma", 0.99)
    scorer.save(bank_dir, threshold=threshold, model_sha256=encoder.model_sha256)
    return MemoryBank.load(bank_dir, expect=encoder.info)


def write_anomaly_wav(path: Path, seconds: int, anomaly: tuple[int, int], amplitude: float = 0.05,
                      loud: float = 0.6, seed: int = 7) -> Path:
    """Noise like the bank's, with a loud tone from anomaly[0] to anomaly[1] seconds."""
    audio = noise(seconds, amplitude, seed)
    a, b = anomaly[0] * RATE, anomaly[1] * RATE
    t = np.arange(b - a) / RATE
    audio[a:b] += (loud * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    write_wav(path, audio, RATE)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A real broker on a loopback port; stop() and start() keep the port."""

    def __init__(self, workdir: Path, listener_options: str = "allow_anonymous true\n"):
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.binary = binary
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        # Persistence keeps a durable subscriber's session (and its queued messages) across restarts.
        # `user`: mosquitto started by root would switch to the mosquitto user, which cannot read tmp files.
        self.conf.write_text(f"user {getpass.getuser()}\n"
                             f"per_listener_settings true\npersistence true\npersistence_location {workdir}/\n"
                             f"listener {self.port} 127.0.0.1\n{listener_options}")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Watcher:
    """A paho subscriber recording every message (topic, decoded payload, retain flag)."""

    def __init__(self, port: int, topics: str = "#", durable: bool = False,
                 setup: Callable[[paho.Client], None] | None = None):
        self.messages: list[tuple[str, Any, bool]] = []
        self._cond = threading.Condition()
        # durable: a persistent session, so the broker queues what arrives while we reconnect
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{time.monotonic_ns()}",
                                  clean_session=not durable)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topics, qos=1)
        self.client.reconnect_delay_set(1, 1)
        host = "127.0.0.1"
        if setup is not None:
            setup(self.client)
            host = "localhost"
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        text = msg.payload.decode(errors="replace")
        try:
            payload: Any = json.loads(text)
        except (ValueError, RecursionError):  # the hostile messages a test sends arrive here too
            payload = text
        with self._cond:
            self.messages.append((msg.topic, payload, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, Any, bool]]], bool], timeout: float = 30.0,
                 what: str = "") -> list[tuple[str, Any, bool]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.messages[-20:]}")
                self._cond.wait(left)
            return list(self.messages)

    def on(self, topic: str) -> list[Any]:
        with self._cond:
            return [p for t, p, _ in self.messages if t == topic]

    def publish(self, topic: str, payload: str | bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]


def start_agent(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    return subprocess.Popen(agent_command(config), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


NODE = "node-a"
PREFIX = "edge-asd"
BASE = f"{PREFIX}/{NODE}"


def write_config(tmp: Path, model: Path, bank: Path, port: int, wav: Path, *, realtime: bool, loop: bool,
                 speed: float = 1.0, extra_source: str = "", extra: str = "", mqtt_extra: str = "") -> Path:
    path = tmp / "agent.yaml"
    path.write_text(f"""
node: {NODE}
state_dir: {tmp / "state"}
model:
  path: {model}
sources:
  - name: fan
    type: file
    path: {wav}
    realtime: {str(realtime).lower()}
    speed: {speed}
    loop: {str(loop).lower()}
    bank: {bank}
    window_seconds: 1
    hop_seconds: 1
    hysteresis: {{raise_after: 2, clear_after: 2, update_every: 2}}
{extra_source}
mqtt:
  host: 127.0.0.1
  port: {port}
  reconnect_min_seconds: 1
  reconnect_max_seconds: 1
{mqtt_extra}
metrics:
  enabled: false
{extra}
""")
    return path


def alerts(watcher: Watcher) -> list[dict[str, Any]]:
    return watcher.on(f"{BASE}/fan/alert")


def stop_agent(proc: subprocess.Popen[bytes], log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"agent did not stop on SIGTERM; log:\n{log.read_text()}") from None


def wait_for_log(path: Path, predicate: Callable[[str], bool], timeout: float = 30.0, what: str = "") -> str:
    """Poll a log file until `predicate(text)` holds; the timeout names what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log tail:\n{text[-3000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (as mount's `-o size=`) mounted at `mount` while the block runs; skips without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, names: str = "DNS:localhost,IP:127.0.0.1") -> None:
    """A private CA (ca.pem) and a server certificate for `names` (server.pem, server.key) in `d`."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=edge-test-ca",
             cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text(f"subjectAltName={names}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)


def check_episodes_complete_and_ordered(events: list[dict[str, Any]]) -> list[str]:
    """De-duplicated by (event_id, seq): every episode is new, update..., end with no seq gap, in order."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    order: list[tuple[str, int]] = []
    for e in events:
        key = (e["event_id"], e["seq"])
        if key not in seen:
            seen[key] = e
            order.append(key)
    episodes: dict[str, list[dict[str, Any]]] = {}
    for key in order:
        episodes.setdefault(key[0], []).append(seen[key])
    for event_id, evs in episodes.items():
        seqs = [e["seq"] for e in evs]
        assert seqs == list(range(len(evs))), f"episode {event_id}: seqs {seqs} out of order or with gaps"
        assert evs[0]["type"] == "new" and evs[-1]["type"] == "end", f"episode {event_id} incomplete: {seqs}"
        assert all(e["type"] == "update" for e in evs[1:-1])
    starts = [episodes[eid][0]["start"] for eid in dict.fromkeys(k[0] for k in order)]
    assert starts == sorted(starts), f"episodes delivered out of order: {starts}"
    return list(episodes)
