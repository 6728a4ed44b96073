"""Decision with hysteresis: alert episodes (new / update / end) from per-window scores.

An episode opens after `raise_after` consecutive windows score over the threshold and closes after
`clear_after` consecutive windows under it. Every event of one episode carries the same uuid
`event_id` and an increasing `seq`, so a consumer can de-duplicate at-least-once deliveries.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass
from typing import Any

from edge_agent.agent.config import HysteresisConfig
from edge_agent.agent.payloads import AlertContext, alert_payload


@dataclass
class _Episode:
    event_id: str
    start: float
    top_score: float
    seq: int = 0
    windows_over: int = 0
    since_update: int = 0


class EpisodeTracker:
    """Feeds one score per window; returns the alert events that window causes (zero or one)."""

    def __init__(self, context: AlertContext, hysteresis: HysteresisConfig):
        self.context = context
        self.hysteresis = hysteresis
        self.episode: _Episode | None = None
        self._over_run = 0
        self._run_start = 0.0
        self._run_top = -math.inf
        self._under_run = 0
        self._first_under = 0.0

    def reconfigure(self, context: AlertContext, hysteresis: HysteresisConfig) -> None:
        """New threshold / model / bank / hysteresis for the next windows; an open episode stays open."""
        self.context = context
        self.hysteresis = hysteresis

    def observe(self, window_start: float, score: float) -> list[dict[str, Any]]:
        over = bool(score > self.context.threshold)
        if self.episode is None:
            return self._idle(window_start, score, over)
        return self._active(window_start, score, over)

    def snapshot(self, last_window: float) -> dict[str, Any] | None:
        """The open episode as it must survive a crash (None: no episode open): enough to end it later."""
        episode = self.episode
        if episode is None:
            return None
        return {"event_id": episode.event_id, "seq": episode.seq, "start": episode.start,
                "top_score": episode.top_score, "windows_over": episode.windows_over, "last_window": last_window,
                "context": dataclasses.asdict(self.context)}

    def close(self, at: float, reason: str) -> list[dict[str, Any]]:
        """End an open episode now (agent stopping, source removed)."""
        if self.episode is None:
            return []
        event = self._event("end", at, score=None, end=at, reason=reason)
        self.episode = None
        self._over_run = 0
        return [event]

    def _idle(self, window_start: float, score: float, over: bool) -> list[dict[str, Any]]:
        if not over:
            self._over_run = 0
            self._run_top = -math.inf
            return []
        if self._over_run == 0:
            self._run_start = window_start
        self._over_run += 1
        self._run_top = max(self._run_top, score)
        if self._over_run < self.hysteresis.raise_after:
            return []
        self.episode = _Episode(event_id=str(uuid.uuid4()), start=self._run_start, top_score=self._run_top,
                                windows_over=self._over_run)
        self._over_run = 0
        self._under_run = 0
        return [self._event("new", window_start, score)]

    def _active(self, window_start: float, score: float, over: bool) -> list[dict[str, Any]]:
        episode = self.episode
        assert episode is not None
        episode.since_update += 1
        if over:
            self._under_run = 0
            episode.windows_over += 1
            peak = score > episode.top_score
            episode.top_score = max(episode.top_score, score)
            if peak or episode.since_update >= self.hysteresis.update_every:
                return [self._event("update", window_start, score)]
            return []
        if self._under_run == 0:
            self._first_under = window_start
        self._under_run += 1
        if self._under_run < self.hysteresis.clear_after:
            if episode.since_update >= self.hysteresis.update_every:
                return [self._event("update", window_start, score)]
            return []
        event = self._event("end", window_start, score, end=self._first_under, reason="cleared")
        self.episode = None
        self._under_run = 0
        return [event]

    def _event(self, kind: str, window_start: float, score: float | None, end: float | None = None,
               reason: str | None = None) -> dict[str, Any]:
        episode = self.episode
        assert episode is not None
        if kind != "new":
            episode.seq += 1
        episode.since_update = 0
        return alert_payload(self.context, kind, episode.event_id, episode.seq, episode.start, end, window_start,
                             score, episode.top_score, episode.windows_over, reason)


def end_after_restart(snapshot: dict[str, Any], reason: str = "restarted") -> dict[str, Any]:
    """The `end` event of an episode that a crash or power cut left open (`snapshot` as saved): it ends at
    the last window scored before the stop."""
    ctx = AlertContext(**snapshot["context"])
    last = float(snapshot["last_window"])
    return alert_payload(ctx, "end", str(snapshot["event_id"]), int(snapshot["seq"]) + 1, float(snapshot["start"]),
                         last, last, None, float(snapshot["top_score"]), int(snapshot["windows_over"]), reason)
