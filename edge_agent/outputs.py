"""Where the agent's alerts, scores, state and command results go: MQTT (spooled) or, without an
`mqtt` section, a JSONL file and stdout."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.config import AgentConfig
from edge_agent.mqtt import MqttPublisher, homeassistant_discovery
from edge_agent.spool import Spool

if TYPE_CHECKING:
    from edge_agent.runtime import Runtime

# The agent's log stream: the logger name is part of every log line and predates this module.
log = logging.getLogger("edge_agent.daemon")


class Outputs(Protocol):
    def start(self) -> None: ...
    def publish_alert(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_score(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_config_result(self, payload: dict[str, Any]) -> None: ...
    def publish_command_result(self, payload: dict[str, Any]) -> None: ...
    def set_state(self, state: dict[str, Any]) -> None: ...
    def set_sources(self, runtime: Runtime) -> None: ...
    def stop(self, status: str) -> None: ...


class MqttOutputs:
    def __init__(self, cfg: AgentConfig, on_message: Any):
        self.spool = Spool(cfg.spool_dir, cfg.spool.max_messages, cfg.spool.max_bytes)
        self.publisher = MqttPublisher(cfg, self.spool, on_message)
        self.topics = self.publisher.topics

    def start(self) -> None:
        self.publisher.start()

    def publish_alert(self, source: str, payload: dict[str, Any]) -> None:
        self.publisher.publish_alert(source, payload)

    def publish_score(self, source: str, payload: dict[str, Any]) -> None:
        self.publisher.publish_score(source, payload)

    def publish_config_result(self, payload: dict[str, Any]) -> None:
        self.publisher.publish_result(self.topics.config_result, payload)

    def publish_command_result(self, payload: dict[str, Any]) -> None:
        self.publisher.publish_result(self.topics.cmd_result, payload)

    def set_state(self, state: dict[str, Any]) -> None:
        self.publisher.set_state(state)

    def set_sources(self, runtime: Runtime) -> None:
        mcfg = self.publisher.mcfg
        if mcfg.homeassistant:
            sources = [(p.cfg.name, p.cfg.publish_scores) for p in runtime.pipelines.values()]
            self.publisher.set_discovery(homeassistant_discovery(self.topics, mcfg.discovery_prefix, sources,
                                                                 runtime.models.model_id))

    def stop(self, status: str) -> None:
        self.publisher.stop(status)


class JsonlOutputs:
    """No broker configured: alerts appended to a JSONL file (fsynced) and printed on stdout."""

    def __init__(self, cfg: AgentConfig):
        self.path = cfg.jsonl_path
        self.stdout = cfg.output.stdout
        self._lock = threading.Lock()
        self._handle: Any = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run

    def _write(self, payload: dict[str, Any], to_file: bool) -> None:
        line = json.dumps(payload, separators=(",", ":"))
        with self._lock:
            if to_file and self._handle is not None:
                self._handle.write(line + "\n")
                self._handle.flush()
                os.fsync(self._handle.fileno())
            if self.stdout:
                print(line, flush=True)

    def publish_alert(self, source: str, payload: dict[str, Any]) -> None:
        self._write(payload, to_file=True)

    def publish_score(self, source: str, payload: dict[str, Any]) -> None:
        self._write(payload, to_file=False)

    def publish_config_result(self, payload: dict[str, Any]) -> None:
        log.info("event=config_result %s", json.dumps(payload))

    def publish_command_result(self, payload: dict[str, Any]) -> None:
        log.info("event=command_result %s", json.dumps(payload))

    def set_state(self, state: dict[str, Any]) -> None:
        pass

    def set_sources(self, runtime: Runtime) -> None:
        pass

    def stop(self, status: str) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
