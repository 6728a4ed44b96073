"""`edge-agent fleet clip EVENT_ID --node N --out FILE`: fetch an alert episode's evidence clip over MQTT.

The node answers `cmd/clip` on `cmd/result` (size, sha256, chunk count), then sends the FLAC file in chunks on
`<prefix>/<node>/clip`; the chunks are joined in index order, checked against the sha256 and written atomically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.fleet.connection import Connection, FleetError, Settings, default_client_id
from edge_agent.fleet.push import check_name

MAX_CLIP_BYTES = 1 << 30


def run(args: Any, settings: Settings) -> int:
    node = check_name("node", args.node)
    out: Path = args.out
    if args.wait <= 0:
        raise FleetError("--wait: must be > 0 seconds")
    if out.exists() and out.is_dir():
        out = out / f"{args.event_id}.flac"
    if not out.parent.is_dir():
        raise FleetError(f"--out {args.out}: the directory {out.parent} does not exist")
    prefix = settings.prefix
    request_id = f"fleet-clip-{secrets.token_hex(6)}"
    conn = Connection(settings, settings.client_id or default_client_id("clip"))
    conn.connect()
    try:
        conn.subscribe([(f"{prefix}/{node}/cmd/result", 1), (f"{prefix}/{node}/clip", 1)])
        conn.publish(f"{prefix}/{node}/cmd/clip", json.dumps({"id": request_id, "event_id": args.event_id}))
        data, described = _receive(conn, prefix, node, request_id, args.wait)
    finally:
        conn.close()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FleetError(f"--out {out}: cannot write it ({exc.strerror})") from None
    print(str(out))
    print(f"edge-agent fleet: {args.event_id} from {node}: {len(data)} bytes, {described.get('duration')} s of "
          f"audio at {described.get('sample_rate')} Hz, sha256 {described['sha256']} verified", file=sys.stderr)
    return 0


def _receive(conn: Connection, prefix: str, node: str, request_id: str, wait: float) -> tuple[bytes, dict[str, Any]]:
    deadline = time.monotonic() + wait
    described: dict[str, Any] | None = None
    chunks: dict[int, bytes] = {}
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            got = "no answer" if described is None else f"{len(chunks)} of {described['chunks']} chunks"
            raise FleetError(f"node {node}: {got} within --wait {wait:g} s")
        msg = conn.get(left)
        if msg is None:
            continue
        try:
            doc = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(doc, dict) or doc.get("request_id") != request_id:
            continue
        if msg.topic.endswith("/cmd/result"):
            if doc.get("ok") is not True:
                raise FleetError(f"node {node} refused: {doc.get('error')}")
            described = doc.get("result") if isinstance(doc.get("result"), dict) else None
            if described is None or not _valid_description(described):
                raise FleetError(f"node {node}: a clip answer without size, sha256 and chunk count: {doc}")
        else:
            index = doc.get("index")
            if index == -1:
                raise FleetError(f"node {node}: the transfer stopped: {doc.get('error')}")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                continue
            try:
                chunks[index] = base64.b64decode(str(doc.get("data", "")), validate=True)
            except (binascii.Error, ValueError):
                raise FleetError(f"node {node}: chunk {index} is not base64") from None
        if described is not None and len(chunks) >= described["chunks"]:
            break
    data = b"".join(chunks[i] for i in sorted(chunks) if i < described["chunks"])
    if len(data) != described["bytes"] or hashlib.sha256(data).hexdigest() != described["sha256"]:
        raise FleetError(f"node {node}: the clip arrived damaged ({len(data)} bytes, expected {described['bytes']} "
                         "with its sha256); nothing written")
    return data, described


def _valid_description(doc: dict[str, Any]) -> bool:
    size, count, digest = doc.get("bytes"), doc.get("chunks"), doc.get("sha256")
    return (isinstance(size, int) and 0 <= size <= MAX_CLIP_BYTES and isinstance(count, int) and count >= 1
            and isinstance(digest, str) and len(digest) == 64)
