"""Trial and commit of pushed configs on a real broker: a push that does not run healthy goes back by itself
(live, or by restarting), one that does is committed to the config file; a config file that cannot start
falls back to the last one that ran."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from .agent_helpers import (
    BASE,
    REPO,
    Mosquitto,
    Watcher,
    agent_command,
    free_port,
    start_agent,
    stop_agent,
    wait_for_log,
    write_anomaly_wav,
    write_config,
)

TRIAL = "control: {trial_seconds: 2}"


def _results(watcher: Watcher) -> list[dict[str, Any]]:
    return watcher.on(f"{BASE}/config/result")


def _scores(watcher: Watcher) -> list[dict[str, Any]]:
    return watcher.on(f"{BASE}/fan/score")


def _running(tmp_path: Path, toy_model: Path, bank_dir: Path, broker: Mosquitto, watcher: Watcher) -> tuple[
        Path, Path, subprocess.Popen[bytes]]:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n", extra=TRIAL)
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    watcher.wait_for(lambda m: len(_scores(watcher)) >= 3, what="scores from the running agent")
    return cfg, log, proc


def _push(watcher: Watcher, request_id: str, doc: dict[str, Any]) -> float:
    watcher.publish(f"{BASE}/config/set", json.dumps({"id": request_id, "config": doc}))
    return time.monotonic()


def _answer(watcher: Watcher, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
    watcher.wait_for(lambda m: any(r.get("request_id") == request_id for r in _results(watcher)), timeout=timeout,
                     what=f"the answer to {request_id}")
    return next(r for r in _results(watcher) if r.get("request_id") == request_id)


def test_a_push_that_breaks_a_source_is_rolled_back_live(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                         broker: Mosquitto, watcher: Watcher,
                                                         validators: dict) -> None:
    cfg, log, proc = _running(tmp_path, toy_model, bank_dir, broker, watcher)
    original = cfg.read_text()
    (tmp_path / "not-audio.wav").write_text("this is not a WAV file\n")
    try:
        doc = yaml.safe_load(original)
        doc["sources"][0]["path"] = str(tmp_path / "not-audio.wav")
        pushed = _push(watcher, "breaks-fan", doc)
        result = _answer(watcher, "breaks-fan")
        took = time.monotonic() - pushed
        validators["config_result"].validate(result)
        assert result["ok"] is False and result["phase"] == "rolled_back", result
        assert result["error"]["message"].startswith("rolled back: source fan is failed"), result
        assert 2.0 <= took < 10.0, took  # trial_seconds 2: rolled back at the deadline, not before
        assert cfg.read_text() == original and proc.poll() is None
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores again after the rollback")
        watcher.wait_for(lambda m: any(s["config"]["last_rollback"] for s in watcher.on(f"{BASE}/state")),
                         what="the rollback in the retained state")
        states = [s for s in watcher.on(f"{BASE}/state") if s["config"]["last_rollback"]]
        assert states[-1]["config"]["last_rollback"]["request_id"] == "breaks-fan"
        validators["state"].validate(states[-1])
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    assert "event=config_rolled_back" in log.read_text()
    print(f"\nlive rollback answered {took:.2f} s after the push (trial_seconds 2)")


def test_a_restart_section_is_tried_by_restarting_and_committed(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                               broker: Mosquitto, watcher: Watcher,
                                                               validators: dict) -> None:
    cfg, log, proc = _running(tmp_path, toy_model, bank_dir, broker, watcher)
    try:
        doc = yaml.safe_load(cfg.read_text())
        doc["queue_windows"] = 16  # applies at a start only
        _push(watcher, "smaller-queue", doc)
        result = _answer(watcher, "smaller-queue")
        validators["config_result"].validate(result)
        assert result["ok"] is True and result["phase"] == "committed" and result["persisted"] is True, result
        assert result["restart_required"] == ["queue_windows"]
        assert yaml.safe_load(cfg.read_text())["queue_windows"] == 16
        assert Path(f"{cfg}.last-good").read_text() == cfg.read_text()
        assert not Path(f"{cfg}.trial").exists()
        assert proc.poll() is None  # the same process, re-executed in place
        assert "restarting" in watcher.on(f"{BASE}/status")
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores after the restart")
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "event=reexec" in text and "event=config_committed" in text


def test_a_push_that_loses_the_broker_comes_back_by_itself(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                           broker: Mosquitto, watcher: Watcher,
                                                           validators: dict) -> None:
    cfg, log, proc = _running(tmp_path, toy_model, bank_dir, broker, watcher)
    original = cfg.read_text()
    try:
        doc = yaml.safe_load(original)
        doc["mqtt"]["port"] = free_port()  # nothing listens there: the node would be unreachable for good
        pushed = _push(watcher, "wrong-port", doc)
        result = _answer(watcher, "wrong-port")
        took = time.monotonic() - pushed
        validators["config_result"].validate(result)
        assert result["ok"] is False and result["phase"] == "rolled_back", result
        assert "the broker connection is not up" in result["error"]["message"], result
        assert cfg.read_text() == original and not Path(f"{cfg}.trial").exists()
        assert proc.poll() is None
        watcher.wait_for(lambda m: any(s["config"]["last_rollback"] for s in watcher.on(f"{BASE}/state")),
                         what="the rollback in the retained state")
        states = [s for s in watcher.on(f"{BASE}/state") if s["config"]["last_rollback"]]
        assert states[-1]["config"]["last_rollback"]["request_id"] == "wrong-port"
        validators["state"].validate(states[-1])
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores after coming back")
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    print(f"\nrestart rollback answered {took:.2f} s after the push (trial_seconds 2)")


def test_a_config_file_that_cannot_start_falls_back_to_the_last_good_one(tmp_path: Path, toy_model: Path,
                                                                        bank_dir: Path, broker: Mosquitto,
                                                                        watcher: Watcher) -> None:
    cfg, log, proc = _running(tmp_path, toy_model, bank_dir, broker, watcher)
    last_good = Path(f"{cfg}.last-good")
    try:
        wait_for_log(log, lambda text: last_good.exists(), what="the config remembered as last-known-good")
    finally:
        assert stop_agent(proc, log) == 0
    good = cfg.read_text()
    cfg.write_text(good.replace(str(bank_dir), str(tmp_path / "no-such-bank")))
    proc = start_agent(cfg, log)
    try:
        watcher.wait_for(lambda m: any(s["config"]["origin"] == "last_good" for s in watcher.on(f"{BASE}/state")),
                         what="a state saying the agent runs on the last-known-good config")
        state = [s for s in watcher.on(f"{BASE}/state") if s["config"]["origin"] == "last_good"][-1]
        assert "no-such-bank" in state["config"]["problem"]
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores on the last-known-good config")
    finally:
        assert stop_agent(proc, log) == 0
    assert "event=config_file_unusable" in log.read_text()
    # without a last-known-good copy, a config that cannot start is one line and exit 2 (systemd does not retry)
    last_good.unlink()
    result = subprocess.run(agent_command(cfg), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "sources[0].bank" in result.stderr and "Traceback" not in result.stderr
