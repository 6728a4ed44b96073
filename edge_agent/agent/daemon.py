"""The monitoring agent (`edge-agent run`): wires the parts together and runs them until stopped.

Threads:
  capture-<source>  one per source (sources.py): audio -> windows -> the inference queue
  inference         the hot loop (inference.py): windows -> embed -> score -> decide -> outputs
  mqtt-publisher    spool + paho (mqtt.py), or JSONL/stdout without an `mqtt` section (outputs.py)
  enroll            rebuilds a target bank off the inference thread when an `enroll` finishes (control.py)
  main              the control plane (control.py): config push, commands, SIGHUP, state; sd_notify watchdog
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.agent.config import AgentConfig, build_config, load_default_config, parse_config
from edge_agent.agent.connection import tls_context
from edge_agent.agent.control import ControlPlane, ControlRequest, Startup
from edge_agent.agent.desired import DesiredState, with_overlay
from edge_agent.agent.episodes import end_after_restart
from edge_agent.agent.evidence import EvidenceStore
from edge_agent.agent.inbound import LOCAL_FILE, load_yaml
from edge_agent.agent.inference import InferenceLoop, publish_alert
from edge_agent.agent.metrics import AgentMetrics, MetricsServer
from edge_agent.agent.open_episodes import OpenEpisodes
from edge_agent.agent.operator_commands import OperatorCommands
from edge_agent.agent.outputs import make_outputs
from edge_agent.agent.payloads import command_result
from edge_agent.agent.preflight import check_directories
from edge_agent.agent.recorder import EvidenceRecorder
from edge_agent.agent.runtime import LiveRuntime, Runtime, build_runtime
from edge_agent.agent.sdnotify import SystemdNotifier
from edge_agent.agent.state import evidence_metrics, runtime_metrics
from edge_agent.agent.trial import Rollback, TrialFiles
from edge_agent.audio.windowing import Window
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.logs import get_logger, setup_logging

log = get_logger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None, notifier: SystemdNotifier | None = None,
                 startup: Startup | None = None):
        self.notifier = notifier or SystemdNotifier()
        self.metrics = AgentMetrics()
        self.windows: queue.Queue[Window] = queue.Queue(maxsize=cfg.queue_windows)
        self.requests: queue.Queue[ControlRequest | None] = queue.Queue()
        self._stops: queue.Queue[str] = queue.Queue()
        self.restart_reason: str | None = None  # set when the agent must re-execute itself (a trial, a rollback)
        try:  # before anything logs: a directory or TLS file the agent cannot use is one line and exit 2
            check_directories(cfg)
            if cfg.mqtt is not None and cfg.mqtt.tls is not None:
                tls_context(cfg.mqtt.tls)
        except ConfigError as exc:
            raise exc.in_source(cfg.source_file) from None
        # The runtime before the outputs: a config whose models or banks do not load leaves no spool open.
        self.live = LiveRuntime(build_runtime(cfg, None, isolate=True))
        self.outputs = make_outputs(cfg, lambda kind, name, payload: self.requests.put(
            ControlRequest(kind, name, payload)))
        self.episodes = OpenEpisodes(cfg.state_dir)
        self.evidence = EvidenceStore(cfg.state_dir / "evidence", cfg.evidence, cfg.node) \
            if cfg.evidence.enabled else None
        self.recorder = EvidenceRecorder(self.evidence, cfg.evidence)
        self.operator = OperatorCommands(lambda: self.control.cfg, self.live, self.outputs, self.evidence,
                                         self.recorder, lambda: self.requests.put(ControlRequest("state")))
        self.control = ControlPlane(cfg, config_path, self.live, self.outputs, self.metrics, self.notifier,
                                    self.requests, self._start_sources, self.request_restart, self.episodes,
                                    self.operator, startup)
        self.inference = InferenceLoop(self.live, self.windows, self.outputs, self.metrics, self.control.enroll_ready,
                                       self.episodes, self.recorder, self.operator.learn_ready)
        self.metrics.add_collector(lambda: runtime_metrics(self.live.current, self.outputs.delivery()))
        if self.evidence is not None:
            store = self.evidence
            self.metrics.add_collector(lambda: evidence_metrics(store.usage()))
        self.metrics_server: MetricsServer | None = None

    @property
    def cfg(self) -> AgentConfig:
        return self.control.cfg

    @property
    def runtime(self) -> Runtime:
        return self.live.current

    def state(self, status: str = "online") -> dict[str, Any]:
        return self.control.state(status)

    def run(self) -> int:
        metrics_cfg = self.cfg.metrics
        if metrics_cfg.enabled:
            try:
                self.metrics_server = MetricsServer(self.metrics, metrics_cfg.host, metrics_cfg.port)
            except OSError as exc:  # monitoring the machine matters more than exposing metrics
                log.error("metrics_unavailable", host=metrics_cfg.host, port=metrics_cfg.port, error=exc)
            else:
                self.metrics_server.start()
                log.info("metrics_listening", host=metrics_cfg.host, port=self.metrics_server.port)
        self.outputs.start()
        self._end_episodes_left_open()
        self.outputs.set_sources(self.runtime)
        self.inference.start()
        self.control.start()
        self._start_sources(self.runtime)
        self.control.publish_state(force=True)
        self.notifier.ready(f"monitoring {len(self.runtime.pipelines)} source(s)")
        log.info("started", node=self.cfg.node, sources=",".join(self.runtime.pipelines),
                 model=self.runtime.models.model_id, config_hash=self.cfg.config_hash)
        for name, failed in self.runtime.failed.items():
            log.error("source_failed", source=name, path=failed.error.path, error=failed.error.message,
                      action="the other sources run; retried when its bank files change")
        watchdog = self.notifier.watchdog_seconds
        tick = min(1.0, watchdog / 3) if watchdog else 1.0
        # This thread only supervises: control requests run on the control thread, so a slow apply (a large
        # bank to index) never holds up the watchdog while the hot loop keeps monitoring.
        while True:
            try:
                reason: str | None = self._stops.get(timeout=tick)
            except queue.Empty:
                reason = None
            if self.inference.healthy():
                self.notifier.watchdog()
            if reason is not None:
                log.info("stopping", reason=reason)
                break
            self.control.publish_state()
            if self._finished():
                log.info("all_sources_finished")
                break
        self.notifier.stopping()
        self._shutdown()
        return 0

    def _end_episodes_left_open(self) -> None:
        """A crash or power cut left these episodes open: end them, so that every `new` has its `end` (with the
        clip recorded until then, when its audio could be recovered)."""
        recovered = set(self.evidence.recover()) if self.evidence is not None else set()
        for source, snapshot in self.episodes.left_open().items():
            try:
                event = end_after_restart(snapshot)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("episode_not_ended", source=source, error=f"saved episode unreadable: {exc!r}")
                continue
            info = self.evidence.get(event["event_id"]) if self.evidence is not None and \
                event["event_id"] in recovered else None
            if info is not None:
                event["clip"] = {"status": "ready", **info.ref().as_dict()}
            self.metrics.alerts.labels(source=source, type="end").inc()
            log.info("alert", type="end", source=source, event_id=event["event_id"], reason="restarted",
                     end=event["end"])
            self.outputs.publish_alert(source, event)
        self.episodes.clear()

    def request_stop(self, reason: str) -> None:
        self._stops.put(reason)

    def request_restart(self, reason: str) -> None:
        """Stop cleanly, then run again in this process (run() re-executes the same command line)."""
        self.restart_reason = reason
        self._stops.put(f"restart: {reason}")

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
        if self.runtime.failed:  # waiting for a failed source's bank to be fixed
            return False
        sources = [p.source for p in self.runtime.pipelines.values()]
        return (all(s.finite and s.done for s in sources) and self.windows.empty() and not self.inference.busy
                and self.windows.unfinished_tasks == 0)

    def _shutdown(self) -> None:
        status = "stopped" if self.restart_reason is None else "restarting"
        for pipeline in self.runtime.pipelines.values():
            pipeline.source.stop()
        self.control.stop()
        self.inference.stop()
        self.control.abandon_all("the agent is stopping before the enroll was recorded")
        now = time.time()
        with self.live.lock:
            closed = [(p, event) for p in self.runtime.pipelines.values()
                      for event in p.tracker.close(now, reason="stopped")]
            learning = [p.learn for p in self.runtime.pipelines.values() if p.learn is not None]
        for job in learning:  # the audio recorded so far is kept (a `rebuild` can use it)
            if job.writer is not None:
                job.writer.finish(None, "stopped")
            self.outputs.publish_command_result(command_result(
                "learn", False, job.request_id, error=f"source {job.source!r}: the agent stopped after "
                f"{job.windows} window(s) of learning"))
        for pipeline, event in closed:
            self.recorder.close(pipeline.cfg.name, [event], now)
            publish_alert(self.outputs, self.metrics, pipeline, event)
        self.episodes.clear()
        self.control.publish_state(force=True, status=status)
        self.outputs.stop(status)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped", status=status)


def run(config_path: Path | None, check: bool = False) -> int:
    """Run the agent until SIGTERM/SIGINT (or until every finite source is done); returns the exit code.

    With a config file, the start goes through `start_agent`: a pushed config on trial, else the file,
    else the last config that ran healthy. A trial or a rollback ends this process by re-executing it.
    """
    if config_path is None:
        cfg = load_default_config()
        setup_logging(cfg.logging.level, cfg.logging.format)
        agent = Agent(cfg, None)
    else:
        agent = start_agent(config_path)
    if check:
        print(json.dumps({"ok": True, "config_hash": agent.cfg.config_hash, "sources": list(agent.runtime.pipelines),
                          "origin": agent.control.startup.origin}))
        return 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: agent.requests.put(ControlRequest("reload")))
    try:
        code = agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if agent.restart_reason is not None:
        log.info("reexec", reason=agent.restart_reason)
        logging.shutdown()
        os.execv(sys.executable, sys.orig_argv)
    return code


def start_agent(config_path: Path) -> Agent:
    """The agent for this start: a pending trial if it builds, else the config file, else the last-known-good
    copy of it; each with the applied desired document on top (docs/fleet.md), or without it when that cannot
    start. What was passed over is logged and reported in the state; a push that failed is answered."""
    files = TrialFiles(config_path)
    base_dir = config_path.resolve().parent
    rollback = files.read_rollback()
    trial = files.read_trial()
    if trial is not None:
        try:
            return _agent(trial.text, f"{config_path} (pushed, on trial)", base_dir, config_path,
                          Startup("trial", trial=trial, rollback=rollback, changed=list(trial.changed)))
        except EdgeAsdError as exc:
            rollback = Rollback(trial.request_id, trial.config_hash, f"the pushed config could not start: {exc}",
                                time.time())
            files.fail_trial(rollback)
    problem = None
    try:
        return _agent(_read_config_text(config_path), str(config_path), base_dir, config_path,
                      Startup("file", rollback=rollback))
    except EdgeAsdError as exc:
        if not files.last_good.is_file():
            raise
        problem = str(exc)
    log.error("config_file_unusable", path=config_path, error=problem, using=files.last_good)
    return _agent(files.last_good.read_text(encoding="utf-8"), str(files.last_good), base_dir, config_path,
                  Startup("last_good", rollback=rollback, problem=problem))


def _read_config_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read: {exc.strerror}", str(path), source=str(path)) from None


def _agent(text: str, source: str, base_dir: Path, config_path: Path, startup: Startup) -> Agent:
    """The agent on the local config `text` with the applied desired overlay; on the local config alone when
    the overlay does not start (reported as the desired version rolled back)."""
    base = parse_config(text, source=source, base_dir=base_dir)
    setup_logging(base.logging.level, base.logging.format)
    applied = DesiredState(base.state_dir).applied
    if applied is not None:
        version, origin = applied.document["version"], applied.origin
        try:
            raw = load_yaml(text, LOCAL_FILE) or {}
            cfg = build_config(with_overlay(raw, applied), source=f"{source} + desired v{version} ({origin})",
                               base_dir=base_dir)
            return Agent(cfg, config_path, startup=startup)
        except EdgeAsdError as exc:
            log.error("desired_not_started", version=version, origin=origin, error=str(exc),
                      using="the local config alone")
            startup = dataclasses.replace(startup, desired_problem=f"desired version {version} ({origin}) could "
                                          f"not start: {exc}")
    return Agent(base, config_path, startup=startup)
