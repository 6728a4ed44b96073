"""MQTT side of the agent: retained status/state, alerts through the durable spool, control topics.

Topics (prefix default `edge-asd`, node = device id):
  <prefix>/<node>/status          retained: online | offline (last will) | stopped
  <prefix>/<node>/state           retained JSON, re-sent on every connect
  <prefix>/<node>/<source>/alert  QoS 1, spooled on disk until PUBACK
  <prefix>/<node>/<source>/score  QoS 0, optional
  <prefix>/<node>/config/set      in;  answered on <prefix>/<node>/config/result
  <prefix>/<node>/cmd/<name>      in;  answered on <prefix>/<node>/cmd/result
  <prefix>/<node>/config/desired  in, retained: a versioned desired document (docs/fleet.md)
  <prefix>/group/<group>/config/desired, <prefix>/group/<group>/cmd/<name>, <prefix>/$broadcast/cmd/<name>
                                  in: the same for the node's groups (fleet.groups) and the whole fleet

Delivery: every alert is appended to the spool (fsync) before it is handed to paho. paho keeps a
handed QoS 1 message in memory and re-sends it after a reconnect, so each spool record is handed
to paho at most once per process; the record leaves the spool at PUBACK. Records that were never
handed (written while the broker was unreachable, or left from a previous run) are sent after
the next connect, oldest first, with `"replayed": true` -- and only once paho's own re-sends of
older messages have been acknowledged, so the broker sees them in spool order.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.agent.config import AgentConfig, MqttConfig
from edge_agent.agent.connection import diagnose, tls_context
from edge_agent.agent.spool import Spool, SpoolRecord
from edge_agent.logs import get_logger

log = get_logger(__name__)

MAX_HANDED = 100  # spool records handed to paho and not yet acknowledged


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str
    groups: tuple[str, ...] = ()

    def _t(self, *parts: str) -> str:
        return "/".join((self.prefix, self.node, *parts))

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def state(self) -> str:
        return self._t("state")

    def alert(self, source: str) -> str:
        return self._t(source, "alert")

    def score(self, source: str) -> str:
        return self._t(source, "score")

    @property
    def config_set(self) -> str:
        return self._t("config", "set")

    @property
    def config_result(self) -> str:
        return self._t("config", "result")

    @property
    def cmd_filter(self) -> str:
        return self._t("cmd", "+")

    @property
    def cmd_result(self) -> str:
        return self._t("cmd", "result")

    @property
    def config_desired(self) -> str:
        return self._t("config", "desired")

    @property
    def clip(self) -> str:
        """Evidence clips in chunks, answering `cmd/clip`."""
        return self._t("clip")

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/config/desired"

    def group_cmd_filter(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/cmd/+"

    @property
    def broadcast_cmd_filter(self) -> str:
        return f"{self.prefix}/$broadcast/cmd/+"

    @property
    def subscriptions(self) -> list[str]:
        """Everything the node listens to: its own config and commands, its groups', and the broadcast commands."""
        topics = [self.config_set, self.cmd_filter, self.config_desired, self.broadcast_cmd_filter]
        for group in self.groups:
            topics += [self.group_desired(group), self.group_cmd_filter(group)]
        return topics

    def desired_origin(self, topic: str) -> str | None:
        """"node" or "group/<group>" for a config/desired topic this node follows, else None."""
        if topic == self.config_desired:
            return "node"
        for group in self.groups:
            if topic == self.group_desired(group):
                return f"group/{group}"
        return None

    def command_name(self, topic: str) -> str | None:
        heads = [self._t("cmd") + "/", f"{self.prefix}/$broadcast/cmd/"]
        heads += [f"{self.prefix}/group/{group}/cmd/" for group in self.groups]
        for head in heads:
            if topic.startswith(head):
                name = topic[len(head):]
                return name if name and "/" not in name and name != "result" else None
        return None


def mark_replayed(payload: str) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if isinstance(data, dict):
        data["replayed"] = True
        return json.dumps(data, separators=(",", ":"))
    return payload


MessageHandler = Callable[[str, bytes], None]


