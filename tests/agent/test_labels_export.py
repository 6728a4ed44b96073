"""`edge-agent labels export`: labelled clips become DCASE test clips (the episode's audio without its pre-roll),
kept learning audio becomes train clips, and the result is a dataset the evaluator reads."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

from edge_agent.agent.evidence import EvidenceConfig, EvidenceStore
from edge_agent.evaluation.dcase import scan_dataset

from .agent_helpers import REPO

RATE = 16000
T0 = 1_780_000_000.0


def _record(store: EvidenceStore, signal: np.ndarray, windows: int, pre_roll: int, kind: str = "episode") -> str:
    """An episode of `windows` one-second windows (the first `pre_roll` before the episode), hop 1 s."""
    event_id = str(uuid.uuid4()) if kind == "episode" else f"learn-{uuid.uuid4().hex[:8]}"
    context = {"model": "m"} if kind == "episode" else {"kind": "learning", "window_seconds": 2.0}
    writer = store.open_clip(event_id, "fan", RATE, context)
    for i in range(windows):
        samples = signal[i * RATE:(i + 1) * RATE]
        writer.add_window(T0 + i, samples, RATE, 1.0, [{"l": np.zeros(4, np.float32)}], in_episode=i >= pre_roll)
    assert writer.finish(T0 + windows, "cleared") is not None
    return event_id


def test_labelled_clips_and_learning_audio_become_a_dcase_dataset(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path / "state" / "evidence", EvidenceConfig(), "n")
    ints = np.random.default_rng(0).integers(-20000, 20000, 10 * RATE).astype(np.int16)
    signal = ints.astype(np.float32) / 32768.0
    false_alarm = _record(store, signal, 5, pre_roll=2)
    real = _record(store, signal, 4, pre_roll=1)
    _record(store, signal, 3, pre_roll=1)  # not labelled: not exported
    learning = _record(store, signal, 7, pre_roll=0, kind="learning")
    store.label(false_alarm, "false_positive", "buzzer")
    store.label(real, "true_positive")

    out = tmp_path / "dataset"
    result = subprocess.run([sys.executable, "-m", "edge_agent", "labels", "export", str(out), "--state-dir",
                             str(tmp_path / "state")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["test"] == {"fan": {"normal": 1, "anomaly": 1}} and summary["train"] == {"fan": 3}
    assert summary["skipped"] == []

    dataset = scan_dataset(out)
    clips = dataset.machines["fan"]
    labels = sorted((c.split, c.label, c.domain) for c in clips.train + clips.test)
    assert labels == [("test", "anomaly", "source"), ("test", "normal", "source")] + [("train", "normal", "source")] * 3
    normal = next(c for c in clips.test if c.label == "normal")
    assert false_alarm in normal.path.name
    audio, rate = sf.read(str(normal.path), dtype="int16")
    assert rate == RATE and np.array_equal(audio, ints[2 * RATE:5 * RATE]), "the episode without its pre-roll"
    anomaly = next(c for c in clips.test if c.label == "anomaly")
    assert np.array_equal(sf.read(str(anomaly.path), dtype="int16")[0], ints[1 * RATE:4 * RATE])
    train = sorted(clips.train, key=lambda c: c.path.name)
    assert [len(sf.read(str(c.path), dtype="int16")[0]) for c in train] == [2 * RATE] * 3  # 7 s in 2 s windows
    assert learning not in " ".join(c.path.name for c in train)


def test_a_missing_store_is_one_line_naming_it(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "edge_agent", "labels", "export", str(tmp_path / "out"),
                             "--state-dir", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
