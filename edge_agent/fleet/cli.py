"""`edge-agent fleet ...`: the argparse side of the operator CLI. Every error is one line
`edge-agent fleet: error: ...` and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeAsdError
from edge_agent.fleet import alerts, clip, commands, keygen, push, status
from edge_agent.fleet.connection import Connection, FleetError, connection_parent, default_client_id, settings_from_args

DESCRIPTION = """Operate a fleet of edge-asd nodes over MQTT (docs/fleet.md): see what every node runs, push
versioned desired documents to a node or a group (with a canary wave), follow the alerts, send commands."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `fleet` on the top-level CLI's subparsers."""
    conn = connection_parent()
    fleet = subparsers.add_parser("fleet", description=DESCRIPTION, help="operate a fleet of nodes over MQTT "
                                  "(status, push, alerts, cmd, clip, feedback, keygen)")
    commands_ = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    p = commands_.add_parser("status", parents=[conn], help="one row per node, from the retained status and state")
    p.add_argument("--group", default=None, help="only the nodes whose fleet.groups lists this group")
    p.add_argument("--json", action="store_true", help="a JSON list of per-node objects")
    p.add_argument("--settle", type=float, default=1.0,
                   help="stop when no retained message arrived for this long (seconds; default %(default)s, "
                        f"at most {status.MAX_SETTLE_SECONDS:g})")

    p = commands_.add_parser("push", parents=[conn], help="publish a versioned desired document and wait for answers")
    p.add_argument("file", type=Path, metavar="FILE", help="YAML or JSON: the overlay (the document's config)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", default=None, help="one node (its own topic)")
    target.add_argument("--group", default=None, help="a group (its topic; members: nodes whose state lists it)")
    p.add_argument("--canary", type=int, default=None, metavar="K",
                   help="group only: the first K members (online first, then by name) get it on their own topics "
                        "first; the group document follows only if all K committed")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS", help="bound of each wave (default 120)")
    p.add_argument("--sign-key", type=Path, default=None, metavar="PEM", help="PKCS#8 PEM ed25519 key (fleet keygen)")
    p.add_argument("--id", default=None, help="request id echoed in the answers (default: generated)")
    p.add_argument("--version", type=int, default=None, metavar="V",
                   help="the document's version (default: 1 + the highest known on the targets)")
    p.add_argument("--json", action="store_true", help="the result table as JSON")
    p.add_argument("--settle", type=float, default=1.0, help="as for status: how long to read the retained messages")

    p = commands_.add_parser("alerts", parents=[conn], help="follow the alert events (persistent session)")
    p.add_argument("--group", default=None, help="only the nodes whose retained state lists this group")
    p.add_argument("--json", action="store_true", help="each event's payload as one JSON line")
    p.add_argument("--count", type=int, default=None, metavar="N", help="exit 0 after N unique events")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds (exit 1 if --count was given and fewer arrived)")
    p.epilog = (f"The session is persistent (client id {alerts.DEFAULT_CLIENT_ID} unless --client-id): events "
                "published while the consumer is away are delivered at its next start.")

    p = commands_.add_parser("cmd", parents=[conn], help="send a command, collect the answers")
    p.add_argument("name", metavar="NAME", help="the command: status, reload, acknowledge, enroll")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", default=None)
    target.add_argument("--group", default=None)
    target.add_argument("--all", action="store_true", help="every node ($broadcast)")
    p.add_argument("--args", default=None, metavar="JSON", help="the command's arguments as a JSON object")
    p.add_argument("--wait", type=float, default=10.0, metavar="S", help="how long to collect answers (default 10)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--settle", type=float, default=1.0, help="as for status: how long to read the retained messages")

    p = commands_.add_parser("clip", parents=[conn], help="fetch an alert episode's evidence clip (FLAC)")
    p.add_argument("event_id", metavar="EVENT_ID", help="the event_id of the alert")
    p.add_argument("--node", required=True, help="the node that raised it")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write it (a directory: "
                   "EVENT_ID.flac in it)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="how long the transfer may take (default 60)")

    p = commands_.add_parser("feedback", parents=[conn], help="label an alert: false_positive teaches the bank")
    p.add_argument("event_id", metavar="EVENT_ID", help="the event_id of the alert")
    p.add_argument("--node", required=True, help="the node that raised it")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--label", choices=("false_positive", "true_positive"))
    verdict.add_argument("--undo", action="store_true", help="take back the feedback given to this event")
    p.add_argument("--note", default=None, help="a note kept with the label")
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="how long to wait for the answer")
    p.add_argument("--json", action="store_true")

    p = commands_.add_parser("keygen", help="write an ed25519 signing key, print its public key")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/fleet-signing.pem (0600)")

    fleet.set_defaults(handler=run)
    return fleet


def run(args: argparse.Namespace) -> int:
    try:
        if args.fleet_command == "keygen":
            return keygen.run(args)
        settings = settings_from_args(args)
        if args.fleet_command == "status":
            conn = Connection(settings, settings.client_id or default_client_id("status"))
            conn.connect()
            try:
                snapshot = status.collect(conn, args.settle)
            finally:
                conn.close()
            return status.report(snapshot, args.group, args.json)
        if args.fleet_command == "push":
            return push.run(args, settings)
        if args.fleet_command == "alerts":
            return alerts.run(args, settings)
        if args.fleet_command == "cmd":
            return commands.run(args, settings)
        if args.fleet_command == "clip":
            return clip.run(args, settings)
        if args.fleet_command == "feedback":
            return commands.feedback(args, settings)
        raise FleetError(f"unknown fleet command {args.fleet_command!r}")
    except FleetError as exc:
        print(f"edge-agent fleet: error: {exc}", file=sys.stderr)
        return 2
    except EdgeAsdError as exc:
        print(f"edge-agent fleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
