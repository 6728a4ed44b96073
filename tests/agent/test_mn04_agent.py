"""The agent with a real exported encoder (random-init mn04): alerts on the broker, valid payloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.audio.wavio import write_wav
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer

from .agent_helpers import Mosquitto, Watcher, noise, start_agent

RATE = 32000


def test_mn04_agent_publishes_schema_valid_episode(tmp_path: Path, mn04_random_onnx: Path, broker: Mosquitto,
                                                   watcher: Watcher, validators: dict) -> None:
    encoder = Encoder(mn04_random_onnx)
    normal = noise(80, 0.05, seed=5, rate=RATE).reshape(8, 10 * RATE)
    bank = MemoryBank(encoder.info, {"source": encoder.embed(normal)})
    scorer = BankScorer.fit(bank, ScoringConfig())
    scorer.save(tmp_path / "bank", threshold=calibrate(scorer.loo_scores()), model_sha256=encoder.model_sha256)
    audio = noise(60, 0.05, seed=6, rate=RATE)
    t = np.arange(20 * RATE) / RATE
    audio[20 * RATE:40 * RATE] += (0.6 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    write_wav(tmp_path / "fan.wav", audio, RATE)
    cfg = tmp_path / "agent.yaml"
    # Random weights: the threshold is set explicitly (a loud tone scores ~10x the normal windows).
    cfg.write_text(f"""
node: mn04-node
state_dir: {tmp_path / "state"}
model: {{path: {mn04_random_onnx}, intra_op_threads: 2}}
sources:
  - name: fan
    type: file
    path: {tmp_path / "fan.wav"}
    realtime: false
    bank: {tmp_path / "bank"}
    threshold: 3.0
    window_seconds: 10
    hop_seconds: 5
    publish_scores: true
    hysteresis: {{raise_after: 2, clear_after: 2}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, spool_scores: true}}
metrics: {{enabled: false}}
""")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    assert proc.wait(120) == 0, log.read_text()
    base = "edge-asd/mn04-node"
    watcher.wait_for(lambda m: any(t == f"{base}/status" and p == "stopped" for t, p, _ in m), what="stopped")
    scores = watcher.on(f"{base}/fan/score")
    events = watcher.on(f"{base}/fan/alert")
    for s in scores:
        validators["score"].validate(s)
    for e in events:
        validators["alert"].validate(e)
    assert len(scores) == 11
    over = [s["over"] for s in scores]
    shown = [round(s["score"], 2) for s in scores]
    # windows at 20, 25, 30 s lie inside the tone (20-40 s); those at 0-10 and 40-50 s hold none of it;
    # the two that straddle an edge may go either way
    assert over[4:7] == [True] * 3 and not any(over[:3]) and not any(over[8:]), shown
    assert events[0]["type"] == "new" and events[-1]["type"] == "end"
    first_over = scores[over.index(True)]["window_start"]
    assert events[0]["model"] == encoder.model_id and events[0]["start"] == first_over
