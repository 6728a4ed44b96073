"""Where the agent's alerts, scores, state and command results go: MQTT (spooled) or, without an
`mqtt` section, a JSONL file and stdout. Publishing never blocks on the network; JSONL appends are
fsynced by the caller's thread, so callers publish outside the runtime lock."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
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

MAX_HELD_LINES = 1000  # JSONL lines kept in memory while the disk refuses writes

# An inbound control message: ("config", "", payload) for config/set, ("cmd", name, payload) for cmd/<name>.
RequestHandler = Callable[[str, str, bytes], None]


@dataclass(frozen=True)
class DeliveryStats:
    """What state and metrics report about delivery; None where the output has no broker or spool."""

    broker_connected: bool | None
    spool: SpoolStats | None
    broker_cause: str | None = None  # why the broker is unreachable (None while connected, or without one)
    unwritten: int = 0  # alerts held in memory because their file refused the write (JSONL output)
    write_error: str | None = None

    @property
    def problem(self) -> str | None:
        """Why delivery is degraded (alerts not on disk, or dropped and not acknowledged); None when fine."""
        held = self.unwritten + (self.spool.held if self.spool is not None else 0)
        error = self.write_error or (self.spool.write_error if self.spool is not None else None)
        if held:
            return f"{held} alert(s) held in memory: the disk refuses writes ({error})"
        if self.spool is not None and self.spool.unacknowledged_drops:
            return (f"{self.spool.unacknowledged_drops} alert(s) dropped (spool full or unwritable); "
                    "cmd/acknowledge {\"what\": \"drops\"} once seen")
        return None


class Outputs(Protocol):
    def start(self) -> None: ...
    def publish_alert(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_score(self, source: str, payload: dict[str, Any]) -> None: ...
    def publish_config_result(self, payload: dict[str, Any]) -> None: ...
    def publish_command_result(self, payload: dict[str, Any]) -> None: ...
    def publish_clip_chunk(self, payload: dict[str, Any]) -> None: ...
    def set_state(self, state: dict[str, Any]) -> None: ...
    def set_sources(self, runtime: Runtime) -> None: ...
    def delivery(self) -> DeliveryStats: ...
    def acknowledge_drops(self) -> int: ...
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
        origin = self.topics.desired_origin(topic)
        if origin is not None:
            self._on_request("desired", origin, payload)
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

    def publish_clip_chunk(self, payload: dict[str, Any]) -> None:
        self.publisher.publish_result(self.topics.clip, payload)

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

    def acknowledge_drops(self) -> int:
        return self.spool.acknowledge_drops()

    def stop(self, status: str) -> None:
        self.publisher.stop(status)


class JsonlOutputs:
    """No broker configured: alerts appended to a JSONL file (fsynced) and printed on stdout."""

    def __init__(self, cfg: AgentConfig):
        self.path = cfg.jsonl_path
        self.stdout = cfg.output.stdout
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._held: deque[bytes] = deque()  # lines the disk refused, written before any newer line
        self._error: str | None = None
        self.dropped = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _write(self, payload: dict[str, Any], to_file: bool) -> None:
        line = json.dumps(payload, separators=(",", ":"))
        with self._lock:
            if to_file and self._fd is not None:
                self._held.append((line + "\n").encode())
                self._write_held()
            if self.stdout:
                print(line, flush=True)

    def _write_held(self) -> None:
        assert self._fd is not None
        while self._held:
            size = os.fstat(self._fd).st_size
            try:
                os.write(self._fd, self._held[0])
                os.fsync(self._fd)
            except OSError as exc:
                with contextlib.suppress(OSError):  # no half line before the next one
                    os.ftruncate(self._fd, size)
                if self._error is None:
                    log.error("alerts_file_write_failed", path=self.path, error=exc, action="kept in memory")
                self._error = exc.strerror or str(exc)
                if len(self._held) > MAX_HELD_LINES:
                    self._held.popleft()
                    self.dropped += 1
                    log.error("alerts_dropped", path=self.path, dropped_total=self.dropped)
                return
            self._held.popleft()
            if self._error is not None and not self._held:
                log.info("alerts_file_write_recovered", path=self.path)
                self._error = None

    def publish_alert(self, source: str, payload: dict[str, Any]) -> None:
        self._write(payload, to_file=True)

    def publish_score(self, source: str, payload: dict[str, Any]) -> None:
        self._write(payload, to_file=False)

    def publish_config_result(self, payload: dict[str, Any]) -> None:
        log.info("config_result", result=payload)

    def publish_command_result(self, payload: dict[str, Any]) -> None:
        log.info("command_result", result=payload)

    def publish_clip_chunk(self, payload: dict[str, Any]) -> None:
        pass  # commands arrive over MQTT only: without a broker nobody asks for a clip

    def set_state(self, state: dict[str, Any]) -> None:
        pass

    def set_sources(self, runtime: Runtime) -> None:
        pass

    def delivery(self) -> DeliveryStats:
        with self._lock:
            if self._held and self._fd is not None:
                self._write_held()  # the state refresh retries what the disk refused
            return DeliveryStats(None, None, unwritten=len(self._held), write_error=self._error)

    def acknowledge_drops(self) -> int:
        seen, self.dropped = self.dropped, 0
        return seen

    def stop(self, status: str) -> None:
        with self._lock:
            if self._fd is not None:
                if self._held:
                    self._write_held()
                if self._held:
                    log.error("alerts_dropped", path=self.path, reason="unwritable at shutdown",
                              lines=len(self._held))
                os.close(self._fd)
                self._fd = None
