"""The operator loop end to end, with a real mosquitto, real agents and the fleet CLI: every episode's evidence clip
(sample-exact, fetched over MQTT), false-positive feedback that stops the same audio from alerting while another
anomaly still alerts, its undo, on-site learning of a bank (outliers left out), rebuild, the evidence quota, drift."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from edge_agent.audio.wavio import write_wav

from .agent_helpers import (
    BASE,
    NODE,
    RATE,
    REPO,
    Mosquitto,
    Watcher,
    build_bank,
    noise,
    start_agent,
    stop_agent,
    write_power_model,
)

SPEED = 10


def _tone(seconds: float, freq: float, loud: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (loud * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _input_ints(path: Path) -> np.ndarray:
    ints, rate = sf.read(str(path), dtype="int16")
    assert rate == RATE
    return np.asarray(ints)


def _locate(clip: np.ndarray, source: np.ndarray) -> int:
    """Where the clip starts in the (looped) input: its first 400 samples found exactly, then all of it checked."""
    twice = np.concatenate([source, source, source])
    head = clip[:400]
    windows = np.lib.stride_tricks.sliding_window_view(twice[:len(source) + 400], len(head))
    hits = np.flatnonzero((windows == head).all(axis=1))
    assert hits.size >= 1, "the clip's audio is not in the input"
    start = int(hits[0])
    n = min(len(clip), 2 * len(source))
    assert np.array_equal(clip[:n], twice[start:start + n]), "the clip differs from the input"
    return start % len(source)


@dataclass
class Node:
    tmp: Path
    broker: Mosquitto
    watcher: Watcher
    proc: subprocess.Popen[bytes]
    log: Path
    wav: Path

    @property
    def evidence(self) -> Path:
        return self.tmp / "state" / "evidence"

    def results(self, command: str) -> list[dict[str, Any]]:
        return [r for r in self.watcher.on(f"{BASE}/cmd/result") if isinstance(r, dict) and r.get("command") == command]

    def ends(self) -> list[dict[str, Any]]:
        return [e for e in self.watcher.on(f"{BASE}/fan/alert") if isinstance(e, dict) and e.get("type") == "end"]

    def state(self) -> dict[str, Any]:
        """The last state published ({} before the first)."""
        states = [s for s in self.watcher.on(f"{BASE}/state") if isinstance(s, dict)]
        return states[-1] if states else {}

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent", "fleet", *args, "--host", "127.0.0.1", "--port",
                               str(self.broker.port)], capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def command(self, name: str, args: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        request_id = f"t-{name}-{time.monotonic_ns()}"
        self.watcher.publish(f"{BASE}/cmd/{name}", json.dumps({"id": request_id, **args}))
        self.watcher.wait_for(lambda m: any(r.get("request_id") == request_id for r in self.results(name)),
                              timeout=timeout, what=f"the answer to {name}")
        return next(r for r in self.results(name) if r.get("request_id") == request_id)

    def clip_position(self, event_id: str, source: np.ndarray) -> tuple[int, int]:
        """(start, end) in the input, in samples, of the episode's in-episode audio (read from the store)."""
        clip, _ = sf.read(str(self.evidence / f"{event_id}.flac"), dtype="int16")
        windows = np.load(self.evidence / f"{event_id}.npz")
        meta = json.loads((self.evidence / f"{event_id}.json").read_text())
        begin = _locate(np.asarray(clip), source)
        inside = np.flatnonzero(windows["in_episode"])
        offset = round((float(windows["start"][inside[0]]) - float(meta["start_epoch"])) * RATE)
        return (begin + offset) % len(source), (begin + len(clip)) % len(source)


