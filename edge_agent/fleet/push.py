"""`edge-agent fleet push`: publish a versioned desired document (docs/fleet.md) to one node or a group, in a
canary wave first if asked, and report each node's answer on `<prefix>/<node>/config/result`.

The overlay is checked with the node's own validator before anything is published. The version is the next
one above everything known: the retained documents on the target topics and the versions the targets report.
Canaries get the document on their own topics (target `node/<n>`); only when every canary committed is the
group document (same version) published: at an equal version a node's own document beats its group's, so the
canaries do not act on it again.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.agent.config import NAME_PATTERN, FleetConfig
from edge_agent.agent.desired import MAX_REQUEST_ID, MAX_VERSION, check_overlay
from edge_agent.agent.inbound import LOCAL_FILE, load_yaml
from edge_agent.agent.signing import SignatureError, load_private_key, sign
from edge_agent.errors import ConfigError
from edge_agent.fleet.connection import Connection, FleetError, Settings, default_client_id, node_of
from edge_agent.fleet.status import Snapshot, collect, format_table

RESERVED = ("group", "$broadcast")
PHASES = ("committed", "rolled_back", "refused")


@dataclass
class Answer:
    node: str
    wave: str  # canary | group | node
    version: int
    result: str  # committed | rolled_back | refused | no answer | not pushed
    seconds: float | None  # from the wave's publish to the answer
    error: str | None = None
    origin: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "wave": self.wave, "version": self.version, "result": self.result,
                "seconds": None if self.seconds is None else round(self.seconds, 3), "error": self.error,
                "origin": self.origin}


def load_overlay(path: Path) -> dict[str, Any]:
    """FILE (YAML or JSON) holding the overlay, checked with the node's own validator (ConfigError -> FleetError
    naming the key path)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise FleetError(f"{path}: not UTF-8 text") from None
    try:
        overlay = load_yaml(text, LOCAL_FILE, str(path))
        check_overlay(overlay, FleetConfig().max_artifact_bytes)
    except ConfigError as exc:  # named by the file and the key path (as the node's answer would name it)
        raise FleetError(str(ConfigError(exc.path, exc.message, exc.value, str(path)))) from None
    assert isinstance(overlay, dict)
    return overlay


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name) or name in RESERVED:
        raise FleetError(f"--{kind} {name!r}: a {kind} name matches {NAME_PATTERN.pattern} "
                         f"(and is not {' or '.join(RESERVED)})")
    return name


def desired_topic(prefix: str, target: str) -> str:
    kind, name = target.split("/", 1)
    return f"{prefix}/{name}/config/desired" if kind == "node" else f"{prefix}/group/{name}/config/desired"


