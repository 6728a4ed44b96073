"""`edge-agent fleet alerts`: a persistent session receives the events published while the consumer was away,
de-duplicated on (event_id, seq); --group, --count, --timeout, malformed payloads."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from ..agent.agent_helpers import REPO
from .conftest import ANOMALOUS, PREFIX, Rig

LINE = re.compile(r"^(\S+) (\S+)/(\S+) (new|update|end) (\S+) seq=(\d+) score=(\S+) threshold=(\S+)( replayed)?$")


def _alert_keys(messages: list) -> list[tuple[str, int]]:
    return [(p["event_id"], p["seq"]) for t, p, _ in messages if t.endswith("/alert") and isinstance(p, dict)
            and "event_id" in p]


def test_the_persistent_session_delivers_the_alerts_published_while_away(rig: Rig) -> None:
    client_id = "fleet-test-away"
    first = rig.cli("alerts", "--client-id", client_id, "--timeout", "1")  # creates the session
    assert first.returncode == 0, first.stderr
    for line in first.stdout.splitlines():  # whatever arrived meanwhile, in the text format
        assert LINE.match(line), line
    seen_by_first = {(m.group(5), int(m.group(6))) for m in map(LINE.match, first.stdout.splitlines()) if m}
    stopped_at = len(rig.watcher.messages)
    rig.watcher.wait_for(lambda m: len(_alert_keys(m[stopped_at:])) >= 6, timeout=30,
                         what=f"{ANOMALOUS} publishing alerts while the consumer is away")
    away = _alert_keys(rig.watcher.messages[stopped_at:])
    before_start = set(_alert_keys(rig.watcher.messages))

    second = rig.cli("alerts", "--client-id", client_id, "--count", "5", "--json", "--timeout", "30")
    assert second.returncode == 0, second.stderr
    events = [json.loads(line) for line in second.stdout.splitlines()]
    assert len(events) == 5
    keys = [(e["event_id"], e["seq"]) for e in events]
    assert len(set(keys)) == 5, f"duplicates printed: {keys}"
    assert all(e["node"] == ANOMALOUS and e["type"] in ("new", "update", "end") for e in events)
    # the first events are those queued while it was away, oldest first (a fresh session would only see new ones)
    assert all(k in before_start and k not in seen_by_first for k in keys[:3]), (keys, away)
    position = {k: i for i, k in enumerate(_alert_keys(rig.watcher.messages))}
    assert [position[k] for k in keys[:3]] == sorted(position[k] for k in keys[:3]), "not in publish order"
    assert any(k in away for k in keys[:3]), (keys, away)

    # the events it had received but not printed when it stopped at --count are delivered at the next start:
    # nothing is lost between two runs, and nothing printed is printed again
    third = rig.cli("alerts", "--client-id", client_id, "--count", "3", "--json", "--timeout", "30")
    assert third.returncode == 0, third.stderr
    next_keys = [(e["event_id"], e["seq"]) for e in map(json.loads, third.stdout.splitlines())]
    published = _alert_keys(rig.watcher.messages)
    assert published.index(next_keys[0]) == published.index(keys[-1]) + 1, (keys, next_keys, published)


def test_duplicates_are_printed_once_and_malformed_alerts_are_skipped(rig: Rig) -> None:
    client_id = "fleet-test-dedup"
    ghost = f"{PREFIX}/ghost/fan/alert"
    rig.publish(f"{PREFIX}/ghost/state", json.dumps({"node": "ghost", "status": "online",
                                                     "fleet": {"groups": ["ghosts"]}}), retain=True)
    try:
        first = rig.cli("alerts", "--client-id", client_id, "--group", "ghosts", "--timeout", "1")
        assert first.returncode == 0 and first.stdout == "", (first.stdout, first.stderr)

        def event(event_id: str, seq: int, kind: str, replayed: bool = False) -> str:
            return json.dumps({"schema_version": 1, "type": kind, "event_id": event_id, "seq": seq, "node": "ghost",
                               "source": "fan", "start": "2026-01-01T00:00:00.000Z", "end": None,
                               "window_start": f"2026-01-01T00:00:0{seq}.000Z", "score": 9.5, "top_score": 9.5,
                               "threshold": 1.25, "windows_over": 2, "model": "m", "bank": "b", "replayed": replayed})

        # while the consumer is away: an event twice (a replay), a malformed one, and more
        rig.publish(ghost, event("e-1", 0, "new"))
        rig.publish(ghost, event("e-1", 0, "new", replayed=True))
        rig.publish(ghost, b"{broken")
        rig.publish(ghost, json.dumps({"event_id": "e-x", "seq": "zero", "type": "new"}))
        rig.publish(ghost, event("e-1", 1, "end", replayed=True))
        rig.publish(ghost, event("e-2", 0, "new"))

        second = rig.cli("alerts", "--client-id", client_id, "--group", "ghosts", "--count", "3", "--timeout", "20")
        assert second.returncode == 0, second.stderr
        lines = second.stdout.splitlines()
        matches = [LINE.match(line) for line in lines]
        assert all(matches), lines
        assert [(m.group(5), int(m.group(6))) for m in matches if m] == [("e-1", 0), ("e-1", 1), ("e-2", 0)], lines
        assert lines[0] == "2026-01-01T00:00:00.000Z ghost/fan new e-1 seq=0 score=9.5 threshold=1.25"
        assert lines[1].endswith(" replayed") and not lines[2].endswith(" replayed")
        warnings = [w for w in second.stderr.splitlines() if "malformed alert" in w]
        assert len(warnings) == 2 and all(ghost in w for w in warnings), second.stderr
        assert "seq" in warnings[1]

        # nothing more for the group: --count not reached within --timeout is exit 1
        short = rig.cli("alerts", "--client-id", client_id, "--group", "ghosts", "--count", "1", "--timeout", "1")
        assert short.returncode == 1 and short.stdout == "" and "0 of 1" in short.stderr
    finally:
        rig.publish(f"{PREFIX}/ghost/state", b"", retain=True)


def test_alerts_follows_until_sigterm_or_sigint_and_exits_0(rig: Rig) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "fleet", "alerts", "--host", "127.0.0.1",
                                 "--port", str(rig.port), "--client-id", f"fleet-test-signal-{sig}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            first = proc.stdout.readline() if proc.stdout else ""  # it follows: line-c's alerts arrive
            assert LINE.match(first.rstrip("\n")), first
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
