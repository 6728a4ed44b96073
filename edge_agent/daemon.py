"""The monitoring agent: `edge-agent run --config FILE`.

Threads:
  capture-<source>  one per source (edge_agent.sources): audio -> windows -> inference queue
  inference         windows -> resample -> ONNX embed (each model of an ensemble) -> per-source scorer
                    -> hysteresis -> outputs
  mqtt-publisher    spool + paho (edge_agent.mqtt), or JSONL/stdout without an `mqtt` section
  enroll            rebuilds a target bank off the inference thread when an `enroll` finishes
  main              signals, control messages (config push, commands), state, sd_notify watchdog

Everything a config determines (encoders, banks, scorers, sources) lives in one `Runtime` (runtime.py). A new
config (push, SIGHUP, `reload`) is built completely beside the running one; only when every part
built is the runtime reference swapped. Any error leaves the old runtime running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edge_agent.agent_state import agent_state, collect_gauges, describe_metrics, state_signature
from edge_agent.alerts import command_result, config_result, iso_time, score_payload
from edge_agent.config import AgentConfig, load_config, load_default_config, parse_config, write_config_atomic
from edge_agent.enroll_job import EnrollJob, build_target_bank, collect_enroll
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.logging_setup import setup_logging
from edge_agent.metrics import Metrics, MetricsServer
from edge_agent.outputs import JsonlOutputs, MqttOutputs, Outputs
from edge_agent.runtime import Runtime, SourcePipeline, bank_stamp, build_runtime
from edge_agent.scoring import EnsembleScorer
from edge_agent.sdnotify import SystemdNotifier
from edge_agent.sources import Window

log = logging.getLogger("edge_agent.daemon")

BATCH_MAX = 8  # windows embedded in one ONNX call when several are waiting
STATE_REFRESH_SECONDS = 60.0
# Sections that a running agent cannot change in place; they apply at the next start.
RESTART_FIELDS = ("node", "state_dir", "mqtt", "spool", "output", "metrics", "logging", "queue_windows")


# --- the agent -------------------------------------------------------------------------------------


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None, notifier: SystemdNotifier | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier or SystemdNotifier()
        self.metrics = Metrics()
        self.started_at = time.time()
        self.windows: queue.Queue[Window] = queue.Queue(maxsize=cfg.queue_windows)
        self.control: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._lock = threading.RLock()  # guards runtime swaps against the inference worker's decisions
        self._stop = threading.Event()
        self._worker_beat = time.monotonic()
        self._busy = False
        self.outputs: Outputs = MqttOutputs(cfg, self._on_control_message) if cfg.mqtt is not None \
            else JsonlOutputs(cfg)
        self.runtime = build_runtime(cfg, None)
        self.metrics_server: MetricsServer | None = None
        self._state_sig: str | None = None
        self._state_sent = 0.0
        self._describe_metrics()

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        if self.cfg.metrics.enabled:
            try:
                self.metrics_server = MetricsServer(self.metrics, self.cfg.metrics.host, self.cfg.metrics.port)
            except OSError as exc:  # monitoring the machine matters more than exposing metrics
                log.error("event=metrics_unavailable host=%s port=%d error=%r", self.cfg.metrics.host,
                          self.cfg.metrics.port, str(exc))
            else:
                self.metrics_server.start()
                log.info("event=metrics_listening host=%s port=%d", self.cfg.metrics.host,
                         self.metrics_server.port)
        self.outputs.start()
        self.outputs.set_sources(self.runtime)
        worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        worker.start()
        self._start_sources(self.runtime)
        self._publish_state(force=True)
        self.notifier.ready(f"monitoring {len(self.runtime.pipelines)} source(s)")
        log.info("event=started node=%s sources=%s model=%s config_hash=%s", self.cfg.node,
                 ",".join(self.runtime.pipelines), self.runtime.models.model_id, self.cfg.config_hash)
        watchdog = self.notifier.watchdog_seconds
        tick = min(1.0, watchdog / 3) if watchdog else 1.0
        exit_status = "stopped"
        while True:
            try:
                item = self.control.get(timeout=tick)
            except queue.Empty:
                item = None
            if self._healthy(worker):
                self.notifier.watchdog()
            if item is not None:
                if item[0] == "stop":
                    log.info("event=stopping reason=%s", item[1])
                    break
                self._handle_control(item)
            self._publish_state()
            if self._finished():
                log.info("event=all_sources_finished")
                break
        self.notifier.stopping()
        self._shutdown(worker, exit_status)
        return 0

    def request_stop(self, reason: str) -> None:
        self.control.put(("stop", reason))

    def _start_sources(self, runtime: Runtime) -> None:
        for source in runtime.fresh_sources:
            source.start(self._accept_window)
        runtime.fresh_sources = []

    def _accept_window(self, window: Window) -> bool:
        try:
            self.windows.put_nowait(window)
            return True
        except queue.Full:
            return False

    def _finished(self) -> bool:
        sources = [p.source for p in self.runtime.pipelines.values()]
        return (all(s.finite and s.done for s in sources) and self.windows.empty() and not self._busy
                and self.windows.unfinished_tasks == 0)

    def _healthy(self, worker: threading.Thread) -> bool:
        return worker.is_alive() and (self._busy is False or time.monotonic() - self._worker_beat < 60.0)

    def _shutdown(self, worker: threading.Thread, status: str) -> None:
        for pipeline in self.runtime.pipelines.values():
            pipeline.source.stop()
        self._stop.set()
        worker.join(30.0)
        now = time.time()
        with self._lock:
            for pipeline in self.runtime.pipelines.values():
                for event in pipeline.tracker.close(now, reason="stopped"):
                    self._emit_alert(pipeline, event)
        self._publish_state(force=True, status=status)
        self.outputs.stop(status)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("event=stopped status=%s", status)

    # --- inference worker --------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            self._worker_beat = time.monotonic()
            try:
                first = self.windows.get(timeout=0.5)
            except queue.Empty:
                continue
            self._busy = True
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.windows.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:
                log.exception("event=inference_failed windows=%d", len(batch))
                self.metrics.inc("edge_agent_inference_errors_total")
            finally:
                for _ in batch:
                    self.windows.task_done()
                self._busy = False

    def _process(self, batch: list[Window]) -> None:
        runtime = self.runtime
        models = runtime.models
        t_start = time.monotonic()
        for w in batch:
            self.metrics.observe("edge_agent_stage_seconds", t_start - w.captured_at, stage="queue")
        live = [w for w in batch if w.source in runtime.pipelines]
        if not live:
            return
        prepared = models.prepare([(w.samples, w.sample_rate) for w in live])
        t_resampled = time.monotonic()
        embs = models.embed(prepared)
        t_embedded = time.monotonic()
        self.metrics.observe("edge_agent_stage_seconds", t_resampled - t_start, stage="resample")
        self.metrics.observe("edge_agent_stage_seconds", t_embedded - t_resampled, stage="embed")
        with self._lock:
            runtime = self.runtime  # a swap may have happened while embedding: score with the newest
            if runtime.models is not models:
                log.info("event=windows_skipped reason=model_changed windows=%d", len(live))
                return
            for name in dict.fromkeys(w.source for w in live):
                pipeline = runtime.pipelines.get(name)
                if pipeline is None:
                    continue
                rows = [i for i, w in enumerate(live) if w.source == name]
                subs = [{layer: values[rows] for layer, values in emb.items()} for emb in embs]
                t0 = time.monotonic()
                scorer = pipeline.scorer
                scores = scorer.score(subs) if isinstance(scorer, EnsembleScorer) else scorer.score(subs[0])
                self.metrics.observe("edge_agent_stage_seconds", time.monotonic() - t0, stage="score")
                self._collect_enroll(pipeline, subs)
                for row, score in zip(rows, scores, strict=True):
                    self._decide(pipeline, live[row], float(score))

    def _decide(self, pipeline: SourcePipeline, window: Window, score: float) -> None:
        t0 = time.monotonic()
        pipeline.last_score = score
        pipeline.last_window = window.start_time
        events = pipeline.tracker.observe(window.start_time, score)
        for event in events:
            self._emit_alert(pipeline, event)
        latency = time.monotonic() - window.captured_at
        if pipeline.cfg.publish_scores:
            self.outputs.publish_score(pipeline.cfg.name,
                                       score_payload(pipeline.context, window.start_time, score, latency * 1e3))
        name = pipeline.cfg.name
        self.metrics.observe("edge_agent_stage_seconds", time.monotonic() - t0, stage="decide")
        self.metrics.observe("edge_agent_window_latency_seconds", latency, source=name)
        self.metrics.inc("edge_agent_windows_total", source=name)
        self.metrics.set("edge_agent_last_score", score, source=name)
        log.debug("event=window source=%s start=%s score=%.4f threshold=%.4f latency_ms=%.1f", name,
                  iso_time(window.start_time), score, pipeline.threshold, latency * 1e3)

    def _emit_alert(self, pipeline: SourcePipeline, event: dict[str, Any]) -> None:
        self.metrics.inc("edge_agent_alerts_total", source=pipeline.cfg.name, type=event["type"])
        log.info("event=alert type=%s source=%s event_id=%s score=%s top_score=%s threshold=%.4f",
                 event["type"], pipeline.cfg.name, event["event_id"], event["score"], event["top_score"],
                 pipeline.threshold)
        self.outputs.publish_alert(pipeline.cfg.name, event)

    # --- enroll ------------------------------------------------------------------------------------

    def _collect_enroll(self, pipeline: SourcePipeline, embs: list[dict[str, np.ndarray]]) -> None:
        """embs: per model (the bank's members, in order) the embeddings of this batch's windows."""
        job = collect_enroll(pipeline, embs)
        if job is not None:
            threading.Thread(target=self._finish_enroll, args=(pipeline.cfg.name, job), name="enroll",
                             daemon=True).start()

    def _finish_enroll(self, name: str, job: EnrollJob) -> None:
        try:
            result = self._rebuild_target(name, job)
        except Exception as exc:
            log.exception("event=enroll_failed source=%s", name)
            self.outputs.publish_command_result(command_result("enroll", False, job.request_id, error=str(exc)))
            return
        self.outputs.publish_command_result(command_result("enroll", True, job.request_id, result=result))
        self.control.put(("state",))

    def _rebuild_target(self, name: str, job: EnrollJob) -> dict[str, Any]:
        pipeline = self.runtime.pipelines[name]
        target = build_target_bank(pipeline, job, self.runtime.encoder.model_sha256)
        loaded, scorer, threshold, mixup = target.bank, target.scorer, target.threshold, target.mixup
        bank_id = loaded.content_hash()[:12]
        with self._lock:
            current = self.runtime.pipelines.get(name)
            if current is None:
                raise EdgeAsdError(f"source {name!r} was removed while enrolling")
            value = float(threshold["value"]) if current.cfg.threshold is None else float(current.cfg.threshold)
            context = dataclasses.replace(current.context, bank=bank_id, threshold=value)
            current.tracker.reconfigure(context, current.cfg.hysteresis)
            new = dataclasses.replace(current, bank=loaded, scorer=scorer, bank_id=bank_id, threshold=value,
                                      context=context, bank_stamp=bank_stamp(pipeline.cfg.bank))
            self.runtime = dataclasses.replace(self.runtime, pipelines={**self.runtime.pipelines, name: new})
        log.info("event=enrolled source=%s target_refs=%d bank=%s threshold=%.4f", name, job.windows, bank_id,
                 value)
        return {"source": name, "bank": bank_id, "bank_path": str(pipeline.cfg.bank),
                "target_windows": job.windows, "threshold": value,
                "calibrated_threshold": float(threshold["value"]), "memmixup": mixup is not None}

    # --- control -----------------------------------------------------------------------------------

    def _on_control_message(self, topic: str, payload: bytes) -> None:
        """paho network thread: hand over to the main thread."""
        assert isinstance(self.outputs, MqttOutputs)
        topics = self.outputs.topics
        if topic == topics.config_set:
            self.control.put(("config", payload))
            return
        name = topics.command_name(topic)
        if name is not None:
            self.control.put(("cmd", name, payload))

    def _handle_control(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "config":
            self._config_push(item[1])
        elif kind == "cmd":
            self._command(item[1], item[2])
        elif kind == "reload":
            ok, error = self._reload_file()
            if not ok:
                log.error("event=reload_refused error=%s", error)
        elif kind == "state":
            self._publish_state(force=True)

    def _config_push(self, payload: bytes) -> None:
        request_id, text = _unwrap_config(payload)
        try:
            new_cfg = parse_config(text, source="config/set", base_dir=self._base_dir())
            restart = self._apply(new_cfg)
        except ConfigError as exc:
            log.warning("event=config_refused path=%s error=%s", exc.path, exc)
            self.outputs.publish_config_result(config_result(
                False, request_id, error={"path": exc.path, "message": str(exc), "value": _jsonable(exc.value)}))
            return
        except EdgeAsdError as exc:
            self.outputs.publish_config_result(config_result(
                False, request_id, error={"path": "", "message": str(exc), "value": None}))
            return
        persisted = False
        if self.config_path is not None:
            try:
                write_config_atomic(self.config_path, text)
                persisted = True
            except OSError as exc:
                log.error("event=config_not_persisted path=%s error=%s", self.config_path, exc)
        log.info("event=config_applied config_hash=%s persisted=%s restart_required=%s", new_cfg.config_hash,
                 persisted, ",".join(restart) or "-")
        result = config_result(True, request_id, new_cfg.config_hash, restart_required=restart)
        result["persisted"] = persisted
        self.outputs.publish_config_result(result)

    def _reload_file(self) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "running on the embedded default config: nothing to reload"
        self.notifier.reloading()
        try:
            new_cfg = load_config(self.config_path)
            restart = self._apply(new_cfg)
        except EdgeAsdError as exc:
            self.notifier.ready()
            return False, str(exc)
        self.notifier.ready()
        log.info("event=config_reloaded path=%s config_hash=%s restart_required=%s", self.config_path,
                 new_cfg.config_hash, ",".join(restart) or "-")
        return True, new_cfg.config_hash

    def _apply(self, new_cfg: AgentConfig) -> list[str]:
        """Build the new runtime beside the old one, then swap; raises (old keeps running) on error."""
        restart = [name for name in RESTART_FIELDS if getattr(new_cfg, name) != getattr(self.cfg, name)]
        new = build_runtime(new_cfg, self.runtime)
        with self._lock:
            old = self.runtime
            kept = {id(p.source) for p in new.pipelines.values()}
            for name, pipeline in new.pipelines.items():
                pipeline.tracker.reconfigure(pipeline.context, pipeline.cfg.hysteresis)
                previous = old.pipelines.get(name)
                if previous is not None and previous.enroll is not None and previous.source is pipeline.source:
                    if previous.context.model == pipeline.context.model:
                        pipeline.enroll = previous.enroll
                    else:  # embeddings recorded so far belong to other encoders
                        self.outputs.publish_command_result(command_result(
                            "enroll", False, previous.enroll.request_id,
                            error=f"source {name!r}: the models changed while enrolling; enroll again"))
            now = time.time()
            for name, pipeline in old.pipelines.items():
                if name not in new.pipelines:
                    for event in pipeline.tracker.close(now, reason="source_removed"):
                        self._emit_alert(pipeline, event)
            self.runtime = new
            # Sections that need a restart keep their running values until then.
            self.cfg = dataclasses.replace(new_cfg, **{name: getattr(self.cfg, name) for name in restart})
        for pipeline in old.pipelines.values():
            if id(pipeline.source) not in kept:
                pipeline.source.stop()
        self._start_sources(new)
        self.outputs.set_sources(new)
        self._publish_state(force=True)
        return restart

    def _command(self, name: str, payload: bytes) -> None:
        args: dict[str, Any] = {}
        if payload.strip():
            try:
                parsed = json.loads(payload)
            except ValueError:
                self.outputs.publish_command_result(command_result(name, False, None, error="payload is not JSON"))
                return
            if not isinstance(parsed, dict):
                self.outputs.publish_command_result(command_result(name, False, None,
                                                                   error="payload must be a JSON object"))
                return
            args = parsed
        request_id = args.get("id") if isinstance(args.get("id"), str) else None
        if name == "status":
            self.outputs.publish_command_result(command_result(name, True, request_id, result=self.state()))
        elif name == "reload":
            ok, detail = self._reload_file()
            self.outputs.publish_command_result(command_result(
                name, ok, request_id, result={"config_hash": detail} if ok else None, error=None if ok else detail))
        elif name == "enroll":
            error = self._start_enroll(args, request_id)
            if error is not None:
                self.outputs.publish_command_result(command_result(name, False, request_id, error=error))
        else:
            self.outputs.publish_command_result(command_result(
                name, False, request_id, error=f"unknown command {name!r}; known: enroll, reload, status"))

    def _start_enroll(self, args: dict[str, Any], request_id: str | None) -> str | None:
        pipelines = self.runtime.pipelines
        name = args.get("source")
        if name is None and len(pipelines) == 1:
            name = next(iter(pipelines))
        if name not in pipelines:
            return f"source: {name!r} is not one of {', '.join(pipelines)}"
        pipeline = pipelines[name]
        count = args.get("windows", pipeline.cfg.enroll.windows)
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 10000:
            return f"windows: must be an integer in [2, 10000] (got {count!r})"
        if pipeline.enroll is not None:
            return f"source {name!r} is already enrolling"
        with self._lock:
            pipeline.enroll = EnrollJob(count, request_id)
        log.info("event=enroll_started source=%s windows=%d", name, count)
        return None

    def _base_dir(self) -> Path:
        return self.config_path.resolve().parent if self.config_path is not None else Path.cwd()

    # --- state and metrics -------------------------------------------------------------------------

    def state(self, status: str = "online") -> dict[str, Any]:
        return agent_state(self.runtime, self.cfg.node, self.started_at, self.outputs, status)

    def _publish_state(self, force: bool = False, status: str = "online") -> None:
        state = self.state(status)
        signature = state_signature(state)
        now = time.monotonic()
        if not force and signature == self._state_sig and now - self._state_sent < STATE_REFRESH_SECONDS:
            return
        if signature != self._state_sig:
            lost = [f"{s['name']} {s['health']['state']}" for s in state["sources"]
                    if s["health"]["state"] in ("lost", "failed")]
            self.notifier.status(f"{state['health']}: {len(state['sources'])} source(s)"
                                 + (f"; {', '.join(lost)}" if lost else ""))
        self._state_sig = signature
        self._state_sent = now
        self.outputs.set_state(state)

    def _describe_metrics(self) -> None:
        describe_metrics(self.metrics)
        self.metrics.add_collector(self._collect_gauges)

    def _collect_gauges(self, m: Metrics) -> None:
        collect_gauges(m, self.runtime, self.outputs)


def _unwrap_config(payload: bytes) -> tuple[str | None, str]:
    """config/set carries a whole YAML/JSON config, or {"id": ..., "config": {...} | "yaml text"}."""
    text = payload.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return None, text
    if isinstance(data, dict) and "config" in data and set(data) <= {"id", "config"}:
        request_id = data.get("id") if isinstance(data.get("id"), str) else None
        inner = data["config"]
        return request_id, inner if isinstance(inner, str) else yaml.safe_dump(inner, sort_keys=False)
    return None, text


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


# --- entry points ----------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="agent YAML config (default: the embedded demo config: file source, no MQTT)")
    parser.add_argument("--check", action="store_true", help="validate the config, build the pipeline, exit")


def run_from_args(args: argparse.Namespace) -> int:
    return run(args.config, check=getattr(args, "check", False))


def run(config_path: Path | None, check: bool = False) -> int:
    """Run the agent until SIGTERM/SIGINT (or until every finite source is done); returns the exit code."""
    cfg = load_config(config_path) if config_path is not None else load_default_config()
    setup_logging(cfg.logging)
    agent = Agent(cfg, config_path)
    if check:
        print(json.dumps({"ok": True, "config_hash": cfg.config_hash, "sources": list(agent.runtime.pipelines)}))
        return 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: agent.control.put(("reload",)))
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_agent.daemon --config FILE` (the same as `edge-agent run`)."""
    parser = argparse.ArgumentParser(prog="edge-agent run", description="run the monitoring daemon")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except EdgeAsdError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
