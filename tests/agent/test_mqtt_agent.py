"""End to end over a real mosquitto: alerts, schemas, broker outages, restarts, SIGTERM."""

from __future__ import annotations

from pathlib import Path

from .agent_helpers import (
    BASE,
    Mosquitto,
    Watcher,
    alerts,
    check_episodes_complete_and_ordered,
    start_agent,
    stop_agent,
    wait_for_log,
    write_anomaly_wav,
    write_config,
)


def _alerts_after(log_text: str, marker: str) -> int:
    """Alert events logged after the last line containing `marker` (0 if there is none)."""
    lines = log_text.splitlines()
    last = max((i for i, line in enumerate(lines) if marker in line), default=None)
    return 0 if last is None else sum("event=alert " in line for line in lines[last + 1:])


def test_file_source_alert_episode_on_broker_matches_schemas(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                             broker: Mosquitto, watcher: Watcher,
                                                             validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 20, (8, 13))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=False, loop=False,
                       extra_source="    publish_scores: true", mqtt_extra="  spool_scores: true")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    assert proc.wait(60) == 0, log.read_text()
    watcher.wait_for(lambda m: any(t == f"{BASE}/status" and p == "stopped" for t, p, _ in m), what="stopped")
    events = alerts(watcher)
    assert events[0]["type"] == "new" and events[-1]["type"] == "end"
    assert {e["event_id"] for e in events} == {events[0]["event_id"]}
    assert events[-1]["reason"] == "cleared"
    for e in events:
        validators["alert"].validate(e)
    # the anomaly spans seconds 8-13 of the file: the episode starts at the window at 8 s
    scores = watcher.on(f"{BASE}/fan/score")
    assert len(scores) == 20
    for s in scores:
        validators["score"].validate(s)
    assert scores[8]["window_start"] == events[0]["start"]
    assert [s["over"] for s in scores] == [8 <= i < 13 for i in range(20)]
    assert events[-1]["end"] == scores[13]["window_start"]
    states = watcher.on(f"{BASE}/state")
    assert states, "no retained state published"
    for state in states:
        validators["state"].validate(state)
    assert states[-1]["status"] == "stopped"
    assert states[0]["sources"][0]["bank"]["id"] == events[0]["bank"]
    statuses = watcher.on(f"{BASE}/status")
    assert statuses[0] == "online" and statuses[-1] == "stopped"


def test_broker_outage_and_agent_restart_lose_no_alert(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                       broker: Mosquitto, validators: dict) -> None:
    # 10 s of audio with an anomaly from 4 to 7 s, looped at 10x: one episode per second of wall time.
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 7))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10)
    log = tmp_path / "agent.log"
    watcher = Watcher(broker.port, f"{BASE}/#", durable=True)
    proc = start_agent(cfg, log)
    try:
        watcher.wait_for(lambda m: any(p["type"] == "end" for p in alerts(watcher)), what="a first episode")
        broker.stop()  # the agent keeps detecting while the broker is gone
        wait_for_log(log, lambda text: _alerts_after(text, "event=mqtt_disconnected") >= 2,
                     what="alerts detected while the broker is down")
        broker.start()
        watcher.wait_for(lambda m: any(p["replayed"] for p in alerts(watcher)), what="replayed alerts")
        # the agent is stopped and started again while the broker is down
        broker.stop()
        wait_for_log(log, lambda text: _alerts_after(text, "event=mqtt_disconnected") >= 2,
                     what="alerts detected while the broker is down again")
        assert stop_agent(proc, log) == 0, log.read_text()
        spool = tmp_path / "state" / "spool" / "messages.log"
        assert spool.exists() and spool.stat().st_size > 0, "nothing was spooled while the broker was down"
        before_restart = len(alerts(watcher))
        proc = start_agent(cfg, log)
        wait_for_log(log, lambda text: _alerts_after(text, "event=started") >= 2,
                     what="alerts detected by the restarted agent before the broker is back")
        broker.start()
        watcher.wait_for(lambda m: sum(1 for p in alerts(watcher)[before_restart:] if p["replayed"]) >= 3,
                         what="alerts spooled across the agent restart")
        assert stop_agent(proc, log) == 0, log.read_text()
        watcher.wait_for(lambda m: m[-1][0] == f"{BASE}/status" and m[-1][1] == "stopped", what="stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    events = alerts(watcher)
    for e in events:
        validators["alert"].validate(e)
    # `online` is re-sent on every connect: start, after the broker restart, after the agent restart
    assert watcher.on(f"{BASE}/status").count("online") >= 3
    episodes = check_episodes_complete_and_ordered(events)
    text = log.read_text()
    logged = [line.split("event_id=")[1].split()[0] for line in text.splitlines() if "event=alert" in line]
    assert set(episodes) == set(logged), "an episode the agent logged never reached the broker"
    assert len({(e["event_id"], e["seq"]) for e in events}) == len(logged)
    assert "spool_full" not in text
