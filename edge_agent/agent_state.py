"""The agent's state document (published retained, and the `status` command's result) and its
Prometheus metrics: names, help texts, and the gauges read from the running runtime."""

from __future__ import annotations

import json
import time
from typing import Any

from edge_agent import __version__
from edge_agent.alerts import iso_time
from edge_agent.metrics import Metrics
from edge_agent.model_set import ModelSet
from edge_agent.outputs import MqttOutputs, Outputs
from edge_agent.runtime import Runtime


def agent_state(runtime: Runtime, node: str, started_at: float, outputs: Outputs, status: str) -> dict[str, Any]:
    models = runtime.models
    sources = []
    degraded = False
    for p in runtime.pipelines.values():
        health = p.source.health.as_dict()
        degraded |= health["state"] in ("lost", "failed")
        sources.append({
            "name": p.cfg.name, "type": p.cfg.type,
            "bank": {"id": p.bank_id, "path": str(p.cfg.bank), "created_at": p.bank.created_at,
                     "counts": {"source": p.bank.count_raw("source"), "target": p.bank.count_raw("target")}},
            "threshold": p.threshold, "threshold_origin": p.threshold_origin,
            "episode": p.tracker.episode.event_id if p.tracker.episode is not None else None,
            "enrolling": p.enroll is not None,
            "health": health,
        })
    state: dict[str, Any] = {
        "schema_version": 1, "node": node, "status": status, "version": __version__,
        "started_at": iso_time(started_at), "updated_at": iso_time(time.time()),
        "config_hash": runtime.cfg.config_hash,
        "model": model_state(models),
        "sources": sources,
        "health": "degraded" if degraded else "ok",
    }
    if isinstance(outputs, MqttOutputs):
        state["spool"] = {"pending": len(outputs.spool), "dropped": outputs.spool.dropped}
    return state


def model_state(models: ModelSet) -> dict[str, Any]:
    """The state's `model`: the encoder itself, or for an ensemble its id, the capture rate and the
    longest member window at that rate; `members` lists every encoder either way."""
    members = models.describe()
    if not models.is_ensemble:
        return {**members[0], "members": members}
    rate = models.capture_rate
    seconds = max(e.info.window_samples / e.info.sample_rate for e in models.encoders)
    providers = list(dict.fromkeys(p for m in members for p in m["providers"]))
    return {"id": models.model_id, "family": "ensemble", "variant": "+".join(e.info.variant for e in models.encoders),
            "sample_rate": rate, "window_samples": round(seconds * rate), "providers": providers,
            "members": members}


def state_signature(state: dict[str, Any]) -> str:
    slim = {k: v for k, v in state.items() if k not in ("updated_at", "spool")}
    slim["sources"] = [{**s, "health": s["health"]["state"]} for s in state["sources"]]
    return json.dumps(slim, sort_keys=True, default=str)


def describe_metrics(m: Metrics) -> None:
    m.describe("edge_agent_windows_total", "Windows scored, per source")
    m.describe("edge_agent_stage_seconds", "Per-stage processing time (queue, resample, embed, score, decide)")
    m.describe("edge_agent_window_latency_seconds", "Window complete -> decision published")
    m.describe("edge_agent_last_score", "Anomaly score of the last window")
    m.describe("edge_agent_threshold", "Decision threshold in use")
    m.describe("edge_agent_alerts_total", "Alert events emitted, per source and type")
    m.describe("edge_agent_spool_messages", "Messages waiting in the on-disk spool")
    m.describe("edge_agent_spool_bytes", "Bytes waiting in the on-disk spool")
    m.describe("edge_agent_spool_dropped_total", "Spooled messages dropped because the spool was full")
    m.describe("edge_agent_capture_overflows_total", "Capture overruns (audio lost before windowing)")
    m.describe("edge_agent_dropped_windows_total", "Windows dropped because inference fell behind")
    m.describe("edge_agent_broker_connected", "1 while connected to the MQTT broker")
    m.describe("edge_agent_source_up", "1 while the source delivers audio")
    m.describe("edge_agent_episode_active", "1 while an alert episode is open")


def collect_gauges(m: Metrics, runtime: Runtime, outputs: Outputs) -> None:
    for p in runtime.pipelines.values():
        name = p.cfg.name
        health = p.source.health
        m.set("edge_agent_threshold", p.threshold, source=name)
        m.set_counter("edge_agent_capture_overflows_total", health.overflows, source=name)
        m.set_counter("edge_agent_dropped_windows_total", health.dropped_windows, source=name)
        m.set("edge_agent_source_up", 1.0 if health.state == "running" else 0.0, source=name)
        m.set("edge_agent_episode_active", 1.0 if p.tracker.episode is not None else 0.0, source=name)
    if isinstance(outputs, MqttOutputs):
        m.set("edge_agent_spool_messages", len(outputs.spool))
        m.set("edge_agent_spool_bytes", outputs.spool.bytes)
        m.set_counter("edge_agent_spool_dropped_total", outputs.spool.dropped)
        m.set("edge_agent_broker_connected", 1.0 if outputs.publisher.connected else 0.0)
