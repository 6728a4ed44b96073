"""The agent's state document (published retained, and the `status` command's result) and the metrics
read from the running agent at scrape time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from edge_agent import __version__
from edge_agent.agent.outputs import DeliveryStats
from edge_agent.agent.runtime import Runtime
from edge_agent.clock import iso_time
from edge_agent.model.model_set import ModelSet


def agent_state(runtime: Runtime, node: str, started_at: float, delivery: DeliveryStats,
                status: str) -> dict[str, Any]:
    sources: list[dict[str, Any]] = []
    degraded = False
    for p in runtime.pipelines.values():
        health = p.source.health.as_dict()
        degraded |= health["state"] in ("lost", "failed", "degraded")
        sources.append({
            "name": p.cfg.name, "type": p.cfg.type,
            "bank": {"id": p.bank_id or None, "sha256": p.bank_sha256 or None, "path": str(p.bank_path),
                     "created_at": p.bank.created_at if p.bank is not None else None,
                     "counts": {"source": p.bank.count_raw("source"), "target": p.bank.count_raw("target")}
                     if p.bank is not None else {}},
            "threshold": None if p.bank is None and p.cfg.threshold is None else p.threshold,
            "threshold_origin": p.threshold_origin,
            "episode": p.tracker.episode.event_id if p.tracker.episode is not None else None,
            "enrolling": p.enroll is not None,
            "monitoring": p.bank is not None,
            "health": health,
        })
    for f in runtime.failed.values():  # configured, but its bank did not load: reported, retried on a change
        degraded = True
        sources.append({
            "name": f.cfg.name, "type": f.cfg.type,
            "bank": {"id": None, "path": str(f.cfg.bank), "created_at": None, "counts": {}},
            "threshold": None, "threshold_origin": None, "episode": None, "enrolling": False, "monitoring": False,
            "health": {"state": "failed", "detail": str(f.error), "overflows": 0, "dropped_windows": 0,
                       "windows": 0, "reconnects": 0, "last_frame_time": None},
        })
    state: dict[str, Any] = {
        "schema_version": 1, "node": node, "status": status, "version": __version__,
        "started_at": iso_time(started_at), "updated_at": iso_time(time.time()),
        "config_hash": runtime.cfg.config_hash,
        "model": model_state(runtime.models),
        "sources": sources,
        "health": "degraded" if degraded else "ok",
    }
    if delivery.spool is not None:
        spool = delivery.spool
        state["spool"] = {"pending": spool.pending, "dropped": spool.dropped, "held": spool.held,
                          "unacknowledged_drops": spool.unacknowledged_drops}
    if delivery.problem is not None:
        state["health"] = "degraded"
        state["delivery_problem"] = delivery.problem
    if delivery.broker_connected is not None:
        state["broker"] = {"connected": delivery.broker_connected, "cause": delivery.broker_cause}
    return state


def model_state(models: ModelSet) -> dict[str, Any]:
    """The state's `model`: the model set's id, capture rate, longest member window at that rate and
    providers, with `family` the encoder's (one model) or "ensemble"; `members` lists every encoder."""
    members = models.describe()
    rate = models.capture_rate
    seconds = max(e.info.window_samples / e.info.sample_rate for e in models.encoders)
    return {"id": models.model_id,
            "family": members[0]["family"] if len(members) == 1 else "ensemble",
            "variant": "+".join(e.info.variant for e in models.encoders),
            "sample_rate": rate, "window_samples": round(seconds * rate),
            "providers": list(dict.fromkeys(p for m in members for p in m["providers"])),
            "members": members}


def state_signature(state: dict[str, Any]) -> str:
    slim = {k: v for k, v in state.items() if k not in ("updated_at", "spool", "broker")}
    slim["sources"] = [{**s, "health": s["health"]["state"]} for s in state["sources"]]
    return json.dumps(slim, sort_keys=True, default=str)


