"""How `edge-agent fleet` reaches the broker: the connection options (an agent config's `mqtt` section and/or
flags, validated by the agent's own `build_mqtt`), and a small synchronous wrapper around a paho client that
connects (naming the cause when it cannot), subscribes and publishes waiting for the broker's acknowledgement,
and hands every received message to the calling thread through a queue."""

from __future__ import annotations

import argparse
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.agent.config import MqttConfig, build_mqtt
from edge_agent.agent.connection import diagnose, tls_context
from edge_agent.agent.inbound import LOCAL_FILE, load_yaml
from edge_agent.errors import ConfigError, EdgeAsdError

CONNECT_SECONDS = 10.0  # for the CONNACK (the TCP connect itself times out after paho's 5 s)
ACK_SECONDS = 10.0  # for a SUBACK or a PUBACK


class FleetError(EdgeAsdError):
    """Reported as one line `edge-agent fleet: error: ...`, exit 2."""


# --- options -----------------------------------------------------------------------------------------------

# mqtt key path -> the flag that sets it (an error about a key a flag set names the flag)
_FLAGS = {"mqtt.host": "--host", "mqtt.port": "--port", "mqtt.prefix": "--prefix", "mqtt.username": "--username",
          "mqtt.password_file": "--password-file", "mqtt.password_env": "--password-env",
          "mqtt.tls.ca_file": "--ca-file", "mqtt.tls.cert_file": "--cert-file", "mqtt.tls.key_file": "--key-file",
          "mqtt.tls.insecure": "--insecure"}


def connection_parent() -> argparse.ArgumentParser:
    """The connection options every fleet command takes (an argparse parent parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("broker connection (as the agent's mqtt section; flags override --config)")
    group.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="a YAML file whose mqtt: section is used (an agent config, say)")
    group.add_argument("--host", default=None, help="broker host (default: localhost)")
    group.add_argument("--port", type=int, default=None, help="broker port (default: 1883)")
    group.add_argument("--prefix", default=None, help="topic prefix (default: edge-asd)")
    group.add_argument("--username", default=None)
    group.add_argument("--password-file", default=None, metavar="FILE", help="the password (trailing newline stripped)")
    group.add_argument("--password-env", default=None, metavar="VAR", help="environment variable holding the password")
    group.add_argument("--ca-file", default=None, metavar="PEM", help="CA certificates: turns TLS on")
    group.add_argument("--cert-file", default=None, metavar="PEM", help="client certificate (TLS)")
    group.add_argument("--key-file", default=None, metavar="PEM", help="client key (TLS)")
    group.add_argument("--insecure", action="store_true",
                       help="TLS without host-name verification (testing only)")
    group.add_argument("--client-id", default=None,
                       help="MQTT client id (the config file's mqtt.client_id is not used: it is the agent's own)")
    return parser


@dataclass(frozen=True)
class Settings:
    mqtt: MqttConfig
    password: str | None
    client_id: str | None  # --client-id, if given
    source: str = "command line"  # the --config file, or the command line
    given: tuple[tuple[str, object], ...] = ()  # (mqtt key path, value) that a flag set

    def error(self, exc: ConfigError) -> FleetError:
        """A config error as one line naming the flag, or the file and key, at fault."""
        if exc.source is None:
            exc = ConfigError(exc.path, exc.message, exc.value, self.source)
        return FleetError(_named(exc, dict(self.given)))

    @property
    def prefix(self) -> str:
        return self.mqtt.prefix

    @property
    def where(self) -> str:
        return f"{self.mqtt.host}:{self.mqtt.port}"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The mqtt section of --config (if any) with the flags on top, validated like the agent's."""
    raw: dict[str, Any] = {}
    source, base_dir = "command line", Path.cwd()
    if args.config is not None:
        raw, source, base_dir = _config_section(args.config)
    given: dict[str, object] = {}

    def put(key: str, value: object) -> None:
        raw[key] = value
        given[f"mqtt.{key}"] = value

    if args.host is not None:
        put("host", args.host)
    if args.port is not None:
        put("port", args.port)
    if args.prefix is not None:
        put("prefix", args.prefix)
    if args.username is not None:
        put("username", args.username)
    for flag_key, value in (("password_file", args.password_file), ("password_env", args.password_env)):
        if value is not None:
            for key in ("password", "password_file", "password_env"):
                if f"mqtt.{key}" not in given:
                    raw.pop(key, None)
            put(flag_key, _absolute(value) if flag_key == "password_file" else value)
    tls_flags = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    if any(v is not None for v in tls_flags.values()) or args.insecure:
        tls = dict(raw.get("tls") or {}) if isinstance(raw.get("tls") or {}, dict) else {}
        for key, value in tls_flags.items():
            if value is not None:
                tls[key] = _absolute(value)
                given[f"mqtt.tls.{key}"] = tls[key]
        if args.insecure:
            tls["insecure"] = True
            given["mqtt.tls.insecure"] = True
        raw["tls"] = tls
    try:
        mqtt, password = build_mqtt(raw, source, base_dir)
    except ConfigError as exc:
        raise FleetError(_named(exc, given)) from None
    return Settings(mqtt, password, args.client_id, source, tuple(given.items()))


