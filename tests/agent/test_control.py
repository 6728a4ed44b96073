"""Control over MQTT: config push (refused / applied / persisted), commands (enroll, status, reload), SIGTERM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import yaml

from edge_agent.audio.wavio import write_wav
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.scorer import LAYER_HINT

from .agent_helpers import BASE, Mosquitto, Watcher, noise, start_agent, stop_agent, write_anomaly_wav, write_config

MISSING_LAYER = ("not in the bank (it has layer_1, layer_2, the outputs of the export it was enrolled from; "
                 f"{LAYER_HINT})")


def _scores(watcher: Watcher) -> list[dict]:
    return watcher.on(f"{BASE}/fan/score")


def _running_agent(tmp_path: Path, toy_model: Path, bank_dir: Path, broker: Mosquitto, wav: Path,
                   watcher: Watcher, extra_source: str = "") -> tuple[Path, Path, subprocess.Popen[bytes]]:
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n" + extra_source)
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    watcher.wait_for(lambda m: len(_scores(watcher)) >= 3, what="scores from the running agent")
    return cfg, log, proc


def test_config_push_refused_then_applied_and_persisted(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                        broker: Mosquitto, watcher: Watcher,
                                                        validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher)
    try:
        original = cfg.read_text()
        calibrated = _scores(watcher)[-1]["threshold"]
        doc = yaml.safe_load(original)
        doc["sources"][0]["hop_seconds"] = -1
        watcher.publish(f"{BASE}/config/set", yaml.safe_dump(doc))
        watcher.wait_for(lambda m: watcher.on(f"{BASE}/config/result"), what="config result")
        refused = watcher.on(f"{BASE}/config/result")[0]
        validators["config_result"].validate(refused)
        assert refused["ok"] is False
        assert refused["error"]["path"] == "sources[0].hop_seconds"
        assert refused["error"]["value"] == -1
        assert cfg.read_text() == original, "a refused config must not touch the file"
        # the old config keeps running
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores after the refused push")
        assert proc.poll() is None
        assert _scores(watcher)[-1]["threshold"] == calibrated

        doc["sources"][0]["hop_seconds"] = 1
        doc["sources"][0]["threshold"] = 1000.0
        watcher.publish(f"{BASE}/config/set", json.dumps({"id": "push-2", "config": doc}))
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/config/result")) >= 2, what="second result")
        accepted = watcher.on(f"{BASE}/config/result")[1]
        validators["config_result"].validate(accepted)
        assert accepted["ok"] is True and accepted["request_id"] == "push-2" and accepted["persisted"] is True
        watcher.wait_for(lambda m: _scores(watcher)[-1]["threshold"] == 1000.0, what="the new threshold in use")
        assert yaml.safe_load(cfg.read_text())["sources"][0]["threshold"] == 1000.0
        states = [s for s in watcher.on(f"{BASE}/state") if s["config_hash"] == accepted["config_hash"]]
        assert states and states[-1]["sources"][0]["threshold_origin"] == "config"
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()


def test_enroll_over_mqtt_rebuilds_target_bank_and_lowers_target_scores(
        tmp_path: Path, toy_model: Path, bank_dir: Path, broker: Mosquitto, watcher: Watcher,
        validators: dict) -> None:
    wav = tmp_path / "target_domain.wav"
    write_wav(wav, noise(10, 0.15, seed=11), 8000)  # louder than the bank's source domain
    _, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher,
                                  extra_source="    enroll: {memmixup: true, memmixup_k: 2}")
    try:
        assert MemoryBank.load(bank_dir).count_raw("target") == 0
        before = [s["score"] for s in _scores(watcher)]
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "enroll-1", "source": "fan", "windows": 6}))
        watcher.wait_for(lambda m: watcher.on(f"{BASE}/cmd/result"), timeout=60, what="enroll result")
        result = watcher.on(f"{BASE}/cmd/result")[0]
        validators["cmd_result"].validate(result)
        assert result["ok"] is True, result
        assert result["request_id"] == "enroll-1" and result["result"]["target_windows"] == 6
        bank = MemoryBank.load(bank_dir)
        assert bank.count_raw("target") == 6 and bank.threshold is not None
        assert bank.mixup is not None and bank.count("target") == 6 * 3  # raw refs + 2 mixes each
        assert result["result"]["bank"] == bank.content_hash()[:12]
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 5, what="scores after enroll")
        after = [s for s in _scores(watcher)[n:] if s["bank"] == result["result"]["bank"]]
        assert len(after) >= 3
        assert np.median([s["score"] for s in after]) < 0.2 * np.median(before)
        assert all(not s["over"] for s in after)
        watcher.publish(f"{BASE}/cmd/status", json.dumps({"id": "st"}))
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/cmd/result")) >= 2, what="status result")
        status = watcher.on(f"{BASE}/cmd/result")[1]
        validators["cmd_result"].validate(status)
        validators["state"].validate(status["result"])
        assert status["result"]["sources"][0]["bank"]["counts"]["target"] == 6
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()


def test_unknown_command_and_reload_answer_on_cmd_result(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                          broker: Mosquitto, watcher: Watcher,
                                                          validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher)
    try:
        watcher.publish(f"{BASE}/cmd/explode", "{}")
        doc = yaml.safe_load(cfg.read_text())
        doc["sources"][0]["threshold"] = 500.0
        cfg.write_text(yaml.safe_dump(doc))
        watcher.publish(f"{BASE}/cmd/reload", json.dumps({"id": "r1"}))
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/cmd/result")) >= 2, what="two results")
        unknown, reload = watcher.on(f"{BASE}/cmd/result")[:2]
        for r in (unknown, reload):
            validators["cmd_result"].validate(r)
        assert unknown["ok"] is False and "explode" in unknown["error"]
        assert reload["ok"] is True and reload["request_id"] == "r1"
        watcher.wait_for(lambda m: _scores(watcher)[-1]["threshold"] == 500.0, what="reloaded threshold")
        doc["sources"][0]["window_seconds"] = "long"
        cfg.write_text(yaml.safe_dump(doc))
        watcher.publish(f"{BASE}/cmd/reload", json.dumps({"id": "r2"}))
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/cmd/result")) >= 3, what="refused reload")
        refused = watcher.on(f"{BASE}/cmd/result")[2]
        validators["cmd_result"].validate(refused)
        assert refused["ok"] is False and "sources[0].window_seconds" in refused["error"]
        n = len(_scores(watcher))
        watcher.wait_for(lambda m: len(_scores(watcher)) >= n + 3, what="scores after the refused reload")
        assert _scores(watcher)[-1]["threshold"] == 500.0
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()


def test_sigterm_publishes_retained_stopped_and_exits_cleanly(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                              broker: Mosquitto, watcher: Watcher,
                                                              validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    _, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher)
    assert stop_agent(proc, log) == 0, log.read_text()
    late = Watcher(broker.port, f"{BASE}/#")  # a new subscriber sees only retained messages
    try:
        got = late.wait_for(lambda m: {t for t, _, _ in m} >= {f"{BASE}/status", f"{BASE}/state"},
                            what="retained status and state")
        retained = {t: p for t, p, r in got if r}
        assert retained[f"{BASE}/status"] == "stopped"
        validators["state"].validate(retained[f"{BASE}/state"])
        assert retained[f"{BASE}/state"]["status"] == "stopped"
    finally:
        late.close()
    assert "event=stopped status=stopped" in log.read_text()


def test_home_assistant_discovery_follows_the_sources(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                      broker: Mosquitto, watcher: Watcher) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true", mqtt_extra="  homeassistant: true")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    fan = "homeassistant/binary_sensor/node-a_fan/anomaly/config"
    pump = "homeassistant/binary_sensor/node-a_pump/anomaly/config"
    try:
        fan_score = "homeassistant/sensor/node-a_fan/score/config"
        watcher.wait_for(lambda m: watcher.on(fan) and watcher.on(fan_score), what="discovery for fan")
        config = watcher.on(fan)[-1]
        assert config["state_topic"] == f"{BASE}/fan/alert" and config["device_class"] == "problem"
        assert config["availability"][0]["topic"] == f"{BASE}/status"
        score = watcher.on(fan_score)[-1]
        assert score["state_topic"] == f"{BASE}/fan/score"
        doc = yaml.safe_load(cfg.read_text())
        doc["sources"].append({**doc["sources"][0], "name": "pump", "publish_scores": False})
        watcher.publish(f"{BASE}/config/set", yaml.safe_dump(doc))
        watcher.wait_for(lambda m: watcher.on(pump), what="discovery for the added source")
        doc["sources"].pop()
        watcher.publish(f"{BASE}/config/set", yaml.safe_dump(doc))
        watcher.wait_for(lambda m: watcher.on(pump)[-1] == "", what="discovery cleared for the removed source")
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/config/result")) == 2, what="two config results")
        assert [r["ok"] for r in watcher.on(f"{BASE}/config/result")] == [True, True]
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()


def test_bad_scoring_keys_are_answered_with_path_message_and_value(tmp_path: Path, toy_model: Path,
                                                                   bank_dir: Path, broker: Mosquitto,
                                                                   watcher: Watcher, validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher)
    expected = [
        ({"k_n": 0}, {"path": "sources[0].scoring.k_n", "message": "must be an integer >= 1", "value": 0}),
        ({"normalizer": "magic"}, {"path": "sources[0].scoring.normalizer",
                                   "message": "must be one of none, zscore-test, zscore-domain, ld, ld-domain",
                                   "value": "magic"}),
        ({"layers": ["layer_9"]}, {"path": "sources[0].scoring.layers",
                                   "message": MISSING_LAYER, "value": "layer_9"}),
    ]
    try:
        original = cfg.read_text()
        for i, (scoring, error) in enumerate(expected):
            doc = yaml.safe_load(original)
            doc["sources"][0]["scoring"] = scoring
            watcher.publish(f"{BASE}/config/set", json.dumps({"id": f"bad-{i}", "config": doc}))
            watcher.wait_for(lambda m, n=i + 1: len(watcher.on(f"{BASE}/config/result")) >= n,
                             what=f"config result {i}")
            result = watcher.on(f"{BASE}/config/result")[i]
            validators["config_result"].validate(result)
            assert result["ok"] is False and result["request_id"] == f"bad-{i}"
            assert result["error"] == error
        assert cfg.read_text() == original and proc.poll() is None
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()


def test_every_enroll_is_answered_however_it_ends(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                  broker: Mosquitto, watcher: Watcher, validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg, log, proc = _running_agent(tmp_path, toy_model, bank_dir, broker, wav, watcher)
    results = f"{BASE}/cmd/result"

    def answer(request_id: str) -> dict:
        watcher.wait_for(lambda m: any(r.get("request_id") == request_id for r in watcher.on(results)),
                         what=f"the answer to {request_id}")
        found = [r for r in watcher.on(results) if r.get("request_id") == request_id][-1]
        validators["cmd_result"].validate(found)
        return found

    try:
        # cancelled: both the cancel and the enroll it cancels are answered
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "long", "windows": 10000}))
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "stop-it", "cancel": True}))
        cancel = answer("stop-it")
        assert cancel["ok"] is True and cancel["result"]["cancelled"] == "long", cancel
        cancelled = answer("long")
        assert cancelled["ok"] is False and "cancelled" in cancelled["error"]
        # its source removed by a push: answered when the push applies
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "orphan", "windows": 10000}))
        doc = yaml.safe_load(cfg.read_text())
        doc["sources"][0]["name"] = "pump"  # the source `fan` is gone
        watcher.publish(f"{BASE}/config/set", json.dumps({"id": "rename", "config": doc}))
        orphan = answer("orphan")
        assert orphan["ok"] is False and "removed" in orphan["error"], orphan
        # the agent stopping before an enroll has its windows
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "at-shutdown", "source": "pump", "windows": 10000}))
        watcher.wait_for(lambda m: any("enroll_started" in line and "at-shutdown" in line
                                       for line in log.read_text().splitlines()), what="the enroll started")
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    stopped = answer("at-shutdown")
    assert stopped["ok"] is False and "stopping" in stopped["error"], stopped
