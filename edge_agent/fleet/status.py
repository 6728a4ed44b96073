"""`edge-agent fleet status`: what every node reports, read from the retained `<prefix>/<node>/status` and
`<prefix>/<node>/state` messages (docs/agent.md, docs/fleet.md).

A state is read field by field: a field of the wrong type shows as `?` (and is named on stderr), so one node
with a malformed state cannot hide the others.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from edge_agent.fleet.connection import Connection, Message, node_of

MAX_SETTLE_SECONDS = 10.0
UNKNOWN = "?"


@dataclass
class NodeView:
    """One node as its retained messages show it."""

    name: str
    status: str | None = None  # from <prefix>/<node>/status
    state: dict[str, Any] | None = None
    state_problem: str | None = None  # the state payload is not a JSON object
    problems: list[str] = field(default_factory=list)  # fields of the wrong type

    def take_state(self, payload: bytes) -> None:
        self.state, self.state_problem = None, None
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.state_problem = f"the state is not JSON ({str(exc)[:80]})"
            return
        if not isinstance(doc, dict):
            self.state_problem = f"the state is a JSON {type(doc).__name__}, not an object"
            return
        self.state = doc

    @property
    def groups(self) -> list[str] | None:
        """fleet.groups, or None when unknown or malformed."""
        value = _path(self.state, "fleet", "groups")
        if isinstance(value, list) and all(isinstance(g, str) for g in value):
            return value
        return None

    @property
    def online(self) -> bool:
        if self.status is not None:
            return self.status == "online"
        return isinstance(self.state, dict) and self.state.get("status") == "online"


@dataclass
class Snapshot:
    """Every node seen, and the other retained messages collected with them (desired documents)."""

    prefix: str
    nodes: dict[str, NodeView] = field(default_factory=dict)
    retained: dict[str, bytes] = field(default_factory=dict)  # topic -> payload, for the extra topics
    live: list[Message] = field(default_factory=list)  # other messages received meanwhile

    def node(self, name: str) -> NodeView:
        if name not in self.nodes:
            self.nodes[name] = NodeView(name)
        return self.nodes[name]

    def take(self, msg: Message) -> bool:
        """Take a status or state message (True), else keep it aside."""
        node = node_of(self.prefix, msg.topic, "status")
        if node is not None:
            if msg.payload:
                self.node(node).status = msg.payload.decode("utf-8", errors="replace")[:32]
            elif node in self.nodes:
                self.nodes[node].status = None
            return True
        node = node_of(self.prefix, msg.topic, "state")
        if node is not None:
            if msg.payload:
                self.node(node).take_state(msg.payload)
            elif node in self.nodes:  # an empty retained message clears the state
                self.nodes[node].state = None
                self.nodes[node].state_problem = None
            return True
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg.payload
            else:
                self.retained.pop(msg.topic, None)
        else:
            self.live.append(msg)
        return False

    def members(self, group: str) -> list[str]:
        return sorted(n for n, v in self.nodes.items() if v.groups is not None and group in v.groups)

    def online(self) -> list[str]:
        return sorted(n for n, v in self.nodes.items() if v.online)


def topics_of(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}/+/status", 1), (f"{prefix}/+/state", 1)]


def collect(conn: Connection, settle: float, extra: list[tuple[str, int]] | None = None) -> Snapshot:
    """Subscribe to every node's status and state (and `extra` topics), and take the retained messages until
    none arrived for `settle` seconds (at most MAX_SETTLE_SECONDS in all). Live messages update the snapshot
    but do not prolong the wait: a busy fleet would never settle."""
    prefix = conn.settings.prefix
    snapshot = Snapshot(prefix)
    settle = min(max(settle, 0.05), MAX_SETTLE_SECONDS)
    started = time.monotonic()
    conn.subscribe(topics_of(prefix) + (extra or []))
    quiet_since = time.monotonic()
    hard_stop = started + MAX_SETTLE_SECONDS
    while True:
        now = time.monotonic()
        wait = min(quiet_since + settle, hard_stop) - now
        if wait <= 0:
            break
        msg = conn.get(wait)
        if msg is None:
            continue
        snapshot.take(msg)
        if msg.retain:
            quiet_since = time.monotonic()
    return snapshot


# --- rows --------------------------------------------------------------------------------------------------


def _path(doc: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


class _Reader:
    """Typed reads of one state: a wrong type is recorded and read as UNKNOWN."""

    def __init__(self, view: NodeView):
        self.doc = view.state
        self.problems = view.problems
        self.problems.clear()

    def get(self, types: tuple[type, ...], *keys: str, doc: object = None, where: str = "") -> Any:
        base = self.doc if doc is None else doc
        value: object = base
        for i, key in enumerate(keys):
            if value is None:
                return None
            if not isinstance(value, dict):
                self.problems.append(f"{where}{'.'.join(keys[:i]) or '(top)'} is not an object")
                return UNKNOWN
            value = value.get(key)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            self.problems.append(f"{where}{'.'.join(keys)} has the wrong type ({type(value).__name__})")
            return UNKNOWN
        return value


def node_row(view: NodeView) -> dict[str, Any]:
    """One node's row (the JSON object of `status --json`; the table shows the same)."""
    row: dict[str, Any] = {"node": view.name, "status": view.status}
    if view.state is None:
        view.problems = [view.state_problem] if view.state_problem else []
        unknown = UNKNOWN if view.state_problem else None
        row.update({"groups": unknown, "config_version": unknown, "config_status": unknown,
                    "committed_version": unknown, "config_error": None, "model": unknown, "banks": unknown,
                    "health": unknown, "open_episodes": unknown, "spool_pending": unknown,
                    "problems": list(view.problems)})
        return row
    r = _Reader(view)
    if view.status is None:
        row["status"] = r.get((str,), "status")
    groups = r.get((list,), "fleet", "groups")
    if isinstance(groups, list) and not all(isinstance(g, str) for g in groups):
        r.problems.append("fleet.groups is not a list of names")
        groups = UNKNOWN
    row["groups"] = groups
    row["config_version"] = r.get((int,), "config", "version")
    row["config_status"] = r.get((str,), "config", "status")
    row["committed_version"] = r.get((int,), "config", "committed_version")
    row["config_error"] = r.get((str,), "config", "error")
    row["config_origin"] = r.get((str,), "config", "desired_origin")
    row["config_hash"] = r.get((str,), "config", "hash")
    progress = r.get((dict,), "config", "progress")
    row["config_progress"] = progress
    model = r.get((dict,), "model")
    if isinstance(model, dict):
        model = {"id": r.get((str,), "model", "id"), "version": r.get((str,), "model", "version"),
                 "sha256": r.get((str,), "model", "sha256")}
    row["model"] = model
    sources = r.get((list,), "sources")
    banks: Any = sources if sources in (None, UNKNOWN) else []
    episodes: Any = sources if sources in (None, UNKNOWN) else []
    if isinstance(sources, list):
        for i, src in enumerate(sources):
            where = f"sources[{i}]."
            if not isinstance(src, dict):
                r.problems.append(f"sources[{i}] is not an object")
                banks.append({"source": UNKNOWN, "id": UNKNOWN, "version": None})
                continue
            name = r.get((str,), "name", doc=src, where=where) or UNKNOWN
            banks.append({"source": name, "id": r.get((str,), "bank", "id", doc=src, where=where),
                          "version": r.get((str,), "bank", "version", doc=src, where=where),
                          "sha256": r.get((str,), "bank", "sha256", doc=src, where=where)})
            episode = r.get((str,), "episode", doc=src, where=where)
            if episode is not None:
                episodes.append(name if episode != UNKNOWN else f"{name}=?")
    row["banks"] = banks
    row["open_episodes"] = episodes
    row["health"] = r.get((str,), "health")
    row["spool_pending"] = r.get((int,), "spool", "pending")
    row["problems"] = list(r.problems)
    return row