def _config_section(path: Path) -> tuple[dict[str, Any], str, Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise FleetError(f"--config {path}: not UTF-8 text") from None
    try:
        doc = load_yaml(text, LOCAL_FILE, str(path))
    except ConfigError as exc:
        raise FleetError(f"--config {path}: {exc}") from None
    section = doc.get("mqtt") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise FleetError(f"--config {path}: has no mqtt: section (a mapping) to connect with")
    section = {k: v for k, v in section.items() if k != "client_id"}  # the agent's own id: never borrowed
    return section, str(path), path.resolve().parent


def _absolute(value: str) -> str:
    return os.path.abspath(os.path.expanduser(value))


def _named(exc: ConfigError, given: dict[str, object]) -> str:
    """`--flag VALUE: message` for a key a flag set (the value in full: a path is worth reading whole), else the
    error as it is (file: key path: message)."""
    flag = _FLAGS.get(exc.path)
    if flag is not None and exc.path in given:
        if isinstance(given[exc.path], bool):
            return f"{flag}: {exc.message}"
        return f"{flag} {given[exc.path]}: {exc.message}"
    return str(exc)


# --- the client --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    mid: int
    received: float  # time.monotonic() on arrival


def default_client_id(kind: str) -> str:
    return f"edge-asd-fleet-{kind}-{os.getpid()}-{secrets.token_hex(3)}"


class Connection:
    """One paho client, its network loop on paho's thread; messages reach the caller through `get`."""

    def __init__(self, settings: Settings, client_id: str, clean_session: bool = True, manual_ack: bool = False):
        self.settings = settings
        self.client_id = client_id
        self.messages: queue.Queue[Message] = queue.Queue()
        self._cond = threading.Condition()
        self._connack: Any = None  # the CONNACK reason code of the first connect
        self._closed_early = False
        self._subscriptions: list[tuple[str, int]] = []
        self._subacks: dict[int, list[Any]] = {}
        self._gone = threading.Event()  # set at every disconnect
        m = settings.mqtt
        try:
            self._tls = tls_context(m.tls) if m.tls is not None else None
        except ConfigError as exc:
            raise settings.error(exc) from None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                  protocol=paho.MQTTv311, manual_ack=manual_ack)
        if m.username is not None:
            self.client.username_pw_set(m.username, settings.password)
        if self._tls is not None:
            self.client.tls_set_context(self._tls)
            self.client.tls_insecure_set(m.tls is not None and m.tls.insecure)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # --- paho callbacks (paho's thread) ---

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: Any,
                    properties: object = None) -> None:
        with self._cond:
            if self._connack is None:
                self._connack = reason
            self._cond.notify_all()
            subscriptions = list(self._subscriptions)
        if not reason.is_failure and subscriptions:  # a reconnect: subscribe again
            client.subscribe(subscriptions)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: Any,
                       properties: object = None) -> None:
        self._gone.set()
        with self._cond:
            if self._connack is None:
                self._closed_early = True
            self._cond.notify_all()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[Any],
                      properties: object = None) -> None:
        with self._cond:
            self._subacks[mid] = list(reasons)
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.messages.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, msg.mid,
                                  time.monotonic()))

    # --- API (the calling thread) ---

    def connect(self, timeout: float = CONNECT_SECONDS) -> None:
        m = self.settings.mqtt
        try:
            self.client.connect(m.host, m.port, keepalive=m.keepalive)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            cause = diagnose(m, self._tls) if not isinstance(exc, ValueError) else str(exc)
            raise FleetError(f"cannot connect to the broker {self.settings.where}: {cause}") from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._connack is None and not self._closed_early:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            reason, early = self._connack, self._closed_early
        if reason is not None and not reason.is_failure:
            return
        self.close()
        if reason is not None:
            raise FleetError(f"the broker {self.settings.where} refused the connection: {reason} "
                             f"(user name, password or client certificate?)")
        if early:
            raise FleetError(f"the broker {self.settings.where} closed the connection before accepting it "
                             f"(credentials, client id or protocol?)")
        raise FleetError(f"the broker {self.settings.where} did not answer the MQTT connect within {timeout:g} s")

    def subscribe(self, topics: list[tuple[str, int]], timeout: float = ACK_SECONDS) -> None:
        """Subscribe and wait for the SUBACK: from here on, what is published on these topics reaches us."""
        with self._cond:
            self._subscriptions += topics
        rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise FleetError(f"cannot subscribe to {', '.join(t for t, _ in topics)}: {paho.error_string(rc)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"the broker {self.settings.where} did not acknowledge the subscription to "
                                     f"{', '.join(t for t, _ in topics)} within {timeout:g} s")
                self._cond.wait(left)
            reasons = self._subacks.pop(mid)
        refused = [t for (t, _), r in zip(topics, reasons, strict=False) if getattr(r, "is_failure", False)]
        if refused:
            raise FleetError(f"the broker {self.settings.where} refused the subscription to {', '.join(refused)} "
                             "(its ACL?)")

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False,
                timeout: float = ACK_SECONDS) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise FleetError(f"cannot publish on {topic}: {paho.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise FleetError(f"cannot publish on {topic}: {exc}") from None
        if not info.is_published():
            raise FleetError(f"the broker {self.settings.where} did not acknowledge the message on {topic} "
                             f"within {timeout:g} s")

    def get(self, timeout: float) -> Message | None:
        try:
            return self.messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def ack(self, message: Message) -> None:
        """With manual_ack: acknowledge a QoS 1 message once it has been handled (an unhandled one is re-sent to
        the persistent session at the next start)."""
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def barrier(self, timeout: float = ACK_SECONDS) -> None:
        """Return once the broker has processed everything sent before (acknowledgements included): it answers a
        SUBSCRIBE only after the packets that came before it. (A DISCONNECT right after manual PUBACKs lost some of
        them on mosquitto: the messages came again at the next start.)"""
        level = re.sub(r"[^A-Za-z0-9_.-]", "_", self.client_id) or "client"
        topic = f"{self.settings.prefix}/$barrier/{level}"  # nothing is published there
        try:
            self.subscribe([(topic, 0)], timeout)
        except FleetError:
            pass  # refused by an ACL or late: the broker has still processed what came before, or we tried
        finally:
            with self._cond:
                self._subscriptions = [s for s in self._subscriptions if s[0] != topic]
        self.client.unsubscribe(topic)

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly: what is queued (acknowledgements included) goes out before the DISCONNECT, and the
        network loop stops only once the broker connection is closed."""
        try:
            if self.client.is_connected():
                self._gone.clear()
                self.client.disconnect()
                self._gone.wait(timeout)
        finally:
            self.client.loop_stop()


def node_of(prefix: str, topic: str, *tail: str) -> str | None:
    """The node of `<prefix>/<node>/<tail...>`, or None for another topic (group and broadcast topics included)."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head):].split("/")
    if len(parts) != 1 + len(tail) or tuple(parts[1:]) != tail or not parts[0]:
        return None
    if parts[0] in ("group", "$broadcast"):
        return None
    return parts[0]