def runtime_metrics(runtime: Runtime, delivery: DeliveryStats) -> Iterator[Metric]:
    """Gauges and counters read from the runtime, its sources and the outputs at scrape time."""
    threshold = GaugeMetricFamily("edge_agent_threshold", "Decision threshold in use", labels=["source"])
    overflows = CounterMetricFamily("edge_agent_capture_overflows_total",
                                    "Capture overruns (audio lost before windowing)", labels=["source"])
    dropped = CounterMetricFamily("edge_agent_dropped_windows_total",
                                  "Windows dropped because inference fell behind", labels=["source"])
    up = GaugeMetricFamily("edge_agent_source_up", "1 while the source delivers audio", labels=["source"])
    episode = GaugeMetricFamily("edge_agent_episode_active", "1 while an alert episode is open", labels=["source"])
    drift_ratio = GaugeMetricFamily("edge_agent_drift_ratio", "Recent score quantile over the calibration's "
                                    "(drift.quantile; 1 = as calibrated)", labels=["source"])
    drift_over = GaugeMetricFamily("edge_agent_drift_over_fraction", "Fraction of the recent windows over the "
                                   "threshold (drift.windows)", labels=["source"])
    drifting = GaugeMetricFamily("edge_agent_drifting", "1 while the recent scores drift from the calibration",
                                 labels=["source"])
    learning = GaugeMetricFamily("edge_agent_learning_percent", "Progress of on-site learning (absent: not "
                                 "learning)", labels=["source"])
    for p in runtime.pipelines.values():
        name, health = p.cfg.name, p.source.health
        snapshot = p.drift.snapshot()
        if snapshot["ratio"] is not None:
            drift_ratio.add_metric([name], snapshot["ratio"])
        if snapshot["over_fraction"] is not None:
            drift_over.add_metric([name], snapshot["over_fraction"])
        drifting.add_metric([name], 1.0 if snapshot["status"] == "drifting" else 0.0)
        if p.learn is not None:
            learning.add_metric([name], p.learn.progress()["percent"])
        if p.bank is not None:
            threshold.add_metric([name], p.threshold)
        overflows.add_metric([name], health.overflows)
        dropped.add_metric([name], health.dropped_windows)
        up.add_metric([name], 1.0 if health.state == "running" else 0.0)
        episode.add_metric([name], 1.0 if p.tracker.episode is not None else 0.0)
    for name in runtime.failed:
        up.add_metric([name], 0.0)
    faults = CounterMetricFamily("edge_agent_audio_faults_total",
                                 "Windows not scored (or files not played) because the audio was broken, per kind",
                                 labels=["source", "kind"])
    for p in runtime.pipelines.values():
        for kind, count in dict(p.source.health.faults).items():
            faults.add_metric([p.cfg.name, kind], count)
    yield from (threshold, overflows, dropped, up, episode, faults, drift_ratio, drift_over, drifting, learning)
    if delivery.spool is not None:
        yield GaugeMetricFamily("edge_agent_spool_messages", "Messages waiting in the on-disk spool",
                                value=delivery.spool.pending)
        yield GaugeMetricFamily("edge_agent_spool_bytes", "Bytes waiting in the on-disk spool",
                                value=delivery.spool.bytes)
        yield CounterMetricFamily("edge_agent_spool_dropped_total",
                                  "Messages dropped: spool full, or unwritable too long (kept across restarts)",
                                  value=delivery.spool.dropped)
        yield GaugeMetricFamily("edge_agent_spool_held_messages",
                                "Messages held in memory because the disk refuses writes", value=delivery.spool.held)
    if delivery.broker_connected is not None:
        yield GaugeMetricFamily("edge_agent_broker_connected", "1 while connected to the MQTT broker",
                                value=1.0 if delivery.broker_connected else 0.0)


def evidence_metrics(usage: dict[str, int]) -> Iterator[Metric]:
    """The evidence store's usage (`EvidenceStore.usage()`), read at scrape time."""
    yield GaugeMetricFamily("edge_agent_evidence_bytes", "Bytes of evidence clips on disk", value=usage["bytes"])
    yield GaugeMetricFamily("edge_agent_evidence_quota_bytes", "Quota of the evidence store (evidence.max_bytes)",
                            value=usage["max_bytes"])
    yield GaugeMetricFamily("edge_agent_evidence_clips", "Evidence clips on disk", value=usage["clips"])
    yield GaugeMetricFamily("edge_agent_evidence_labelled_clips", "Evidence clips with operator feedback (kept)",
                            value=usage["labelled"])
    yield CounterMetricFamily("edge_agent_evidence_evicted_total", "Evidence clips deleted by the quota since the "
                              "start", value=usage["evicted"])
    yield CounterMetricFamily("edge_agent_evidence_write_errors_total", "Evidence clips lost to disk errors since "
                              "the start", value=usage["write_errors"])
