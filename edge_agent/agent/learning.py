"""On-site commissioning: record a source's live audio for a while, then build its bank on the device.

A `LearnJob` collects the embeddings of every window the source delivers (windows with broken audio never
reach it: they are counted from the source's fault counters), and keeps the audio in the evidence store
when asked (so the bank can be rebuilt later with another model). `build_learned_banks` leaves out the
windows that look unlike the rest of the period (leave-one-out kNN outliers) and builds the bank:
`source` replaces the source domain (a bank from scratch when there is none), `target` the target domain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent.config import LearnConfig
from edge_agent.agent.evidence import ClipWriter
from edge_agent.audio.windowing import Window
from edge_agent.clock import compact_stamp
from edge_agent.errors import BankError
from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank_edit import Calibration, build_new_banks, edit_banks
from edge_agent.scoring.bank_set import BankSet
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import Enrolled
from edge_agent.scoring.outliers import OutlierResult, loo_outliers

MAX_LEARN_WINDOWS = 20_000


@dataclass
class LearnJob:
    source: str
    domain: str  # source | target
    seconds: float  # audio to record
    hop_seconds: float
    pace: float  # audio seconds per wall second (the replay speed of a file source; 1 for a microphone)
    request_id: str | None
    faults_at_start: int
    started_at: float = field(default_factory=time.time)
    starts: list[float] = field(default_factory=list)
    # per member model: {layer: [rows]}
    embeddings: list[dict[str, list[np.ndarray]]] = field(default_factory=list)
    faults: int = 0
    writer: ClipWriter | None = None
    open_audio: Callable[[int], ClipWriter | None] | None = None  # opens `writer` at the first window's rate
    clip_id: str | None = None

    @property
    def windows(self) -> int:
        return len(self.starts)

    @property
    def recorded_seconds(self) -> float:
        return self.windows * self.hop_seconds

    def collect(self, start_time: float, embs: list[dict[str, np.ndarray]]) -> bool:
        """One window's embeddings (per member, {layer: [D]}); True once the period is recorded."""
        if not self.embeddings:
            self.embeddings = [{} for _ in embs]
        for parts, emb in zip(self.embeddings, embs, strict=True):
            for layer, row in emb.items():
                parts.setdefault(layer, []).append(np.asarray(row, dtype=np.float32))
        self.starts.append(start_time)
        return self.recorded_seconds >= self.seconds or self.windows >= MAX_LEARN_WINDOWS

    def keep_audio(self, window: Window) -> None:
        """The window's audio into the kept recording (opened at the first window, at the source's rate)."""
        if self.writer is None and self.open_audio is not None:
            self.writer, self.open_audio = self.open_audio(window.sample_rate), None
        if self.writer is not None:
            self.writer.add_window(window.start_time, window.samples, window.sample_rate, None, None,
                                   in_episode=False)

    def progress(self) -> dict[str, Any]:
        percent = min(100.0, 100.0 * self.recorded_seconds / self.seconds) if self.seconds > 0 else 100.0
        left = max(0.0, self.seconds - self.recorded_seconds)
        return {"domain": self.domain, "percent": round(percent, 1), "windows": self.windows,
                "seconds_recorded": round(self.recorded_seconds, 1), "seconds_total": round(self.seconds, 1),
                "eta_seconds": round(left / self.pace, 1), "faults": self.faults,
                "request_id": self.request_id, "clip": self.clip_id}

    def stacked(self) -> list[dict[str, np.ndarray]]:
        return [{layer: np.stack(rows) for layer, rows in parts.items()} for parts in self.embeddings]


@dataclass(frozen=True)
class Learned:
    enrolled: Enrolled
    outliers: OutlierResult
    windows: int
    kept: int


def build_learned_banks(bank_dir: Path, models: list[MemberModel], current: BankSet | None, job: LearnJob,
                        scoring: ScoringConfig, lcfg: LearnConfig, calibration: Calibration) -> Learned:
    """Leave out the outlier windows of `job`, then build the bank of its domain (see the module doc)."""
    embeddings = job.stacked()
    if not embeddings or job.windows < 2:
        raise BankError(f"source {job.source!r}: learning recorded {job.windows} window(s); at least 2 are needed")
    outliers = loo_outliers(embeddings, k=lcfg.outlier_k, z=lcfg.outlier_z,
                            max_fraction=lcfg.max_outlier_fraction)
    keep = outliers.keep
    kept = int(keep.sum())
    if kept < lcfg.min_windows:
        raise BankError(f"source {job.source!r}: {kept} window(s) kept of {job.windows} "
                        f"({outliers.excluded()} outliers); learn.min_windows is {lcfg.min_windows}")
    stamp = compact_stamp()
    names = [f"learn:{stamp}:{i:05d}" for i in range(kept)]
    chosen = [{layer: arr[keep] for layer, arr in member.items()} for member in embeddings]
    if current is None:
        if job.domain != "source":
            raise BankError(f"source {job.source!r} has no bank yet: learn the source domain first")
        enrolled = build_new_banks(bank_dir, models, chosen, names, scoring, calibration)
    else:
        if [m.model_sha256 for m in current.models] != [m.model_sha256 for m in models]:
            raise BankError(f"the bank of source {job.source!r} was built with other models")
        enrolled = edit_banks(bank_dir, current, scoring, calibration, replace_domain=job.domain,
                              add_domain=job.domain, add=chosen, add_names=names)
    return Learned(enrolled, outliers, job.windows, kept)