def _version_in(payload: bytes | None) -> int | None:
    if not payload:
        return None
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def known_versions(snapshot: Snapshot, topics: list[str], nodes: list[str]) -> dict[str, int]:
    """Where each known version comes from: retained documents on `topics`, and what `nodes` report."""
    found: dict[str, int] = {}
    for topic in topics:
        version = _version_in(snapshot.retained.get(topic))
        if version is not None:
            found[f"the retained document on {topic}"] = version
    for node in nodes:
        view = snapshot.nodes.get(node)
        state = view.state if view is not None else None
        config = state.get("config") if isinstance(state, dict) else None
        if not isinstance(config, dict):
            continue
        for key in ("version", "committed_version"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                found[f"{node}'s config.{key}"] = value
    return found


class Push:
    def __init__(self, conn: Connection, args: Any, overlay: dict[str, Any], key: Any) -> None:
        self.conn = conn
        self.prefix = conn.settings.prefix
        self.args = args
        self.overlay = overlay
        self.key = key
        self.request_id: str = args.id
        self.answers: dict[str, Answer] = {}  # node -> its answer to this version
        self.first_publish: float | None = None
        self.last_answer: float | None = None
        self.version = 0

    def document(self, target: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": self.version, "id": self.request_id, "target": target,
                               "config": self.overlay}
        return sign(doc, self.key) if self.key is not None else doc

    def publish(self, target: str) -> float:
        payload = json.dumps(self.document(target), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self.conn.publish(desired_topic(self.prefix, target), payload, qos=1, retain=True)
        now = time.monotonic()
        if self.first_publish is None:
            self.first_publish = now
        return now

    def wave(self, name: str, targets: list[str], nodes: list[str], wait: float) -> list[Answer]:
        """Publish the documents of `targets` and wait (at most `wait` s) for every node of `nodes` to answer."""
        published = 0.0
        for target in targets:
            published = self.publish(target)
        deadline = published + wait
        pending = set(nodes)
        while pending:
            msg = self.conn.get(deadline - time.monotonic())
            if msg is None:
                if time.monotonic() >= deadline:
                    break
                continue
            self._take(msg, name, published)
            pending -= set(self.answers)
        out = []
        for node in nodes:
            answer = self.answers.get(node)
            if answer is None:
                answer = Answer(node, name, self.version, "no answer", None)
            else:
                answer.wave = name
            out.append(answer)
        return out

    def _take(self, msg: Any, wave: str, published: float) -> None:
        node = node_of(self.prefix, msg.topic, "config", "result")
        if node is None or node in self.answers:
            return
        try:
            result = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            print(f"edge-agent fleet: warning: {msg.topic}: an answer that is not JSON", file=sys.stderr)
            return
        if not isinstance(result, dict) or result.get("version") != self.version or isinstance(
                result.get("version"), bool):
            return
        phase = result.get("phase")
        if phase not in PHASES:
            phase = "committed" if result.get("ok") is True else "refused"
        error = result.get("error")
        message = None
        if isinstance(error, dict):
            path, text = error.get("path"), error.get("message")
            message = f"{path}: {text}" if path else str(text)
        elif error is not None:
            message = str(error)
        origin = result.get("origin") if isinstance(result.get("origin"), str) else None
        self.answers[node] = Answer(node, wave, self.version, str(phase), msg.received - published, message, origin)
        self.last_answer = msg.received


def run(args: Any, settings: Settings) -> int:
    overlay = load_overlay(args.file)  # first: a wrong overlay is refused before anything is connected
    key = None
    if args.sign_key is not None:
        try:
            key = load_private_key(args.sign_key)
        except SignatureError as exc:
            raise FleetError(f"--sign-key: {exc}") from None
    if args.node is not None:
        check_name("node", args.node)
    else:
        check_name("group", args.group)
    if args.canary is not None and args.group is None:
        raise FleetError("--canary needs --group (the canaries are members of the group)")
    if args.canary is not None and args.canary < 1:
        raise FleetError(f"--canary {args.canary}: give at least 1 canary")
    if args.version is not None and not 1 <= args.version <= MAX_VERSION:
        raise FleetError(f"--version {args.version}: must be in [1, {MAX_VERSION}]")
    if args.id is not None and not 0 < len(args.id) <= MAX_REQUEST_ID:
        raise FleetError(f"--id: must be 1 to {MAX_REQUEST_ID} characters")
    if args.wait <= 0:
        raise FleetError("--wait: must be > 0 seconds")

    conn = Connection(settings, settings.client_id or default_client_id("push"))
    conn.connect()
    try:
        return _push(conn, args, overlay, key)
    finally:
        conn.close()


def _push(conn: Connection, args: Any, overlay: dict[str, Any], key: Any) -> int:
    prefix = conn.settings.prefix
    extra = [(f"{prefix}/+/config/desired", 1), (f"{prefix}/+/config/result", 1)]
    if args.group is not None:
        extra.append((f"{prefix}/group/{args.group}/config/desired", 1))
    # The answers' topics are subscribed here, before anything is published.
    snapshot = collect(conn, args.settle, extra)
    if args.node is not None:
        nodes = [args.node]
        topics = [desired_topic(prefix, f"node/{args.node}")]
        if args.node not in snapshot.nodes:
            print(f"edge-agent fleet: warning: node {args.node} has no retained status or state on "
                  f"{conn.settings.where} (prefix {prefix}); pushing anyway", file=sys.stderr)
    else:
        nodes = snapshot.members(args.group)
        if not nodes:
            raise FleetError(f"no node lists group {args.group} in its retained state (fleet.groups) on "
                             f"{conn.settings.where} (prefix {prefix}); nothing published")
        topics = [desired_topic(prefix, f"group/{args.group}")] + [desired_topic(prefix, f"node/{n}") for n in nodes]
    known = known_versions(snapshot, topics, nodes)
    highest = max(known.values(), default=0)
    push = Push(conn, args, overlay, key)
    if args.version is not None:
        push.version = args.version
        if args.version <= highest:
            where = max(known, key=lambda k: known[k])
            print(f"edge-agent fleet: warning: version {args.version} is not above version {highest} ({where}): "
                  "a node ignores a version it has applied or tried", file=sys.stderr)
    else:
        push.version = highest + 1
    if push.request_id is None:
        push.request_id = f"fleet-{push.version}-{secrets.token_hex(4)}"

    answers: list[Answer] = []
    failed_canary = False
    if args.node is not None:
        answers = push.wave("node", [f"node/{args.node}"], nodes, args.wait)
    elif args.canary is not None:
        order = sorted(nodes, key=lambda n: (not snapshot.nodes[n].online, n))
        canaries, rest = order[:args.canary], order[args.canary:]
        answers = push.wave("canary", [f"node/{n}" for n in canaries], canaries, args.wait)
        failed_canary = any(a.result != "committed" for a in answers)
        if failed_canary:
            answers += [Answer(n, "group", push.version, "not pushed", None) for n in sorted(rest)]
        else:
            answers += push.wave("group", [f"group/{args.group}"], sorted(rest), args.wait)
    else:
        answers = push.wave("group", [f"group/{args.group}"], nodes, args.wait)

    rows = [a.as_dict() for a in answers]
    if args.json:
        print(json.dumps(rows))
    else:
        headers = ["NODE", "WAVE", "VERSION", "RESULT", "SECONDS", "ERROR"]
        cells = [[r["node"], r["wave"], str(r["version"]), r["result"],
                  "-" if r["seconds"] is None else f"{r['seconds']:.2f}", r["error"] or "-"] for r in rows]
        print(format_table(headers, cells))
    if failed_canary:
        print(f"edge-agent fleet: canary wave failed: the group document (version {push.version}) was not "
              "published", file=sys.stderr)
    if push.first_publish is not None:
        if push.last_answer is not None:
            total = f"{push.last_answer - push.first_publish:.2f} s from the first publish to the last answer"
        else:
            total = "no answer"
        committed = sum(a.result == "committed" for a in answers)
        print(f"edge-agent fleet: version {push.version} ({push.request_id}): {committed}/{len(answers)} committed; "
              f"{total}", file=sys.stderr)
    return 0 if answers and all(a.result == "committed" for a in answers) else 1
