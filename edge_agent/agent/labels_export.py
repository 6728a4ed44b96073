"""`edge-agent labels export DIR`: the clips operators labelled, as a DCASE-layout dataset, so that
`edge-agent evaluate` can measure the device's real accuracy.

  DIR/<source>/test/section_00_source_test_<normal|anomaly>_<NNNN>_<event_id>.wav
      one per labelled episode: false_positive -> normal, true_positive -> anomaly; the audio from the
      episode's first window over the threshold to its end (the pre-roll left out)
  DIR/<source>/train/section_00_source_train_normal_<NNNN>.wav
      the kept learning audio of the source (what its bank was learned from), cut into windows of the
      length it was learned with (no overlap)

WAV files are 16-bit PCM at the clip's rate (the capture rate of the model set that recorded it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf  # type: ignore[import-untyped]

from edge_agent.agent.evidence import ClipInfo, EvidenceConfig, EvidenceStore
from edge_agent.errors import EdgeAsdError

LABEL_DIRS = {"false_positive": "normal", "true_positive": "anomaly"}


@dataclass
class ExportSummary:
    directory: Path
    test: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {normal, anomaly}
    train: dict[str, int] = field(default_factory=dict)  # source -> clips
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "test": self.test, "train": self.train, "skipped": self.skipped}


def export_labels(state_dir: Path, out: Path) -> ExportSummary:
    directory = state_dir / "evidence"
    if not directory.is_dir():
        raise EdgeAsdError(f"{directory}: no evidence store (has the agent run with this state_dir?)")
    store = EvidenceStore(directory, EvidenceConfig(), node="export")
    clips = store.list()
    summary = ExportSummary(out)
    numbers: dict[tuple[str, str], int] = {}
    for info in clips:
        kind = (info.meta.get("context") or {}).get("kind")
        if kind == "learning":
            _export_train(info, out, summary)
            continue
        if info.label not in LABEL_DIRS:
            continue
        label = LABEL_DIRS[info.label]
        key = (info.source, label)
        numbers[key] = numbers.get(key, 0) + 1
        target = out / info.source / "test" / (f"section_00_source_test_{label}_{numbers[key]:04d}_"
                                              f"{info.event_id}.wav")
        try:
            audio = _episode_audio(store, info)
        except (OSError, RuntimeError, ValueError) as exc:
            summary.skipped.append(f"{info.event_id}: {exc}")
            continue
        _write(target, audio, info.sample_rate)
        summary.test.setdefault(info.source, {"normal": 0, "anomaly": 0})[label] += 1
    return summary


def _episode_audio(store: EvidenceStore, info: ClipInfo) -> np.ndarray:
    audio, rate = sf.read(str(info.audio_path), dtype="int16", always_2d=False)
    windows = store.windows(info.event_id)
    inside = np.flatnonzero(np.asarray(windows.in_episode, dtype=bool))
    if inside.size:
        begins = float(windows.start[inside[0]])
        skipped = sum(float(g.get("seconds", 0.0)) for g in info.meta.get("gaps") or []
                      if isinstance(g, dict) and float(g.get("at_epoch", math.inf)) < begins)
        offset = max(0, round((begins - info.start - skipped) * rate))  # gaps are not in the file
        if offset < len(audio):
            audio = audio[offset:]
    if len(audio) == 0:
        raise ValueError("the clip holds no audio")
    return np.asarray(audio, dtype=np.int16)


def _export_train(info: ClipInfo, out: Path, summary: ExportSummary) -> None:
    context = info.meta.get("context") or {}
    seconds = float(context.get("window_seconds") or 10.0)
    try:
        audio, rate = sf.read(str(info.audio_path), dtype="int16", always_2d=False)
    except (OSError, RuntimeError) as exc:
        summary.skipped.append(f"{info.event_id}: {exc}")
        return
    step = max(1, round(seconds * rate))
    count = summary.train.get(info.source, 0)
    for start in range(0, len(audio) - step + 1, step):
        count += 1
        _write(out / info.source / "train" / f"section_00_source_train_normal_{count:04d}.wav",
               audio[start:start + step], rate)
    summary.train[info.source] = count


def _write(path: Path, audio: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, int(rate), subtype="PCM_16", format="WAV")
