"""The agent on overlapping windows at another rate than its model: each window's copy at the model's rate is
cut from the stream resampled once, and the scores are those of per-window resampling (up to the few edge
samples where the stream has real neighbours instead of zeros)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_agent.audio.resample import resample
from edge_agent.audio.wavio import read_wav, write_wav
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import Scorer

from .agent_helpers import RATE, REPO, noise


def test_scores_from_the_resampled_stream_match_per_window_resampling(tmp_path: Path, toy_model: Path,
                                                                       bank_dir: Path) -> None:
    wav = tmp_path / "at16k.wav"
    audio = resample(noise(6, 0.05, 5), RATE, 2 * RATE)  # the bank's sound, recorded at twice the model's rate
    write_wav(wav, audio, 2 * RATE)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
node: n
state_dir: {tmp_path / "state"}
model: {{path: {toy_model}}}
sources:
  - {{name: fan, type: file, path: {wav}, realtime: true, speed: 20, bank: {bank_dir}, window_seconds: 1,
      hop_seconds: 0.25, publish_scores: true, audio_checks: {{band_drop_db: 0}}, scoring: {{feature_stats: off,
      fusion: mean}}}}
output: {{jsonl: {tmp_path / "alerts.jsonl"}, stdout: true}}
metrics: {{enabled: false}}
""")
    result = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(config)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "event=stream_resampling source=fan rate=16000 rates=8000" in result.stderr
    scores = [json.loads(line)["score"] for line in result.stdout.splitlines() if '"latency_ms"' in line]
    samples, rate = read_wav(wav)
    starts = range(0, len(samples) - rate + 1, rate // 4)
    encoder = Encoder(toy_model)
    # the comparison is of the audio: ld-domain's scale-free ratios (no standardized members, whose z-units
    # around the refs' own scores have no fixed scale) keep a relative tolerance meaningful
    scorer = Scorer.fit([MemoryBank.load(bank_dir, expect=encoder.info)], ScoringConfig(feature_stats="off",
                                                                                        fusion="mean"))
    offline = [float(scorer.score([encoder.embed(resample(samples[s:s + rate], rate, RATE)[None, :])])[0])
               for s in starts]
    assert len(scores) == len(offline) == 21
    np.testing.assert_allclose(scores, offline, rtol=0.02)
