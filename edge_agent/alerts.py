"""Decision with hysteresis, alert episodes (new / update / end), and the MQTT payload builders.

An episode opens after `raise_after` consecutive windows score over the threshold and closes after
`clear_after` consecutive windows under it. Every event of one episode carries the same uuid
`event_id` and an increasing `seq`, so a consumer can de-duplicate at-least-once deliveries.
Payloads follow edge_agent/schemas/*.json (`SCHEMA_VERSION`).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge_agent.config import HysteresisConfig

SCHEMA_VERSION = 1


def iso_time(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds and a Z suffix."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AlertContext:
    """What every event of a source names: who sent it and which model / bank judged it."""

    node: str
    source: str
    model: str
    bank: str
    threshold: float


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
        ctx = self.context
        payload: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "type": kind,
            "event_id": episode.event_id,
            "seq": episode.seq,
            "node": ctx.node,
            "source": ctx.source,
            "start": iso_time(episode.start),
            "end": iso_time(end) if end is not None else None,
            "window_start": iso_time(window_start),
            "score": _finite(score),
            "top_score": _finite(episode.top_score),
            "threshold": ctx.threshold,
            "windows_over": episode.windows_over,
            "model": ctx.model,
            "bank": ctx.bank,
            "replayed": False,
        }
        if reason is not None:
            payload["reason"] = reason
        return payload


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def score_payload(ctx: AlertContext, window_start: float, score: float, latency_ms: float,
                  layers: dict[str, float] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "node": ctx.node,
        "source": ctx.source,
        "window_start": iso_time(window_start),
        "score": _finite(score),
        "threshold": ctx.threshold,
        "over": bool(score > ctx.threshold),
        "model": ctx.model,
        "bank": ctx.bank,
        "latency_ms": round(latency_ms, 3),
        "replayed": False,
    }
    if layers:
        payload["layers"] = {name: _finite(v) for name, v in layers.items()}
    return payload


def config_result(ok: bool, request_id: str | None, config_hash: str | None = None,
                  error: dict[str, Any] | None = None, restart_required: list[str] | None = None,
                  ) -> dict[str, Any]:
    """Answer on <prefix>/<node>/config/result; `error` has `path`, `message` and `value`."""
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "ok": ok, "request_id": request_id,
                               "time": iso_time(datetime.now(UTC).timestamp()), "config_hash": config_hash}
    if error is not None:
        payload["error"] = error
    if restart_required:
        payload["restart_required"] = restart_required
    return payload


def command_result(command: str, ok: bool, request_id: str | None, result: dict[str, Any] | None = None,
                   error: str | None = None) -> dict[str, Any]:
    """Answer on <prefix>/<node>/cmd/result."""
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command, "ok": ok,
                               "request_id": request_id, "time": iso_time(datetime.now(UTC).timestamp())}
    if result is not None:
        payload["result"] = result
    if error is not None:
        payload["error"] = error
    return payload