class MqttPublisher:
    """Owns the paho client and the spool; one worker thread does all spool and publish work."""

    def __init__(self, cfg: AgentConfig, spool: Spool, on_message: MessageHandler):
        assert cfg.mqtt is not None
        self.mcfg: MqttConfig = cfg.mqtt
        self.topics = Topics(self.mcfg.prefix, cfg.node, tuple(cfg.fleet.groups))
        self.spool = spool
        self._on_message = on_message
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._connected = threading.Event()
        self._generation = 0
        self._handed: dict[int, tuple[int, int]] = {}  # mid -> (spool seq, connection generation)
        self._handed_seqs: set[int] = set()
        self._fresh: set[int] = set()  # seqs appended while connected: not replays
        self._state_payload: str | None = None
        self._discovery: dict[str, str] = {}
        self._thread = threading.Thread(target=self._work, name="mqtt-publisher", daemon=True)
        self._tls = tls_context(self.mcfg.tls) if self.mcfg.tls is not None else None
        self._probing = threading.Lock()  # one diagnosis at a time, however often paho retries
        self.cause: str | None = "not connected yet"  # why the broker is unreachable; None while connected
        self.client = self._make_client(cfg)

    # --- public API (any thread) -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread.start()
        self.client.connect_async(self.mcfg.host, self.mcfg.port, keepalive=self.mcfg.keepalive)
        self.client.loop_start()

    def publish_alert(self, source: str, payload: dict[str, Any]) -> None:
        """On disk (fsynced) before this returns; the worker hands it to paho."""
        self._spool(self.topics.alert(source), _dumps(payload), 1)

    def publish_score(self, source: str, payload: dict[str, Any]) -> None:
        if self.mcfg.spool_scores:
            self._spool(self.topics.score(source), _dumps(payload), 0)
        else:
            self._events.put(("direct", self.topics.score(source), _dumps(payload), 0, False))

    def _spool(self, topic: str, payload: str, qos: int) -> None:
        record = self.spool.append(topic, payload, qos)  # None: held in memory, the worker retries
        self._events.put(("spooled", record))

    def publish_result(self, topic: str, payload: dict[str, Any]) -> None:
        self._events.put(("direct", topic, _dumps(payload), 1, False))

    def set_state(self, state: dict[str, Any]) -> None:
        """Retained state; kept and re-published on every connect."""
        self._events.put(("state", _dumps(state)))

    def set_discovery(self, messages: dict[str, str]) -> None:
        """Retained Home Assistant discovery configs (topic -> payload); dropped topics are cleared."""
        self._events.put(("discovery", dict(messages)))

    def stop(self, status: str = "stopped", timeout: float = 5.0) -> None:
        """Drain queued events into the spool, publish the final retained status, disconnect."""
        done = threading.Event()
        self._events.put(("stop", status, done))
        done.wait(timeout + 1.0)
        self._thread.join(timeout)
        self.client.loop_stop()
        self.spool.close()

    # --- paho callbacks (network thread) -----------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: Any,
                    properties: object = None) -> None:
        if reason.is_failure:
            self._events.put(("unreachable", f"refused by the broker: {reason}"))
            return
        client.subscribe([(topic, 1) for topic in self.topics.subscriptions])
        self._events.put(("connected",))

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: Any,
                       properties: object = None) -> None:
        self._events.put(("disconnected", str(reason)))

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        """paho could not connect (it does not say why): probe the same host, port and TLS settings."""
        if self._probing.acquire(blocking=False):
            threading.Thread(target=self._probe, name="mqtt-probe", daemon=True).start()

    def _probe(self) -> None:
        try:
            self._events.put(("unreachable", diagnose(self.mcfg, self._tls)))
        finally:
            self._probing.release()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: Any,
                    properties: object = None) -> None:
        self._events.put(("acked", mid))

    def _on_paho_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.retain and self.topics.desired_origin(message.topic) is None:
            return  # a stale retained command or config must not be re-applied at every connect (a desired
            # document is retained on purpose: its version says whether it is new)
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:
            log.exception("control_message_failed", topic=message.topic)

    # --- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                event = ("idle",)
            kind = event[0]
            try:
                if self.spool.stats().held and self.spool.retry_held():
                    self._flush()
                if kind == "spooled":
                    if event[1] is not None and self.connected:
                        self._fresh.add(event[1].seq)
                    self._flush()
                elif kind == "direct":
                    self._direct(*event[1:])
                elif kind == "state":
                    self._state_payload = event[1]
                    if self.connected:
                        self.client.publish(self.topics.state, self._state_payload, qos=1, retain=True)
                elif kind == "discovery":
                    gone = set(self._discovery) - set(event[1])
                    self._discovery = event[1]
                    if self.connected:
                        for topic in gone:
                            self.client.publish(topic, "", qos=1, retain=True)  # empty retained = removed
                        self._publish_discovery()
                elif kind == "connected":
                    self._handle_connected()
                elif kind == "disconnected":
                    self._handle_disconnected(event[1])
                elif kind == "unreachable":
                    self._report_unreachable(event[1])
                elif kind == "acked":
                    self._handle_acked(event[1])
                elif kind == "stop":
                    self._handle_stop(event[1], event[2])
                    return
            except Exception:
                log.exception("mqtt_worker_error", kind=kind)

    def _direct(self, topic: str, payload: str, qos: int, retain: bool) -> None:
        if not self.connected and qos == 0:
            return  # a score nobody can receive now: scores are not spooled unless spool_scores is set
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def _handle_connected(self) -> None:
        self._connected.set()
        self.cause = None
        self._generation += 1
        log.info("mqtt_connected", host=self.mcfg.host, port=self.mcfg.port, spool_pending=len(self.spool))
        self.client.publish(self.topics.status, "online", qos=1, retain=True)
        if self._state_payload is not None:
            self.client.publish(self.topics.state, self._state_payload, qos=1, retain=True)
        self._publish_discovery()
        self._flush()

    def _publish_discovery(self) -> None:
        for topic, payload in self._discovery.items():
            self.client.publish(topic, payload, qos=1, retain=True)

    def _report_unreachable(self, cause: str) -> None:
        if self._connected.is_set():
            return  # a late probe result: the connection came up meanwhile
        if cause != self.cause:  # once per change of cause, not once per retry
            log.warning("mqtt_unreachable", host=self.mcfg.host, port=self.mcfg.port, cause=cause,
                        spool_pending=len(self.spool))
        self.cause = cause

    def _handle_disconnected(self, reason: str) -> None:
        if self._connected.is_set():
            self.cause = f"disconnected ({reason})"
            log.warning("mqtt_disconnected", reason=reason, spool_pending=len(self.spool))
        self._connected.clear()
        # Whatever paho holds now is re-sent by paho with the DUP flag; new appends are replays.
        self._fresh.clear()

    def _handle_acked(self, mid: int) -> None:
        entry = self._handed.pop(mid, None)
        if entry is None:
            return  # a status, state or result message
        seq, _ = entry
        self._handed_seqs.discard(seq)
        self._fresh.discard(seq)
        self.spool.ack(seq)
        self._flush()

    def _flush(self) -> None:
        if not self.connected:
            return
        if any(gen != self._generation for _, gen in self._handed.values()):
            return  # paho is still re-sending older messages; keep the order
        for record in self.spool.pending():
            if len(self._handed) >= MAX_HANDED:
                return
            if record.seq in self._handed_seqs:
                continue
            self._hand(record)

    def _hand(self, record: SpoolRecord) -> None:
        payload = record.payload if record.seq in self._fresh else mark_replayed(record.payload)
        info = self.client.publish(record.topic, payload, qos=record.qos, retain=record.retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and record.qos == 0:
            return  # QoS 0 is not queued by paho: leave it in the spool for the next connect
        self._handed[info.mid] = (record.seq, self._generation)
        self._handed_seqs.add(record.seq)

    def _handle_stop(self, status: str, done: threading.Event) -> None:
        # Alerts are on disk before they are queued here (publish_alert); what the disk refused is retried
        # once more when the spool closes.
        if self.connected:
            deadline = time.monotonic() + 2.0
            while self._handed and time.monotonic() < deadline:
                try:
                    event = self._events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if event[0] == "acked":
                    self._handle_acked(event[1])
            info = self.client.publish(self.topics.status, status, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("final_status_not_sent", status=status, error=exc)
        self.client.disconnect()
        log.info("mqtt_stopped", status=status, spool_pending=len(self.spool))
        done.set()

    # --- setup -------------------------------------------------------------------------------------

    def _make_client(self, cfg: AgentConfig) -> paho.Client:
        m = self.mcfg
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=True,
                             protocol=paho.MQTTv311)
        client.enable_logger(logging.getLogger("edge_agent.paho"))
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=m.reconnect_min_seconds, max_delay=m.reconnect_max_seconds)
        if m.username is not None:
            client.username_pw_set(m.username, cfg.mqtt_password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
            client.tls_insecure_set(m.tls is not None and m.tls.insecure)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_paho_message
        return client


def homeassistant_discovery(topics: Topics, discovery_prefix: str, sources: list[tuple[str, bool]],
                            model_id: str) -> dict[str, str]:
    """Discovery configs: per source a `problem` binary sensor on the alert topic, a learning-progress sensor and
    a drift `problem` sensor read from the state, and a score sensor when the source publishes scores; per node an
    acknowledge button (dropped alerts). Available only while the node's status is `online`."""
    node = topics.node
    device = {"identifiers": [f"edge-asd-{node}"], "name": f"edge-asd {node}", "manufacturer": "edge-asd",
              "model": model_id}
    availability = [{"topic": topics.status,
                     "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}]
    out: dict[str, str] = {}
    for source, scores in sources:
        object_id = f"{node}_{source}".replace(".", "_")
        out[f"{discovery_prefix}/binary_sensor/{object_id}/anomaly/config"] = _dumps({
            "name": f"{source} anomaly", "unique_id": f"edge-asd-{node}-{source}-anomaly",
            "state_topic": topics.alert(source), "device_class": "problem",
            "value_template": "{{ 'OFF' if value_json.type == 'end' else 'ON' }}",
            "json_attributes_topic": topics.alert(source), "availability": availability, "device": device})
        mine = f"(value_json.sources | selectattr('name', 'eq', '{source}') | list | first)"
        out[f"{discovery_prefix}/sensor/{object_id}/learning/config"] = _dumps({
            "name": f"{source} learning", "unique_id": f"edge-asd-{node}-{source}-learning",
            "state_topic": topics.state, "unit_of_measurement": "%", "entity_category": "diagnostic",
            "value_template": f"{{% set s = {mine} %}}{{{{ s.learning.percent if s and s.learning and "
                              "s.learning.active else (100 if s and s.monitoring else 0) }}",
            "availability": availability, "device": device})
        out[f"{discovery_prefix}/binary_sensor/{object_id}/drift/config"] = _dumps({
            "name": f"{source} drifting", "unique_id": f"edge-asd-{node}-{source}-drift",
            "state_topic": topics.state, "device_class": "problem", "entity_category": "diagnostic",
            "value_template": f"{{% set s = {mine} %}}{{{{ 'ON' if s and s.drift and s.drift.status == 'drifting' "
                              "else 'OFF' }}",
            "availability": availability, "device": device})
        if scores:
            out[f"{discovery_prefix}/sensor/{object_id}/score/config"] = _dumps({
                "name": f"{source} anomaly score", "unique_id": f"edge-asd-{node}-{source}-score",
                "state_topic": topics.score(source), "value_template": "{{ value_json.score }}",
                "state_class": "measurement", "availability": availability, "device": device})
    out[f"{discovery_prefix}/button/{node.replace('.', '_')}/acknowledge/config"] = _dumps({
        "name": "acknowledge dropped alerts", "unique_id": f"edge-asd-{node}-acknowledge",
        "command_topic": topics._t("cmd", "acknowledge"), "payload_press": '{"what": "drops"}',
        "availability": availability, "device": device})
    return out


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))
