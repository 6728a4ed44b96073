"""Generated control messages (hypothesis) against a live agent on a real broker: valid-looking pushes with
one value changed, hostile JSON and YAML, raw bytes, and commands. The agent must answer every message, stay
up, and keep scoring windows. Bounded in count (FUZZ_MESSAGES) so that CI stays short."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .agent_helpers import (
    BASE,
    Mosquitto,
    Watcher,
    build_bank,
    start_agent,
    stop_agent,
    write_anomaly_wav,
    write_config,
    write_power_model,
)

FUZZ_MESSAGES = int(os.environ.get("EDGE_ASD_FUZZ_MESSAGES", "200"))
ANSWER_SECONDS = 60.0


@dataclass
class LiveAgent:
    proc: subprocess.Popen[bytes]
    watcher: Watcher
    log: Path
    config: dict[str, Any]
    sent: int = 0
    answered: int = 0
    repeats: int = 0  # desired payloads sent again: not answered again, by design
    kinds: dict[str, int] = field(default_factory=dict)
    desired_payloads: set[bytes] = field(default_factory=set)  # a refused document is answered once per payload


@pytest.fixture(scope="module")
def live_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = write_power_model(tmp / "power16.onnx")
    build_bank(model, tmp / "bank")
    broker = Mosquitto(tmp)
    broker.start()
    wav = write_anomaly_wav(tmp / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp, model, tmp / "bank", broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n", extra="control: {trial_seconds: 2}")
    watcher = Watcher(broker.port, f"{BASE}/#")
    log = tmp / "agent.log"
    proc = start_agent(cfg, log)
    watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/fan/score")) >= 3, what="scores from the agent")
    agent = LiveAgent(proc, watcher, log, yaml.safe_load(cfg.read_text()))
    yield agent
    try:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    finally:
        watcher.close()
        broker.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, -1, 10**400, 2**63]) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40) | st.sampled_from(["", "/etc/passwd", "../../x", "*a", "&a x", "\x00", "é" * 5000]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)

# Keys of the running config whose values a push replaces (a value of any type, in or out of range).
MUTABLE = [("sources", 0, "threshold"), ("sources", 0, "hop_seconds"), ("sources", 0, "window_seconds"),
           ("sources", 0, "speed"), ("sources", 0, "scoring"), ("sources", 0, "hysteresis"),
           ("sources", 0, "publish_scores"), ("sources", 0, "bank"), ("sources", 0, "path"), ("sources", 0, "colour"),
           ("model",), ("mqtt", "port"), ("spool",), ("logging",), ("control",), ("queue_windows",), ("sources",),
           ("metrics",)]
# (Renaming the node or a source is valid too, but moves the agent's topics away from where this test listens.)
# Keys of a desired document (docs/fleet.md) whose values are replaced; its version is always the next one,
# because an older version is ignored without an answer.
DESIRED_MUTABLE = [("config", "sources", "*", "threshold"), ("config", "sources", "*", "hysteresis"),
                   ("config", "sources", "fan", "bank"), ("config", "sources", "*", "audio_checks"),
                   ("config", "sources", "fan", "scoring"), ("config", "sources", "*", "device"),
                   ("config", "model"), ("config", "mqtt"), ("config", "sources"), ("config",), ("target",),
                   ("id",), ("signature",), ("extra",)]


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(topic suffix, payload, kind) of one control message."""
    kind = draw(st.sampled_from(["mutated_config", "json_config", "raw_config", "command", "raw_command",
                                 "mutated_desired", "json_desired", "raw_desired"]))
    if kind == "mutated_config":
        return "config/set", b"", kind  # filled in by the test from the running config
    if kind == "mutated_desired":
        return "config/desired", b"", kind  # filled in by the test: the next version, one value changed
    if kind == "json_desired":
        return "config/desired", json.dumps(draw(json_values)).encode(), kind
    if kind == "raw_desired":
        return "config/desired", draw(st.binary(max_size=600) | st.text(max_size=600).map(str.encode)), kind
    if kind == "json_config":
        payload = json.dumps({"id": draw(st.text(min_size=1, max_size=20)), "config": draw(json_values)})
        return "config/set", payload.encode(), kind
    if kind == "raw_config":
        return "config/set", draw(st.binary(max_size=600) | st.text(max_size=600).map(str.encode)), kind
    name = draw(st.sampled_from(["status", "enroll", "reload", "explode", "result2", "clip", "feedback", "learn",
                                 "rebuild"]))
    if kind == "command":
        keys = ["id", "source", "windows", "cancel", "x", "event_id", "label", "undo", "note", "minutes", "domain",
                "chunk_bytes"]
        args = draw(st.dictionaries(st.sampled_from(keys), json_values, max_size=4))
        return f"cmd/{name}", json.dumps(args).encode(), kind
    return f"cmd/{name}", draw(st.binary(max_size=300)), kind


