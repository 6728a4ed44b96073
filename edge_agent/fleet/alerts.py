"""`edge-agent fleet alerts`: follow every node's alert events (`<prefix>/<node>/<source>/alert`, QoS 1).

The consumer keeps a persistent session (a fixed client id, clean_session=False): the broker queues the
events published while it is away and delivers them at its next start. Each event is acknowledged only
once it has been printed (manual PUBACK), so an event still queued in this process when it exits is sent
again next time. Events are de-duplicated on (event_id, seq): a node re-sends an event it is not sure was
delivered (`replayed`), and the broker re-sends an unacknowledged one.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import OrderedDict
from types import FrameType
from typing import Any

from edge_agent.fleet.connection import Connection, FleetError, Message, Settings, default_client_id, node_of
from edge_agent.fleet.status import Snapshot, collect

DEFAULT_CLIENT_ID = "edge-asd-fleet-alerts"
MAX_KEYS = 100_000
GROUP_SETTLE_SECONDS = 0.5


class Seen:
    """The last MAX_KEYS (event_id, seq) keys, oldest forgotten first."""

    def __init__(self, limit: int = MAX_KEYS) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[str, int], None] = OrderedDict()

    def add(self, key: tuple[str, int]) -> bool:
        """True if the key is new."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)


def parse_alert(prefix: str, msg: Message) -> tuple[str, str, dict[str, Any]]:
    """(node, source, event) of an alert message; ValueError naming what is wrong."""
    head = prefix + "/"
    parts = msg.topic[len(head):].split("/") if msg.topic.startswith(head) else []
    if len(parts) != 3 or parts[2] != "alert":
        raise ValueError("not an alert topic")
    node, source = parts[0], parts[1]
    try:
        event = json.loads(msg.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(event, dict):
        raise ValueError(f"a JSON {type(event).__name__}, not an object")
    event_id, seq = event.get("event_id"), event.get("seq")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("event_id is not a non-empty string")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("seq is not an integer >= 0")
    if not isinstance(event.get("type"), str):
        raise ValueError("type is not a string")
    return node, source, event


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else "?"
    return f"{value:.4g}"


def alert_line(node: str, source: str, event: dict[str, Any]) -> str:
    """`<time> <node>/<source> <type> <event_id> seq=<n> score=<s> threshold=<t>[ replayed]`; the time is the
    event's window (when the audio was heard), not when it arrived."""
    when = event.get("window_start") or event.get("start") or "-"
    line = (f"{when} {node}/{source} {event['type']} {event['event_id']} seq={event['seq']} "
            f"score={_number(event.get('score'))} threshold={_number(event.get('threshold'))}")
    return line + (" replayed" if event.get("replayed") is True else "")


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()


def run(args: Any, settings: Settings) -> int:
    if args.count is not None and args.count < 1:
        raise FleetError(f"--count {args.count}: must be >= 1")
    if args.timeout is not None and args.timeout <= 0:
        raise FleetError(f"--timeout {args.timeout}: must be > 0 seconds")
    prefix = settings.prefix
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        groups: Snapshot | None = None
        if args.group is not None:
            # The retained states first (a clean session of its own): the persistent session delivers its queued
            # alerts at connect, before any retained state could arrive on it.
            probe = Connection(settings, default_client_id("states"))
            probe.connect()
            try:
                groups = collect(probe, GROUP_SETTLE_SECONDS)
            finally:
                probe.close()
        conn = Connection(settings, settings.client_id or DEFAULT_CLIENT_ID, clean_session=False, manual_ack=True)
        conn.connect()
        try:
            topics = [(f"{prefix}/+/+/alert", 1)]
            if groups is not None:
                topics.append((f"{prefix}/+/state", 0))  # kept current while following
            conn.subscribe(topics)
            code = _follow(conn, args, groups, stop)
            conn.barrier()  # every event printed is acknowledged before we go
            return code
        finally:
            conn.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _follow(conn: Connection, args: Any, groups: Snapshot | None, stop: _Stop) -> int:
    prefix = conn.settings.prefix
    seen = Seen()
    printed = 0
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    while not stop.event.is_set():
        if args.count is not None and printed >= args.count:
            return 0
        wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if wait <= 0:
            break
        msg = conn.get(wait)
        if msg is None:
            continue
        try:
            if groups is not None and node_of(prefix, msg.topic, "state") is not None:
                groups.take(msg)  # a state: the groups of its node
                continue
            try:
                node, source, event = parse_alert(prefix, msg)
            except ValueError as exc:
                print(f"edge-agent fleet: warning: {msg.topic}: malformed alert: {exc}", file=sys.stderr, flush=True)
                continue
            if groups is not None:
                view = groups.nodes.get(node)
                if view is None or view.groups is None or args.group not in view.groups:
                    continue
            if not seen.add((event["event_id"], event["seq"])):
                continue
            if args.json:
                print(json.dumps(event, separators=(",", ":")), flush=True)
            else:
                print(alert_line(node, source, event), flush=True)
            printed += 1
        finally:
            conn.ack(msg)
    if args.count is not None and printed < args.count:
        reason = "interrupted" if stop.event.is_set() else f"--timeout {args.timeout:g} s passed"
        print(f"edge-agent fleet: {reason} after {printed} of {args.count} event(s)", file=sys.stderr)
        return 0 if stop.event.is_set() else 1
    return 0
