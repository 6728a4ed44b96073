"""Hostile control messages against a live agent on a real broker: every one is answered, none is applied,
and the agent keeps running and scoring windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .agent_helpers import (
    BASE,
    Mosquitto,
    Watcher,
    start_agent,
    stop_agent,
    write_anomaly_wav,
    write_config,
)


def _scores(watcher: Watcher) -> list[dict[str, Any]]:
    return watcher.on(f"{BASE}/fan/score")


def _push(watcher: Watcher, payload: str | bytes) -> dict[str, Any]:
    n = len(watcher.on(f"{BASE}/config/result"))
    watcher.publish(f"{BASE}/config/set", payload)
    watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/config/result")) > n, what="a config result")
    return watcher.on(f"{BASE}/config/result")[n]


def _command(watcher: Watcher, name: str, payload: str | bytes) -> dict[str, Any]:
    n = len(watcher.on(f"{BASE}/cmd/result"))
    watcher.publish(f"{BASE}/cmd/{name}", payload)
    watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/cmd/result")) > n, what=f"an answer to cmd/{name}")
    return watcher.on(f"{BASE}/cmd/result")[n]


# 45 aliases, well under the alias limit, that expand to 9**6 values (a "billion laughs" in small)
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(5))


def test_hostile_pushes_and_commands_are_answered_and_change_nothing(
        tmp_path: Path, toy_model: Path, bank_dir: Path, broker: Mosquitto, watcher: Watcher,
        validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n")
    original = cfg.read_text()
    doc = yaml.safe_load(original)
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)

    def variant(change: Any) -> dict[str, Any]:
        d = json.loads(json.dumps(doc, default=str))
        change(d)
        return d

    try:
        watcher.wait_for(lambda m: len(_scores(watcher)) >= 3, what="scores from the running agent")
        pushes: list[tuple[str | bytes, str, str]] = [
            # (payload, the error path, a word of the message)
            ("[" * 100_000 + "]" * 100_000, "line 1", "nests deeper"),
            ("a: " + "[" * 5000 + "]" * 5000, "line 1", "nests deeper"),
            (ALIAS_BOMB, "", "more than"),
            ("node: a\nnode: b\n", "line 2", "given twice"),
            (b"node: \xff\xfe", "(message)", "UTF-8"),
            ("x" * 300_000, "(message)", "limit"),
            ("# " + "c" * 10_000_000 + "\nnode: n\n", "(message)", "limit"),
            (json.dumps({"id": "speed", "config": variant(lambda d: d["sources"][0].update(speed=10**400))}),
             "sources[0].speed", "finite"),
            (json.dumps({"id": "inf", "config": variant(lambda d: d["sources"][0].update(threshold=1e999))}),
             "sources[0].threshold", "number"),
            (yaml.safe_dump(variant(lambda d: d["sources"][0].update(threshold=float("inf")))),
             "sources[0].threshold", "finite"),
            (yaml.safe_dump(variant(lambda d: d["sources"][0].update(threshold=-1.0))),
             "sources[0].threshold", "every window"),
            (yaml.safe_dump(variant(lambda d: d["sources"][0].update(scoring={"k_n": 10**9}))),
             "sources[0].scoring.k_n", "<="),
            (yaml.safe_dump(variant(lambda d: d["sources"][0].update(scoring={"candidates": 10**12}))),
             "sources[0].scoring.candidates", "<="),
            (yaml.safe_dump(variant(lambda d: d.update(sources=[{**d["sources"][0], "name": f"s{i}"}
                                                                   for i in range(50)]))),
             "sources", "at most"),
            (yaml.safe_dump(variant(lambda d: d["sources"][0].update(path="/etc/passwd"))),
             "sources[0].path", "only name files under"),
            (yaml.safe_dump(variant(lambda d: d["mqtt"].update(password_file="/etc/hostname", username="u"))),
             "mqtt.password_file", "only name files under"),
            (yaml.safe_dump(variant(lambda d: d.update(control={"max_config_bytes": 10**7}))),
             "control", "local config file only"),
            (yaml.safe_dump(variant(lambda d: d["mqtt"].update(password=12345, username="u"))),
             "mqtt.password", "string"),
        ]
        for payload, path, word in pushes:
            result = _push(watcher, payload)
            validators["config_result"].validate(result)
            assert result["ok"] is False, (payload[:80], result)
            assert result["error"]["path"].startswith(path), (str(payload)[:80], result)
            assert word in result["error"]["message"], result
            assert len(json.dumps(result)) < 2000, "an answer repeats at most a short piece of the payload"
            assert "12345" not in json.dumps(result), "a secret is never repeated"
        assert _push(watcher, json.dumps({"id": "speed", "config": variant(
            lambda d: d["sources"][0].update(speed=10**400))}))["request_id"] == "speed"

        commands: list[tuple[str, str | bytes, str]] = [
            ("enroll", json.dumps({"id": "e1", "source": ["fan"]}), "source"),
            ("enroll", json.dumps({"id": "e2", "source": {}}), "source"),
            ("enroll", json.dumps({"id": "e3", "windows": 10**400}), "windows"),
            ("enroll", json.dumps({"id": "e4", "windows": "many"}), "windows"),
            ("enroll", json.dumps({"id": "e5", "colour": "red"}), "colour"),
            ("enroll", json.dumps({"id": "e6", "cancel": True}), "source"),
            ("status", "[" * 50_000 + "]" * 50_000, "(message)"),
            ("status", json.dumps({"id": {"nested": [[[[]]]]}}), "id"),
            ("status", "x" * 100_000, "(message)"),
            ("status", b"\xff\xfe{", "(message)"),
            ("status", "NaN", "(message)"),
            ("reload", json.dumps([1, 2, 3]), "(top level)"),
            ("explode", "{}", "(command)"),
        ]
        for name, payload, path in commands:
            result = _command(watcher, name, payload)
            validators["cmd_result"].validate(result)
            assert result["ok"] is False and result["command"] == name, result
            assert result["error"].startswith(path), result
            assert len(json.dumps(result)) < 2000
        assert _command(watcher, "enroll", json.dumps({"id": "e1", "source": ["fan"]}))["request_id"] == "e1"

        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores after the hostile messages")
        assert proc.poll() is None
        assert cfg.read_text() == original, "nothing refused may reach the config file"
        status = _command(watcher, "status", json.dumps({"id": "after"}))
        assert status["ok"] is True and status["request_id"] == "after"
        validators["state"].validate(status["result"])
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "event=control_failed" not in text