def _start(tmp: Path, wav: Path, source_extra: str, bank: Path | None,
           evidence: str = "{pre_roll_seconds: 2}") -> Node:
    model = write_power_model(tmp / "power16.onnx")
    if bank is not None:
        build_bank(model, bank)
    broker = Mosquitto(tmp)
    broker.start()
    watcher = Watcher(broker.port, "edge-asd/#")
    config = tmp / "agent.yaml"
    config.write_text(f"""
node: {NODE}
state_dir: {tmp / "state"}
model: {{path: {model}}}
sources:
  - name: fan
    type: file
    path: {wav}
    realtime: true
    speed: {SPEED}
    loop: true
    {"bank: " + str(bank) if bank is not None else ""}
    window_seconds: 1
    hop_seconds: 1
    hysteresis: {{raise_after: 2, clear_after: 2, update_every: 2}}
{source_extra}
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_seconds: 1, reconnect_max_seconds: 1}}
metrics: {{enabled: false}}
evidence: {evidence}
""")
    log = tmp / "agent.log"
    proc = start_agent(config, log)
    return Node(tmp, broker, watcher, proc, log, wav)


def _stop(node: Node) -> None:
    try:
        if node.proc.poll() is None:
            assert stop_agent(node.proc, node.log) == 0, node.log.read_text()[-3000:]
        text = node.log.read_text()
        assert "Traceback" not in text, text[-5000:]
    finally:
        node.watcher.close()
        node.broker.stop()


@pytest.fixture
def two_anomalies(tmp_path: Path) -> Iterator[tuple[Node, np.ndarray]]:
    """10 s looped at 10x: noise like the bank's, a 440 Hz tone at [2, 4) s (A) and loud noise at [6, 8) s (B)."""
    audio = noise(10, 0.05, 7)
    audio[2 * RATE:4 * RATE] += _tone(2, 440, 0.6)
    audio[6 * RATE:8 * RATE] += noise(2, 0.2, 11)
    wav = tmp_path / "two.wav"
    write_wav(wav, audio, RATE)
    node = _start(tmp_path, wav, "    feedback: {domain: target}", tmp_path / "bank")
    try:
        yield node, _input_ints(wav)
    finally:
        _stop(node)


def _kind(position: tuple[int, int]) -> str:
    start = position[0] / RATE
    if 1.0 <= start <= 4.0:
        return "A"
    if 5.0 <= start <= 8.0:
        return "B"
    return f"? ({start:.2f} s)"


