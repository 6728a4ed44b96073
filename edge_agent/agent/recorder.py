"""Evidence for every alert episode: the windows' audio and embeddings, from a pre-roll before the episode
opened to its end, kept in the evidence store; each alert event says where its clip stands.

Fed by the inference thread (after each window's decision, in window order); the control thread closes the
clip of a source a new config removed (a lock orders the two). The windows before an
episode opens are held in a short per-source buffer (the pre-roll); when an event `new` opens the episode
they are written first, then every window until the `end`, which finishes the clip and carries its
reference (id, duration, bytes, sha256).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.agent.evidence import ClipWriter, EvidenceConfig, EvidenceStore
from edge_agent.audio.windowing import Window
from edge_agent.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class _Held:
    window: Window
    score: float
    embeddings: list[dict[str, np.ndarray]]


@dataclass
class _Open:
    event_id: str
    episode_start: float
    writer: ClipWriter


class EvidenceRecorder:
    def __init__(self, store: EvidenceStore | None, cfg: EvidenceConfig) -> None:
        self.store = store
        self.cfg = cfg
        self._held: dict[str, deque[_Held]] = {}
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.cfg.enabled

    def window(self, source: str, window: Window, score: float, embeddings: list[dict[str, np.ndarray]],
               events: list[dict[str, Any]], hop_seconds: float, episode_start: float | None,
               context: dict[str, Any]) -> None:
        """Record one scored window of `source`; attach a `clip` entry to each of `events` (in place)."""
        if not self.enabled:
            return
        with self._lock:
            self._window(source, window, score, embeddings, events, hop_seconds, episode_start, context)

    def _window(self, source: str, window: Window, score: float, embeddings: list[dict[str, np.ndarray]],
                events: list[dict[str, Any]], hop_seconds: float, episode_start: float | None,
                context: dict[str, Any]) -> None:
        held = _Held(window, score, embeddings)
        for event in events:
            if event["type"] == "new" and source not in self._open:
                self._start(source, event["event_id"], episode_start if episode_start is not None
                            else window.start_time, window, context)
        current = self._open.get(source)
        if current is not None:
            self._add(current, held)
        for event in events:
            if event["type"] == "end":
                event["clip"] = self._finish(source, event, window.start_time + len(window.samples)
                                             / window.sample_rate)
            elif current is not None and event["event_id"] == current.event_id:
                event["clip"] = self._recording(current)
        if source not in self._open:
            buffer = self._held.get(source)
            keep = max(1, math.ceil(self.cfg.pre_roll_seconds / max(hop_seconds, 1e-3)) + 1)
            if buffer is None or buffer.maxlen != keep:
                buffer = deque(buffer or (), maxlen=keep)
                self._held[source] = buffer
            buffer.append(held)

    def close(self, source: str, events: list[dict[str, Any]], at: float) -> None:
        """The episode of `source` ends without a window (agent stopping, source removed): finish its clip."""
        if not self.enabled:
            return
        with self._lock:
            self._close(source, events, at)

    def _close(self, source: str, events: list[dict[str, Any]], at: float) -> None:
        for event in events:
            if event["type"] == "end" and source in self._open:
                event["clip"] = self._finish(source, event, at)
        self._held.pop(source, None)

    def _start(self, source: str, event_id: str, episode_start: float, window: Window,
               context: dict[str, Any]) -> None:
        assert self.store is not None
        writer = self.store.open_clip(event_id, source, window.sample_rate, context)
        current = _Open(event_id, episode_start, writer)
        self._open[source] = current
        pre_roll_from = episode_start - self.cfg.pre_roll_seconds
        for held in self._held.pop(source, deque()):
            end = held.window.start_time + len(held.window.samples) / held.window.sample_rate
            if end > pre_roll_from and held.window.start_time < window.start_time:
                self._add(current, held)
        log.info("evidence_started", source=source, event_id=event_id)

    def _add(self, current: _Open, held: _Held) -> None:
        w = held.window
        current.writer.add_window(w.start_time, w.samples, w.sample_rate, held.score, held.embeddings,
                                  in_episode=w.start_time >= current.episode_start - 1e-6)

    def _recording(self, current: _Open) -> dict[str, Any]:
        writer = current.writer
        if writer.failed:
            return {"id": current.event_id, "status": "failed", "error": writer.error}
        return {"id": current.event_id, "status": "recording", "duration": round(writer.seconds, 3)}

    def _finish(self, source: str, event: dict[str, Any], at: float) -> dict[str, Any]:
        current = self._open.pop(source)
        reason = str(event.get("reason") or "cleared")
        ref = current.writer.finish(at, reason)
        if ref is None:
            return {"id": current.event_id, "status": "failed", "error": current.writer.error}
        assert self.store is not None
        evicted = self.store.enforce_quota()
        if evicted:
            log.info("evidence_evicted", clips=len(evicted))
        return {"status": "ready", **ref.as_dict()}
