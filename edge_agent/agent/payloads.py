"""The wire format of everything the agent publishes: alerts, scores, config and command results.

Payloads follow edge_agent/agent/schemas/*.json (`SCHEMA_VERSION`); times are UTC ISO 8601 strings and
non-finite scores are null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edge_agent.clock import iso_time

SCHEMA_VERSION = 1


@dataclass
class AlertContext:
    """What every event of a source names: who sent it and which model / bank judged it."""

    node: str
    source: str
    model: str
    bank: str
    threshold: float


def alert_payload(ctx: AlertContext, kind: str, event_id: str, seq: int, start: float, end: float | None,
                  window_start: float, score: float | None, top_score: float, windows_over: int,
                  reason: str | None = None) -> dict[str, Any]:
    """One event (`new`, `update` or `end`) of an alert episode, on <prefix>/<node>/<source>/alert."""
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": kind,
        "event_id": event_id,
        "seq": seq,
        "node": ctx.node,
        "source": ctx.source,
        "start": iso_time(start),
        "end": iso_time(end) if end is not None else None,
        "window_start": iso_time(window_start),
        "score": finite_or_none(score),
        "top_score": finite_or_none(top_score),
        "threshold": ctx.threshold,
        "windows_over": windows_over,
        "model": ctx.model,
        "bank": ctx.bank,
        "replayed": False,
    }
    if reason is not None:
        payload["reason"] = reason
    return payload


def finite_or_none(value: float | None) -> float | None:
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
        "score": finite_or_none(score),
        "threshold": ctx.threshold,
        "over": bool(score > ctx.threshold),
        "model": ctx.model,
        "bank": ctx.bank,
        "latency_ms": round(latency_ms, 3),
        "replayed": False,
    }
    if layers:
        payload["layers"] = {name: finite_or_none(v) for name, v in layers.items()}
    return payload


def config_result(ok: bool, request_id: str | None, config_hash: str | None = None,
                  error: dict[str, Any] | None = None, restart_required: list[str] | None = None,
                  phase: str | None = None, version: int | None = None, origin: str | None = None) -> dict[str, Any]:
    """Answer on <prefix>/<node>/config/result; `error` has `path`, `message` and `value`. `phase`: refused (never
    applied), committed (ran healthy on trial, now the config file), rolled_back (failed its trial). A desired
    document's answer carries its `version` and `origin` (`node` or `group/<group>`)."""
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "ok": ok, "request_id": request_id,
                               "time": iso_time(), "config_hash": config_hash}
    if phase is not None:
        payload["phase"] = phase
    if version is not None:
        payload["version"] = version
    if origin is not None:
        payload["origin"] = origin
    if error is not None:
        payload["error"] = error
    if restart_required:
        payload["restart_required"] = restart_required
    return payload


def command_result(command: str, ok: bool, request_id: str | None, result: dict[str, Any] | None = None,
                   error: str | None = None) -> dict[str, Any]:
    """Answer on <prefix>/<node>/cmd/result."""
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command, "ok": ok,
                               "request_id": request_id, "time": iso_time()}
    if result is not None:
        payload["result"] = result
    if error is not None:
        payload["error"] = error
    return payload
