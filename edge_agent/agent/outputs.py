"""Where the agent's alerts, scores, state and command results go: MQTT (spooled) or, without an
`mqtt` section, a JSONL file and stdout. Publishing never blocks on the network; JSONL appends are
fsynced by the caller's thread, so callers publish outside the runtime lock."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.agent.config import AgentConfig
from edge_agent.agent.mqtt import MqttPublisher, homeassistant_discovery
from edge_agent.agent.spool import Spool, SpoolStats
from edge_agent.errors import ConfigError
from edge_agent.logs import get_logger

if TYPE_CHECKING:
    from edge_agent.agent.runtime import Runtime

log = get_logger(__name__)

# An inbound control message: ("config", "", payload) for config/set, ("cmd", name, payload) for cmd/<name>.
RequestHandler = Callable[[str, str, bytes], None]


@dataclass(frozen=True)
class DeliveryStats:
    """What state and metrics report about delivery; None where the output has no broker or spool."""

    broker_connected: bool | None
    spool: SpoolStats | None
    broker_cause: str | None = None  # why the broker is unreachable (None while connected, or without one)


class Outputs(Protocol):
    def start(self) -> None: ...
    def publish_alert(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_score(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_config_result(self, payload: dict[str, Any]) -> None: ...
    def publish_command_result(self, payload: dict[str, Any]) -> None: ...
    def set_state(self, state: dict[str, Any]) -> None: ...
    def set_sources(self, runtime: Runtime) -> None: ...
    def delivery(self) -> DeliveryStats: ...
    def stop(self, status: str) -> None: ...


def make_outputs(cfg: AgentConfig, on_request: RequestHandler) -> Outputs:
    try:
        return MqttOutputs(cfg, on_request) if cfg.mqtt is not None else JsonlOutputs(cfg)
    except ConfigError as exc:  # a TLS file that does not load
        raise exc.in_source(cfg.source_file) from None


class MqttOutputs:
    def __init__(self, cfg: AgentConfig, on_request: RequestHandler):
        self.spool = Spool(cfg.spool_dir, cfg.spool.max_messages, cfg.spool.max_bytes)
        self.publisher = MqttPublisher(cfg, self.spool, self._on_message)
        self.topics = self.publisher.topics
        self._on_request = on_request

    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho network thread: name the request and hand it over."""
        if topic == self.topics.config_set:
            self._on_request("config", "", payload)
            return
        name = self.topics.command_name(topic)
        if name is not None:
            self._on_request("cmd", name, payload)

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

    def delivery(self) -> DeliveryStats:
        return DeliveryStats(self.publisher.connected, self.spool.stats(), self.publisher.cause)

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
        log.info("config_result", result=payload)

    def publish_command_result(self, payload: dict[str, Any]) -> None:
        log.info("command_result", result=payload)

    def set_state(self, state: dict[str, Any]) -> None:
        pass

    def set_sources(self, runtime: Runtime) -> None:
        pass

    def delivery(self) -> DeliveryStats:
        return DeliveryStats(None, None)

    def stop(self, status: str) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
