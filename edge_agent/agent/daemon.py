"""The monitoring agent (`edge-agent run`): wires the parts together and runs them until stopped.

Threads:
  capture-<source>  one per source (sources.py): audio -> windows -> the inference queue
  inference         the hot loop (inference.py): windows -> embed -> score -> decide -> outputs
  mqtt-publisher    spool + paho (mqtt.py), or JSONL/stdout without an `mqtt` section (outputs.py)
  enroll            rebuilds a target bank off the inference thread when an `enroll` finishes (control.py)
  main              the control plane (control.py): config push, commands, SIGHUP, state; sd_notify watchdog
"""

from __future__ import annotations

import json
import queue
import signal
import time
from pathlib import Path
from typing import Any

from edge_agent.agent.config import AgentConfig, load_config, load_default_config
from edge_agent.agent.control import ControlPlane, ControlRequest
from edge_agent.agent.inference import InferenceLoop, publish_alert
from edge_agent.agent.metrics import AgentMetrics, MetricsServer
from edge_agent.agent.outputs import make_outputs
from edge_agent.agent.runtime import LiveRuntime, Runtime, build_runtime
from edge_agent.agent.sdnotify import SystemdNotifier
from edge_agent.agent.state import runtime_metrics
from edge_agent.audio.windowing import Window
from edge_agent.logs import get_logger, setup_logging

log = get_logger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None, notifier: SystemdNotifier | None = None):
        self.notifier = notifier or SystemdNotifier()
        self.metrics = AgentMetrics()
        self.windows: queue.Queue[Window] = queue.Queue(maxsize=cfg.queue_windows)
        self.requests: queue.Queue[ControlRequest | None] = queue.Queue()
        self._stops: queue.Queue[str] = queue.Queue()
        self.outputs = make_outputs(cfg, lambda kind, name, payload: self.requests.put(
            ControlRequest(kind, name, payload)))
        self.live = LiveRuntime(build_runtime(cfg, None))
        self.control = ControlPlane(cfg, config_path, self.live, self.outputs, self.metrics, self.notifier,
                                    self.requests, self._start_sources)
        self.inference = InferenceLoop(self.live, self.windows, self.outputs, self.metrics, self.control.enroll_ready)
        self.metrics.add_collector(lambda: runtime_metrics(self.live.current, self.outputs.delivery()))
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
        self.outputs.set_sources(self.runtime)
        self.inference.start()
        self.control.start()
        self._start_sources(self.runtime)
        self.control.publish_state(force=True)
        self.notifier.ready(f"monitoring {len(self.runtime.pipelines)} source(s)")
        log.info("started", node=self.cfg.node, sources=",".join(self.runtime.pipelines),
                 model=self.runtime.models.model_id, config_hash=self.cfg.config_hash)
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

    def request_stop(self, reason: str) -> None:
        self._stops.put(reason)

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
        return (all(s.finite and s.done for s in sources) and self.windows.empty() and not self.inference.busy
                and self.windows.unfinished_tasks == 0)

    def _shutdown(self) -> None:
        status = "stopped"
        for pipeline in self.runtime.pipelines.values():
            pipeline.source.stop()
        self.control.stop()
        self.inference.stop()
        self.control.abandon_all("the agent is stopping before the enroll was recorded")
        now = time.time()
        with self.live.lock:
            closed = [(p, event) for p in self.runtime.pipelines.values()
                      for event in p.tracker.close(now, reason="stopped")]
        for pipeline, event in closed:
            publish_alert(self.outputs, self.metrics, pipeline, event)
        self.control.publish_state(force=True, status=status)
        self.outputs.stop(status)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped", status=status)


def run(config_path: Path | None, check: bool = False) -> int:
    """Run the agent until SIGTERM/SIGINT (or until every finite source is done); returns the exit code."""
    cfg = load_config(config_path) if config_path is not None else load_default_config()
    setup_logging(cfg.logging.level, cfg.logging.format)
    agent = Agent(cfg, config_path)
    if check:
        print(json.dumps({"ok": True, "config_hash": cfg.config_hash, "sources": list(agent.runtime.pipelines)}))
        return 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: agent.requests.put(ControlRequest("reload")))
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
