"""Without an `mqtt` section: alerts as JSON lines on stdout and in a file; several sources, each its own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from .agent_helpers import REPO, agent_command, build_bank, noise, write_anomaly_wav


def test_two_sources_with_own_banks_thresholds_and_hysteresis_to_jsonl(tmp_path: Path, toy_model: Path,
                                                                       validators: dict) -> None:
    build_bank(toy_model, tmp_path / "bank_a", seed=1)
    build_bank(toy_model, tmp_path / "bank_b", seed=2, amplitude=0.5)  # b's normal is as loud as the tone
    write_anomaly_wav(tmp_path / "a.wav", 12, (4, 8))
    write_anomaly_wav(tmp_path / "b.wav", 12, (4, 8), amplitude=0.5, loud=0.2)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
node: jsonl-node
model: {{path: {toy_model}}}
sources:
  - {{name: a, type: file, path: a.wav, realtime: false, bank: bank_a, window_seconds: 1, hop_seconds: 1,
      hysteresis: {{raise_after: 3, clear_after: 1}}}}
  - {{name: b, type: file, path: b.wav, realtime: false, bank: bank_b, window_seconds: 1, hop_seconds: 1,
      threshold: 1000000.0}}
output: {{jsonl: out/alerts.jsonl}}
metrics: {{enabled: false}}
""")
    result = subprocess.run(agent_command(cfg), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    stored = [json.loads(line) for line in (tmp_path / "out" / "alerts.jsonl").read_text().splitlines()]
    assert printed == stored
    for event in stored:
        validators["alert"].validate(event)
    assert {e["source"] for e in stored} == {"a"}  # b's threshold is out of reach
    assert stored[0]["type"] == "new" and stored[-1]["type"] == "end"
    new = stored[0]
    assert new["windows_over"] == 3 and new["window_start"] > new["start"]  # raised on the 3rd window
    assert "event=all_sources_finished" in result.stderr


def test_stdin_pcm_through_the_agent(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    audio = noise(12, 0.05, seed=9)  # at the toy model's 8 kHz, like its bank
    audio[4 * 8000:8 * 8000] += 0.6
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
node: stdin-node
model: {{path: {toy_model}}}
sources:
  - {{name: line, type: stdin, sample_rate: 8000, bank: {bank_dir}, window_seconds: 1, hop_seconds: 1,
      publish_scores: true}}
output: {{jsonl: alerts.jsonl}}
metrics: {{enabled: false}}
""")
    result = subprocess.run(agent_command(cfg), input=pcm, capture_output=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    scores = [x for x in lines if "type" not in x]
    alerts = [x for x in lines if "type" in x]
    assert len(scores) == 12 and [s["over"] for s in scores] == [4 <= i < 8 for i in range(12)]
    assert [a["type"] for a in alerts][0::max(1, len(alerts) - 1)] == ["new", "end"]