def test_clips_feedback_and_undo(two_anomalies: tuple[Node, np.ndarray], tmp_path: Path) -> None:
    node, source = two_anomalies
    node.watcher.wait_for(lambda m: len([e for e in node.ends() if e.get("clip", {}).get("status") == "ready"]) >= 4,
                          timeout=60, what="four episodes with their clips")
    original_bank = node.state()["sources"][0]["bank"]["sha256"]
    ends = [e for e in node.ends() if e.get("clip", {}).get("status") == "ready"]
    news = [e for e in node.watcher.on(f"{BASE}/fan/alert") if e.get("type") == "new"]
    assert all(e["clip"]["status"] == "recording" and e["clip"]["id"] == e["event_id"] for e in news)
    kinds = {e["event_id"]: _kind(node.clip_position(e["event_id"], source)) for e in ends}
    assert set(kinds.values()) == {"A", "B"}, kinds

    # the clip over MQTT with the CLI: sample-exact, spans the pre-roll and the whole episode
    first = next(e for e in ends if kinds[e["event_id"]] == "A")
    fetched = tmp_path / "fetched.flac"
    result = node.cli("clip", first["event_id"], "--node", NODE, "--out", str(fetched))
    assert result.returncode == 0, (result.stdout, result.stderr)
    clip, rate = sf.read(str(fetched), dtype="int16")
    assert rate == RATE and len(clip) / RATE == pytest.approx(first["clip"]["duration"], abs=1e-3)
    start = _locate(np.asarray(clip), source)
    # 2 s of pre-roll before the tone at 2 s, the tone's 2 s, and the 2 clearing windows
    assert start == 0 and len(clip) == 6 * RATE, (start / RATE, len(clip) / RATE)
    assert first["clip"]["sha256"] == __import__("hashlib").sha256(fetched.read_bytes()).hexdigest()

    # drift: 4 of 10 windows over the threshold against 1 % expected
    node.watcher.wait_for(lambda m: node.state().get("sources", [{}])[0].get("drift", {}).get("status")
                          not in (None, "warming_up"), timeout=30,
                          what="the drift warmed up")
    drift = node.state()["sources"][0]["drift"]
    assert drift["status"] == "drifting" and drift["over_fraction"] > 0.2, drift  # the median is still normal

    # false positive: A's windows join the target domain; A stops alerting, B does not
    answer = node.cli("feedback", first["event_id"], "--node", NODE, "--label", "false_positive", "--note",
                      "the conveyor's buzzer", "--json")
    assert answer.returncode == 0, (answer.stdout, answer.stderr)
    (row,) = json.loads(answer.stdout)
    assert row["ok"] is True and row["result"]["refs_added"] >= 2 and row["result"]["domain"] == "target"
    print(f"\n[operator loop] feedback took effect in {row['seconds']:.2f} s (bank rebuilt in "
          f"{row['result']['seconds']:.2f} s)")
    mark = len(node.ends())
    node.watcher.wait_for(lambda m: len(node.ends()) >= mark + 4, timeout=60, what="four more episodes")
    after = [e for e in node.ends()[mark + 1:] if e.get("clip", {}).get("status") == "ready"]
    later = [_kind(node.clip_position(e["event_id"], source)) for e in after]
    assert later and all(k == "B" for k in later), later
    state = node.state()["sources"][0]
    assert state["bank"]["counts"]["target"] == row["result"]["refs_added"]
    meta = json.loads((node.evidence / f"{first['event_id']}.json").read_text())
    assert meta["label"] == "false_positive" and meta["note"] == "the conveyor's buzzer"

    # undo: the bank is what it was, and A alerts again
    undo = node.command("feedback", {"event_id": first["event_id"], "undo": True})
    assert undo["ok"] is True and undo["result"]["refs_removed"] == row["result"]["refs_added"], undo
    assert undo["result"]["bank_sha256"] == original_bank
    mark = len(node.ends())
    node.watcher.wait_for(lambda m: "A" in [_kind(node.clip_position(e["event_id"], source))
                                             for e in node.ends()[mark + 1:] if e.get("clip", {}).get("status")
                                             == "ready"], timeout=60, what="A alerting again after the undo")

    # hostile feedback: each refused naming the argument, the agent keeps running
    hostile: list[tuple[dict[str, Any], str]] = [
        ({"event_id": "nope", "label": "true_positive"}, "event_id"),
        ({"event_id": first["event_id"]}, "label"),
        ({"label": "true_positive"}, "event_id"),
        ({"event_id": "../../etc/passwd", "label": "true_positive"}, "event_id"),
        ({"event_id": first["event_id"], "label": "maybe"}, "label"),
        ({"event_id": first["event_id"], "undo": True}, "event_id"),
        ({"event_id": first["event_id"], "label": "true_positive", "note": "x" * 2000}, "note"),
        ({"event_id": first["event_id"], "label": "false_positive", "extra": 1}, "extra")]
    for args, path in hostile:
        answer = node.command("feedback", args)
        assert answer["ok"] is False and answer["error"].startswith(f"{path}:"), (args, answer)
    others: list[tuple[str, dict[str, Any], str]] = [
        ("clip", {"event_id": first["event_id"], "chunk_bytes": 10}, "chunk_bytes"),
        ("clip", {"event_id": first["event_id"], "chunk_bytes": True}, "chunk_bytes"),
        ("clip", {"event_id": "a/../b"}, "event_id"),
        ("clip", {"event_id": str(uuid.uuid4())}, "event_id"),
        ("clip", {}, "event_id"),
        ("learn", {"source": "nope"}, "source"),
        ("learn", {"domain": "both"}, "domain"),
        ("learn", {"minutes": 1e9}, "minutes"),
        ("learn", {"cancel": True}, "source"),
        ("rebuild", {}, "source")]
    for name, args, path in others:
        answer = node.command(name, args)
        assert answer["ok"] is False and answer["error"].startswith(f"{path}:"), (name, args, answer)
    assert node.proc.poll() is None