@settings(max_examples=FUZZ_MESSAGES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(message=messages(), value=json_values, where=st.sampled_from(MUTABLE),
       desired_where=st.sampled_from(DESIRED_MUTABLE))
def test_fuzzed_control_messages_are_all_answered(live_agent: LiveAgent, message: tuple[str, bytes, str],
                                                  value: Any, where: tuple[Any, ...],
                                                  desired_where: tuple[Any, ...]) -> None:
    suffix, payload, kind = message
    version = 1000 + live_agent.sent  # above every version sent before
    if kind == "mutated_desired":
        doc: Any = {"version": version, "id": f"fuzz-{live_agent.sent}",
                    "config": {"sources": {"*": {"threshold": 2.0}, "fan": {}}}}
        target = doc
        for key in desired_where[:-1]:
            target = target[key]
        target[desired_where[-1]] = value
        payload = json.dumps(doc).encode()
    elif kind == "json_desired":
        doc = json.loads(payload)  # any JSON value; as a document's config when it is a mapping
        doc = {"version": version, "config": doc} if isinstance(doc, dict) else doc
        payload = json.dumps(doc).encode()
    elif kind == "raw_desired":
        payload += f" #{live_agent.sent}".encode()  # the same refused payload is answered once per process
    if kind == "mutated_config":
        doc = json.loads(json.dumps(live_agent.config))
        target = doc
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
        payload = json.dumps({"id": f"fuzz-{live_agent.sent}", "config": doc}).encode()
    watcher = live_agent.watcher
    answers = f"{BASE}/config/result" if suffix.startswith("config/") else f"{BASE}/cmd/result"
    before = len(watcher.on(answers))
    watcher.publish(f"{BASE}/{suffix}", payload)
    if suffix == "cmd/learn":  # a valid learn is answered when its minutes are recorded: cancel it at once
        watcher.publish(f"{BASE}/cmd/learn", json.dumps({"cancel": True}))
    live_agent.sent += 1
    live_agent.kinds[kind] = live_agent.kinds.get(kind, 0) + 1
    if suffix == "config/desired":
        repeated = payload in live_agent.desired_payloads
        live_agent.desired_payloads.add(payload)
        if repeated:  # the same document again (a retained one re-delivered at a reconnect, say): not re-answered
            live_agent.repeats += 1
            time.sleep(0.2)
            assert live_agent.proc.poll() is None, live_agent.log.read_text()[-3000:]
            return
    watcher.wait_for(lambda m: len(watcher.on(answers)) > before, timeout=ANSWER_SECONDS,
                     what=f"an answer to {suffix} {payload[:120]!r}")
    live_agent.answered += 1
    assert live_agent.proc.poll() is None, live_agent.log.read_text()[-3000:]


def test_after_the_fuzz_the_agent_still_scores(live_agent: LiveAgent) -> None:
    watcher = live_agent.watcher
    # Valid pushes among the fuzzed ones may have been committed (scores off, another threshold): push the
    # original config back, then the agent must score as before.
    results = f"{BASE}/config/result"
    watcher.publish(f"{BASE}/config/desired", json.dumps({"version": 10**9, "id": "empty-overlay", "config": {}}))
    watcher.wait_for(lambda m: any(r.get("request_id") == "empty-overlay" for r in watcher.on(results)),
                     timeout=ANSWER_SECONDS, what="an empty desired overlay")
    watcher.publish(f"{BASE}/config/set", json.dumps({"id": "restore", "config": live_agent.config}))
    watcher.wait_for(lambda m: any(r.get("request_id") == "restore" for r in watcher.on(results)),
                     timeout=ANSWER_SECONDS, what="the original config back")
    restored = [r for r in watcher.on(results) if r.get("request_id") == "restore"][-1]
    assert restored["ok"] is True, restored
    scores = f"{BASE}/fan/score"
    n = len(watcher.on(scores))
    watcher.wait_for(lambda m: len(watcher.on(scores)) >= n + 3, timeout=30, what="scores after the fuzzed messages")
    assert live_agent.proc.poll() is None
    assert live_agent.sent == live_agent.answered + live_agent.repeats
    text = live_agent.log.read_text()
    assert "Traceback" not in text and "event=control_failed" not in text
    print(f"\nfuzz: {live_agent.sent} messages ({live_agent.kinds}), {live_agent.answered} answered, "
          f"{live_agent.repeats} repeated desired payloads not re-answered, 0 crashes, agent alive and scoring")
