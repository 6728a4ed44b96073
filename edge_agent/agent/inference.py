"""The hot loop, on its own thread: windows -> resample -> embed (every model of the set) -> score ->
decide -> outputs.

Decisions (scores, enroll collection, episode hysteresis) are made under the runtime lock, against the
runtime that is current then; everything they publish goes out after the lock is released.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.agent.enroll_job import EnrollJob
from edge_agent.agent.learning import LearnJob
from edge_agent.agent.metrics import AgentMetrics
from edge_agent.agent.open_episodes import OpenEpisodes
from edge_agent.agent.outputs import Outputs
from edge_agent.agent.payloads import score_payload
from edge_agent.agent.recorder import EvidenceRecorder
from edge_agent.agent.runtime import LiveRuntime, SourcePipeline
from edge_agent.audio.windowing import Window
from edge_agent.clock import iso_time
from edge_agent.logs import get_logger
from edge_agent.model.model_set import ModelSet

log = get_logger(__name__)

# Windows embedded in one ONNX call when several are waiting: on a CPU a batch of 2 gives the transformers most of
# what batching gives, and each further window adds its intermediates to the peak RSS (mn04: 127 MB at 2,
# 301 MB at 8; bench/batch_size.py, docs/benchmarks.md).
BATCH_MAX = 2
STUCK_SECONDS = 60.0  # a batch running longer than this makes the loop unhealthy (no watchdog ping)

EnrollReady = Callable[[str, EnrollJob], None]
LearnReady = Callable[[str, LearnJob], None]


@dataclass
class _Decision:
    pipeline: SourcePipeline
    window: Window
    score: float
    events: list[dict[str, Any]]
    decide_seconds: float
    episode: dict[str, Any] | None  # the source's open episode after this window, as saved for a restart
    embeddings: list[dict[str, np.ndarray]]  # this window's, per member model {layer: [D]}
    episode_start: float | None  # the open episode's first window (None: no episode open)


def publish_alert(outputs: Outputs, metrics: AgentMetrics, pipeline: SourcePipeline, event: dict[str, Any]) -> None:
    name = pipeline.cfg.name
    metrics.alerts.labels(source=name, type=event["type"]).inc()
    log.info("alert", type=event["type"], source=name, event_id=event["event_id"], score=event["score"],
             top_score=event["top_score"], threshold=pipeline.threshold)
    outputs.publish_alert(name, event)


class InferenceLoop:
    def __init__(self, live: LiveRuntime, windows: queue.Queue[Window], outputs: Outputs, metrics: AgentMetrics,
                 on_enroll_ready: EnrollReady, episodes: OpenEpisodes, recorder: EvidenceRecorder,
                 on_learn_ready: LearnReady) -> None:
        self.live = live
        self.recorder = recorder
        self.on_learn_ready = on_learn_ready
        self.episodes = episodes
        self.windows = windows
        self.outputs = outputs
        self.metrics = metrics
        self.on_enroll_ready = on_enroll_ready
        self.busy = False
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def healthy(self) -> bool:
        """Alive, and not stuck in one batch (the systemd watchdog is pinged only while healthy)."""
        return self._thread.is_alive() and (not self.busy or time.monotonic() - self._beat < STUCK_SECONDS)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                first = self.windows.get(timeout=0.5)
            except queue.Empty:
                continue
            self.busy = True
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.windows.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:
                log.exception("inference_failed", windows=len(batch))
                self.metrics.inference_errors.inc()
            finally:
                for _ in batch:
                    self.windows.task_done()
                self.busy = False

    def _process(self, batch: list[Window]) -> None:
        stage = self.metrics.stage_seconds
        runtime = self.live.current
        models = runtime.models
        t_start = time.monotonic()
        for w in batch:
            stage.labels(stage="queue").observe(t_start - w.captured_at)
        live = [w for w in batch if w.source in runtime.pipelines]
        if not live:
            return
        prepared = models.prepare([(w.samples, w.sample_rate) for w in live], [w.resampled for w in live])
        t_resampled = time.monotonic()
        embs = models.embed(prepared)
        t_embedded = time.monotonic()
        stage.labels(stage="resample").observe(t_resampled - t_start)
        stage.labels(stage="embed").observe(t_embedded - t_resampled)
        decisions: list[_Decision] = []
        ready: list[tuple[str, EnrollJob]] = []
        learned: list[tuple[str, LearnJob]] = []
        try:
            self._decide(models, live, embs, decisions, ready, learned)
        finally:  # what was decided is published even if a later source of the batch failed
            for name, job in ready:
                self.on_enroll_ready(name, job)
            for name, learn in learned:
                self.on_learn_ready(name, learn)
            for decision in decisions:
                self._publish(decision)

    def _decide(self, models: ModelSet, live: list[Window], embs: list[dict[str, np.ndarray]],
                decisions: list[_Decision], ready: list[tuple[str, EnrollJob]],
                learned: list[tuple[str, LearnJob]]) -> None:
        stage = self.metrics.stage_seconds
        with self.live.lock:
            runtime = self.live.current  # a swap may have happened while embedding: decide with the newest
            if runtime.models is not models:
                log.info("windows_skipped", reason="model_changed", windows=len(live))
                return
            for name in dict.fromkeys(w.source for w in live):
                pipeline = runtime.pipelines.get(name)
                if pipeline is None:
                    continue
                rows = [i for i, w in enumerate(live) if w.source == name]
                subs = [{layer: values[rows] for layer, values in emb.items()} for emb in embs]
                learn = pipeline.learn
                if learn is not None:
                    learn.faults = sum(dict(pipeline.source.health.faults).values()) - learn.faults_at_start
                    for j, row in enumerate(rows):
                        learn.keep_audio(live[row])
                        if learn.collect(live[row].start_time, [{k: v[j] for k, v in sub.items()} for sub in subs]):
                            pipeline.learn = None
                            learned.append((name, learn))
                            break
                if pipeline.scorer is None:  # learning its first bank: nothing to score against yet
                    continue
                t0 = time.monotonic()
                scores = pipeline.scorer.score(subs)
                stage.labels(stage="score").observe(time.monotonic() - t0)
                job = pipeline.enroll
                if job is not None and pipeline.bank is not None and job.collect(pipeline.bank, subs):
                    pipeline.enroll = None
                    ready.append((name, job))
                for j, (row, score) in enumerate(zip(rows, scores, strict=True)):
                    t0 = time.monotonic()
                    events = pipeline.tracker.observe(live[row].start_time, float(score))
                    pipeline.drift.observe(float(score))
                    episode = pipeline.tracker.episode
                    decisions.append(_Decision(pipeline, live[row], float(score), events, time.monotonic() - t0,
                                               pipeline.tracker.snapshot(live[row].start_time),
                                               [{k: v[j] for k, v in sub.items()} for sub in subs],
                                               episode.start if episode is not None else None))

    def _publish(self, d: _Decision) -> None:
        t0 = time.monotonic()
        pipeline, window, name = d.pipeline, d.window, d.pipeline.cfg.name
        # Saved before a `new` goes out and forgotten only after its `end` did: a crash in between can only
        # cost a second `end`, never a missing one.
        if d.episode is not None:
            self.episodes.set(name, d.episode)
        try:
            self.recorder.window(name, window, d.score, d.embeddings, d.events, pipeline.cfg.hop_seconds,
                                 d.episode_start, {"model": pipeline.context.model, "bank": pipeline.context.bank,
                                                   "threshold": pipeline.threshold})
        except Exception:  # evidence must never cost an alert
            log.exception("evidence_failed", source=name)
        for event in d.events:
            publish_alert(self.outputs, self.metrics, pipeline, event)
        if d.episode is None:
            self.episodes.set(name, None)
        latency = time.monotonic() - window.captured_at
        if pipeline.cfg.publish_scores:
            self.outputs.publish_score(name, score_payload(pipeline.context, window.start_time, d.score,
                                                           latency * 1e3))
        self.metrics.stage_seconds.labels(stage="decide").observe(d.decide_seconds + time.monotonic() - t0)
        self.metrics.window_latency.labels(source=name).observe(latency)
        self.metrics.windows.labels(source=name).inc()
        self.metrics.last_score.labels(source=name).set(d.score)
        log.debug("window", source=name, start=iso_time(window.start_time), score=round(d.score, 4),
                  threshold=round(pipeline.threshold, 4), latency_ms=round(latency * 1e3, 1))