def test_learning_on_site_then_rebuild(tmp_path: Path) -> None:
    """No bank: the source learns 24 s of its audio (a transient in it is left out as an outlier, a clipping
    window as a fault), then monitors: its normal audio stays quiet and the anomaly at [30, 36) s alerts."""
    audio = noise(40, 0.05, 3)
    audio[12 * RATE:12 * RATE + RATE // 2] += noise(0.5, 0.2, 5)  # a door slam during the learning period
    audio[18 * RATE:18 * RATE + RATE // 2] += _tone(0.5, 300, 1.5)  # a clipping input: a fault, never learned
    audio[30 * RATE:36 * RATE] += _tone(6, 440, 0.6)
    wav = tmp_path / "site.wav"
    write_wav(wav, audio, RATE)
    source = _input_ints(wav)
    node = _start(tmp_path, wav, "    learn: {minutes: 0.4, min_windows: 10}\n    publish_scores: true", None)
    try:
        node.watcher.wait_for(lambda m: any(s.get("sources", [{}])[0].get("learning", {}) and
                                            s["sources"][0]["learning"].get("active") and
                                            s["sources"][0]["learning"]["percent"] > 0
                                            for s in node.watcher.on(f"{BASE}/state") if isinstance(s, dict)),
                              timeout=30, what="learning progress in the state")
        node.watcher.wait_for(lambda m: node.results("learn"), timeout=60, what="the learning's result")
        (learned,) = node.results("learn")
        assert learned["ok"] is True, learned
        result = learned["result"]
        assert result["windows"] >= 23 and result["outliers"] >= 1 and result["faults"] >= 1, result
        assert result["kept"] == result["windows"] - result["outliers"], result
        print(f"\n[operator loop] learned {result['kept']} windows ({result['outliers']} outliers left out) and "
              f"built the bank in {result['build_seconds']:.2f} s")
        node.watcher.wait_for(lambda m: node.state().get("sources", [{}])[0].get("monitoring") is True, timeout=10,
                              what="monitoring after learning")
        node.watcher.wait_for(lambda m: len([e for e in node.ends() if e.get("clip", {}).get("status") == "ready"])
                              >= 2, timeout=60, what="two episodes after learning")
        for end in [e for e in node.ends() if e.get("clip", {}).get("status") == "ready"]:
            begin, _ = node.clip_position(end["event_id"], source)
            assert 29 * RATE <= begin <= 36 * RATE, begin / RATE  # only the anomaly alerts
        scores = [s for s in node.watcher.on(f"{BASE}/fan/score") if isinstance(s, dict)]
        assert any(s["over"] for s in scores) and sum(s["over"] for s in scores) < len(scores) / 3

        rebuilt = node.command("rebuild", {"source": "fan"})
        assert rebuilt["ok"] is True and rebuilt["result"]["from_clip"] == result["clip"]["id"], rebuilt
        assert abs(rebuilt["result"]["windows"] - result["windows"]) <= 1
        refused = node.command("learn", {"source": "fan", "minutes": 0})
        assert refused["ok"] is False and refused["error"].startswith("minutes:")
    finally:
        _stop(node)


def test_the_quota_evicts_the_oldest_clips(tmp_path: Path) -> None:
    audio = noise(4, 0.05, 9)
    audio[1 * RATE:3 * RATE] += _tone(2, 440, 0.6)
    wav = tmp_path / "busy.wav"
    write_wav(wav, audio, RATE)
    node = _start(tmp_path, wav, "", tmp_path / "bank", evidence="{pre_roll_seconds: 2, max_bytes: 1000000}")
    try:
        node.watcher.wait_for(lambda m: node.state().get("evidence", {}).get("evicted", 0) >= 3, timeout=120,
                              what="clips evicted by the quota")
        usage = node.state()["evidence"]
        assert usage["bytes"] <= usage["max_bytes"] == 1_000_000, usage
        ready = [e["event_id"] for e in node.ends() if e.get("clip", {}).get("status") == "ready"]
        kept = [i for i in ready if (node.evidence / f"{i}.flac").exists()]
        gone = [i for i in ready if not (node.evidence / f"{i}.flac").exists()]
        assert gone and kept
        assert max(ready.index(i) for i in gone) < min(ready.index(i) for i in kept), "not oldest first"
    finally:
        _stop(node)