def _text(value: object) -> str:
    if value is None:
        return "-"
    return str(value)


def table_cells(row: dict[str, Any]) -> list[str]:
    groups = row["groups"]
    model = row["model"]
    if isinstance(model, dict):
        model_text = _text(model["id"]) + (f"@{model['version']}" if model.get("version") else "")
    else:
        model_text = _text(model)
    banks = row["banks"]
    if isinstance(banks, list):
        banks_text = ",".join(f"{b['source']}={_text(b['id'])}" + (f"@{b['version']}" if b.get("version") else "")
                              for b in banks) or "-"
    else:
        banks_text = _text(banks)
    episodes = row["open_episodes"]
    episodes_text = (",".join(episodes) or "-") if isinstance(episodes, list) else _text(episodes)
    return [row["node"], _text(row["status"]), (",".join(groups) or "-") if isinstance(groups, list) else _text(groups),
            _text(row["config_version"]), _text(row["config_status"]), _text(row["committed_version"]), model_text,
            banks_text, _text(row["health"]), episodes_text, _text(row["spool_pending"])]


HEADERS = ["NODE", "STATUS", "GROUPS", "VERSION", "CONFIG", "COMMITTED", "MODEL", "BANKS", "HEALTH", "EPISODES",
           "SPOOL"]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def report(snapshot: Snapshot, group: str | None, as_json: bool) -> int:
    rows = []
    for name in sorted(snapshot.nodes):
        view = snapshot.nodes[name]
        row = node_row(view)
        if group is not None and not (isinstance(row["groups"], list) and group in row["groups"]):
            continue
        rows.append(row)
        for problem in row["problems"]:
            print(f"edge-agent fleet: warning: node {name}: malformed state: {problem}", file=sys.stderr)
    if as_json:
        print(json.dumps(rows, indent=None, sort_keys=False))
    else:
        print(format_table(HEADERS, [table_cells(r) for r in rows]))
        if not rows:
            print("(no node" + (f" of group {group}" if group is not None else "") + " has a retained status or state)",
                  file=sys.stderr)
    return 0
