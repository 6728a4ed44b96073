"""`edge-agent fleet cmd`: send a command to a node, a group (`<prefix>/group/<g>/cmd/<name>`) or every node
(`<prefix>/$broadcast/cmd/<name>`), and collect the answers on `<prefix>/<node>/cmd/result` that carry its
request id. For a group or the whole fleet the expected responders are the online nodes known from their
retained status and state; the ones that did not answer are reported."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Any

from edge_agent.agent.desired import MAX_REQUEST_ID
from edge_agent.fleet.connection import Connection, FleetError, Settings, default_client_id, node_of
from edge_agent.fleet.push import check_name
from edge_agent.fleet.status import collect, format_table

GRACE_SECONDS = 0.5  # after every expected node answered: a little longer for nodes without a retained state
SHORT = 100


def summary(command: str, result: object) -> str:
    """A short text of a command's result (a whole state for `status`)."""
    if result is None:
        return "-"
    if command == "status" and isinstance(result, dict):
        config = result.get("config")
        config = config if isinstance(config, dict) else {}
        parts = [f"status={result.get('status')}", f"health={result.get('health')}"]
        if config.get("version") is not None:
            parts.append(f"config=v{config.get('version')} {config.get('status')}")
        if isinstance(result.get("model"), dict):
            parts.append(f"model={result['model'].get('id')}")
        return " ".join(parts)
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= SHORT else text[:SHORT - 3] + "..."


def parse_args_json(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FleetError(f"--args: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FleetError(f"--args: must be a JSON object of the command's arguments, not {type(value).__name__}")
    return value


def run(args: Any, settings: Settings) -> int:
    name = args.name
    if not name or any(c in name for c in "/+#") or name == "result":
        raise FleetError(f"command name {name!r}: one topic level, not 'result' (the agent knows acknowledge, "
                         "enroll, reload, status)")
    arguments = parse_args_json(args.args)
    request_id = arguments.get("id") or f"fleet-cmd-{secrets.token_hex(6)}"
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
        raise FleetError(f"--args: id must be a string of 1 to {MAX_REQUEST_ID} characters")
    payload = {"id": request_id, **{k: v for k, v in arguments.items() if k != "id"}}
    if args.wait <= 0:
        raise FleetError("--wait: must be > 0 seconds")
    prefix = settings.prefix
    if args.node is not None:
        topic = f"{prefix}/{check_name('node', args.node)}/cmd/{name}"
    elif args.group is not None:
        topic = f"{prefix}/group/{check_name('group', args.group)}/cmd/{name}"
    else:
        topic = f"{prefix}/$broadcast/cmd/{name}"

    conn = Connection(settings, settings.client_id or default_client_id("cmd"))
    conn.connect()
    try:
        result_topic = (f"{prefix}/+/cmd/result", 1)
        if args.node is not None:
            conn.subscribe([result_topic])
            expected = [args.node]
        else:
            snapshot = collect(conn, args.settle, [result_topic])
            online = snapshot.online()
            if args.group is not None:
                members = set(snapshot.members(args.group))
                expected = [n for n in online if n in members]
            else:
                expected = online
        return _send(conn, args, topic, json.dumps(payload), request_id, expected)
    finally:
        conn.close()


def _send(conn: Connection, args: Any, topic: str, payload: str, request_id: str, expected: list[str]) -> int:
    prefix = conn.settings.prefix
    conn.publish(topic, payload, qos=1, retain=False)
    sent = time.monotonic()
    deadline = sent + args.wait
    answers: dict[str, dict[str, Any]] = {}
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        msg = conn.get(deadline - now)
        if msg is None:
            continue
        node = node_of(prefix, msg.topic, "cmd", "result")
        if node is None or node in answers:
            continue
        try:
            result = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(result, dict) or result.get("request_id") != request_id:
            continue
        answers[node] = {"node": node, "ok": result.get("ok") is True, "expected": node in expected,
                         "seconds": round(msg.received - sent, 3), "error": result.get("error"),
                         "result": result.get("result")}
        if args.node is not None:
            break  # one node: its answer is all there is
        if all(n in answers for n in expected):
            deadline = min(deadline, time.monotonic() + GRACE_SECONDS)
    rows = [answers[n] for n in sorted(answers)]
    missing = [n for n in expected if n not in answers]
    rows += [{"node": n, "ok": False, "expected": True, "seconds": None, "error": "no answer", "result": None}
             for n in missing]
    if args.json:
        print(json.dumps(rows))
    else:
        cells = [[r["node"], "yes" if r["ok"] else "no", "-" if r["seconds"] is None else f"{r['seconds']:.2f}",
                  str(r["error"]) if r["error"] else summary(args.name, r["result"])] for r in rows]
        print(format_table(["NODE", "OK", "SECONDS", "RESULT"], cells))
    if missing:
        print(f"edge-agent fleet: no answer within {args.wait:g} s from {', '.join(missing)}", file=sys.stderr)
    if not expected and not answers:
        print("edge-agent fleet: no node is known online and none answered", file=sys.stderr)
        return 1
    return 0 if not missing and all(r["ok"] for r in rows) else 1


def feedback(args: Any, settings: Settings) -> int:
    """`fleet feedback EVENT_ID --node N (--label L | --undo) [--note T]`: the `feedback` command to one node."""
    arguments: dict[str, Any] = {"event_id": args.event_id}
    if args.undo:
        arguments["undo"] = True
    else:
        arguments["label"] = args.label
    if args.note is not None:
        arguments["note"] = args.note
    forwarded = argparse.Namespace(name="feedback", node=args.node, group=None, all=False, args=json.dumps(arguments),
                                   wait=args.wait, json=args.json, settle=0.2)
    return run(forwarded, settings)
