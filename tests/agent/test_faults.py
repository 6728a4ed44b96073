"""Fault injection on the data path, with a real mosquitto: crashes mid-episode (broker up and down), and what
every fault must leave behind: nothing lost, nothing out of order, every episode ended."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.config import parse_config
from edge_agent.agent.daemon import Agent
from edge_agent.audio.resample import resample
from edge_agent.audio.wavio import write_wav

from .agent_helpers import (
    BASE,
    RATE,
    REPO,
    Mosquitto,
    Watcher,
    agent_command,
    alerts,
    build_bank,
    check_episodes_complete_and_ordered,
    noise,
    start_agent,
    stop_agent,
    tmpfs,
    wait_for_log,
    write_anomaly_wav,
    write_config,
)


def episode_census(events: list[dict[str, Any]]) -> dict[str, int]:
    """Counts over the alert events a consumer received (de-duplicated by event_id and seq)."""
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for e in events:
        unique.setdefault((e["event_id"], e["seq"]), e)
    episodes: dict[str, list[dict[str, Any]]] = {}
    for (event_id, _), e in sorted(unique.items(), key=lambda item: (item[0][0], item[0][1])):
        episodes.setdefault(event_id, []).append(e)
    return {
        "episodes": len(episodes),
        "without_new": sum(1 for evs in episodes.values() if evs[0]["type"] != "new"),
        "without_end": sum(1 for evs in episodes.values() if evs[-1]["type"] != "end"),
        "ended_by_restart": sum(1 for evs in episodes.values() if evs[-1].get("reason") == "restarted"),
        # A kill between saving the open episode and sending the window's event can cost that one event (the
        # restart's `end` then skips its seq): allowed only in episodes the restart ended.
        "seq_gaps": sum(1 for evs in episodes.values() if evs[-1].get("reason") != "restarted"
                        and [e["seq"] for e in evs] != list(range(evs[-1]["seq"] + 1))),
        "seq_gaps_at_a_kill": sum(1 for evs in episodes.values() if evs[-1].get("reason") == "restarted"
                                  and [e["seq"] for e in evs] != list(range(evs[-1]["seq"] + 1))),
    }


def _open_episode(watcher: Watcher) -> bool:
    """The consumer has seen a `new` whose `end` has not arrived."""
    seen = alerts(watcher)
    ended = {e["event_id"] for e in seen if e["type"] == "end"}
    return any(e["type"] == "new" and e["event_id"] not in ended for e in seen)


def _restart_ends(watcher: Watcher) -> int:
    return len({e["event_id"] for e in alerts(watcher) if e["type"] == "end" and e.get("reason") == "restarted"})


def test_sigkill_mid_episode_leaves_no_episode_without_an_end(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                              broker: Mosquitto, validators: dict) -> None:
    # 10 s of audio, anomalous from 3 to 8 s, replayed at 10x: an episode of about half a second every second
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (3, 8))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10)
    log = tmp_path / "agent.log"
    watcher = Watcher(broker.port, f"{BASE}/#", durable=True)
    proc = start_agent(cfg, log)
    kills = 0
    try:
        for broker_down in (False, False, True, True):
            # the episode the previous kill left open has been ended by the restarted agent (and delivered)
            watcher.wait_for(lambda m, k=kills: _restart_ends(watcher) >= k, what="the end of the killed episode")
            watcher.wait_for(lambda m: _open_episode(watcher), what="an open episode")
            if broker_down:
                broker.stop()
                wait_for_log(log, lambda text: "event=mqtt_disconnected" in text.rsplit("event=started", 1)[-1],
                             what="the agent noticing the broker is gone")
                starts = log.read_text().count("event=alert type=new")
                wait_for_log(log, lambda text, n=starts: text.count("event=alert type=new") > n,
                             what="an episode opened while the broker is down")
            proc.kill()  # SIGKILL: no shutdown, no `end` for the open episode
            proc.wait(10)
            kills += 1
            proc = start_agent(cfg, log)
            if broker_down:
                wait_for_log(log, lambda text, k=kills: text.count("event=started") > k, what="the restarted agent")
                broker.start()
        watcher.wait_for(lambda m: _restart_ends(watcher) >= kills, what="the end of the last killed episode")
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
        watcher.wait_for(lambda m: m and m[-1][0] == f"{BASE}/status" and m[-1][1] == "stopped", what="stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    events = alerts(watcher)
    for e in events:
        validators["alert"].validate(e)
    census = episode_census(events)
    print(f"\nSIGKILL x{kills} mid-episode (2 with the broker down): {census}")
    assert census["without_end"] == 0 and census["without_new"] == 0 and census["seq_gaps"] == 0, census
    assert census["ended_by_restart"] >= kills, census


def test_broker_restart_loop_during_episodes_loses_nothing(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                          broker: Mosquitto, validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (3, 8))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10)
    log = tmp_path / "agent.log"
    watcher = Watcher(broker.port, f"{BASE}/#", durable=True)
    proc = start_agent(cfg, log)
    restarts = 5
    try:
        for i in range(restarts):
            watcher.wait_for(lambda m: _open_episode(watcher), what="an open episode")
            broker.stop()
            wait_for_log(log, lambda text, n=i: text.count("event=mqtt_disconnected") > n, what="the broker gone")
            alerts_before = log.read_text().count("event=alert ")
            wait_for_log(log, lambda text, n=alerts_before: text.count("event=alert ") >= n + 2,
                         what="alerts while the broker is down")
            broker.start()
            wait_for_log(log, lambda text, n=i: text.count("event=mqtt_connected") > n + 1, what="reconnected")
        watcher.wait_for(lambda m: not _open_episode(watcher), what="the last episode ended")
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
        watcher.wait_for(lambda m: m and m[-1][0] == f"{BASE}/status" and m[-1][1] == "stopped", what="stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    text = log.read_text()
    sent = {(line.split("event_id=")[1].split()[0], line.split("type=")[1].split()[0])
            for line in text.splitlines() if "event=alert " in line}
    received = alerts(watcher)
    for e in received:
        validators["alert"].validate(e)
    lost = sent - {(e["event_id"], e["type"]) for e in received}
    # Duplicates are allowed (at-least-once): mosquitto re-delivers to the durable consumer after its restart.
    duplicates = len(received) - len({(e["event_id"], e["seq"]) for e in received})
    census = episode_census(received)
    print(f"\nbroker restarted x{restarts} mid-episode: {len(sent)} alert events sent, {len(lost)} lost, "
          f"{duplicates} duplicates, {census}")
    assert not lost, sorted(lost)[:5]
    check_episodes_complete_and_ordered(received)  # every episode new..end, no seq gap, in order
    assert census["without_end"] == 0 and census["without_new"] == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (CI runs as root) to fill up."""
    with tmpfs(tmp_path / "tiny", "3m") as mount:
        yield mount


def _fill(directory: Path) -> None:
    """Write a filler file until the disk is full."""
    fd = os.open(directory / f"filler-{time.monotonic_ns()}", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_a_full_disk_holds_alerts_in_memory_and_loses_none(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                           broker: Mosquitto, watcher: Watcher, tiny_disk: Path,
                                                           validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (3, 8))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra=f"spool: {{dir: {tiny_disk / 'spool'}}}")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    try:
        watcher.wait_for(lambda m: len(alerts(watcher)) >= 3, what="alerts before the disk fills")
        _fill(tiny_disk)  # others fill the disk: the spool gives up its reserve, then holds alerts in memory
        wait_for_log(log, lambda text: "event=spool_reserve_released" in text, what="the reserve released")
        _fill(tiny_disk)
        failed = wait_for_log(log, lambda text: "event=spool_write_failed" in text, what="the first refused write")
        held_from = failed.count("event=alert ")
        wait_for_log(log, lambda text: text.count("event=alert ") >= held_from + 6, what="alerts held in memory")
        watcher.wait_for(lambda m: any(s.get("health") == "degraded" and "held in memory" in
                                       s.get("delivery_problem", "") for s in watcher.on(f"{BASE}/state")),
                         what="health degraded while alerts are held")
        for filler in tiny_disk.glob("filler-*"):
            filler.unlink()
        wait_for_log(log, lambda text: "event=spool_write_recovered" in text, what="the held alerts written")
        watcher.wait_for(lambda m: watcher.on(f"{BASE}/state")[-1].get("health") == "ok", what="health ok again")
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
        watcher.wait_for(lambda m: m and m[-1][0] == f"{BASE}/status" and m[-1][1] == "stopped", what="stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    sent = {(line.split("event_id=")[1].split()[0], line.split("type=")[1].split()[0])
            for line in text.splitlines() if "event=alert " in line}
    received = alerts(watcher)
    for e in received:
        validators["alert"].validate(e)
    got = {(e["event_id"], e["type"]) for e in received}
    census = episode_census(received)
    failures = text.count("event=spool_write_failed")
    print(f"\ndisk full: {len(sent)} alert events sent, {len(sent - got)} lost, {census}, "
          f"write failures logged {failures}x")
    assert sent <= got, f"lost: {sorted(sent - got)[:5]}"
    assert census["without_end"] == 0 and census["seq_gaps"] == 0
    assert failures == 1, "one log line per burst of failures"
    assert "event=spool_dropped" not in text


def test_a_full_spool_counts_every_drop_across_restarts_until_acknowledged(tmp_path: Path, toy_model: Path,
                                                                         bank_dir: Path, broker: Mosquitto,
                                                                         validators: dict) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (3, 8))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra="spool: {max_messages: 4}")
    log = tmp_path / "agent.log"
    watcher = Watcher(broker.port, f"{BASE}/#", durable=True)
    proc = start_agent(cfg, log)
    try:
        wait_for_log(log, lambda text: "event=mqtt_connected" in text, what="the agent connected")
        broker.stop()
        wait_for_log(log, lambda text: "event=spool_full" in text, what="the spool bound reached")
        time.sleep(1)  # a few more drops in the same burst
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
        broker.start()
        proc = start_agent(cfg, log)  # the count survives the restart and keeps the health degraded

        def degraded(m: list) -> bool:
            states = watcher.on(f"{BASE}/state")
            return bool(states) and states[-1].get("health") == "degraded" and \
                states[-1]["spool"]["unacknowledged_drops"] > 0 and "dropped" in states[-1].get("delivery_problem", "")
        watcher.wait_for(degraded, what="health degraded by the drops after the restart")
        dropped = watcher.on(f"{BASE}/state")[-1]["spool"]["dropped"]
        watcher.publish(f"{BASE}/cmd/acknowledge", json.dumps({"id": "ack-1", "what": "drops"}))
        watcher.wait_for(lambda m: any(r.get("request_id") == "ack-1" for r in watcher.on(f"{BASE}/cmd/result")),
                         what="the acknowledgement answered")
        watcher.wait_for(lambda m: watcher.on(f"{BASE}/state")[-1].get("health") == "ok", what="health ok again")
        assert watcher.on(f"{BASE}/state")[-1]["spool"]["dropped"] >= dropped, "the total stays counted"
        assert stop_agent(proc, log) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    text = log.read_text()
    answer = next(r for r in watcher.on(f"{BASE}/cmd/result") if r.get("request_id") == "ack-1")
    sent = {(line.split("event_id=")[1].split()[0], line.split("type=")[1].split()[0])
            for line in text.splitlines() if "event=alert " in line}
    received = alerts(watcher)
    for e in received:
        validators["alert"].validate(e)
    lost = sent - {(e["event_id"], e["type"]) for e in received}
    bursts = text.count("event=spool_full")
    print(f"\nspool bound: {len(sent)} alert events sent, {len(lost)} lost, {dropped} counted as dropped, "
          f"{bursts} spool_full line(s), acknowledged {answer['result']}, {episode_census(received)}")
    assert 0 < len(lost) <= dropped, "every lost alert is counted"
    assert answer["result"]["acknowledged_drops"] == dropped
    assert bursts == 1, "one line per burst of drops"


def _raw_wav(path: Path, payload: bytes, rate: int, channels: int = 1, bits: int = 16, code: int = 1,
             declared: int | None = None) -> Path:
    """A WAV file with the header given (it may lie about the rate, the channels or the length)."""
    block = channels * bits // 8
    size = len(payload) if declared is None else declared
    header = b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, code, channels, rate, rate * block, block, bits)
    path.write_bytes(header + b"data" + struct.pack("<I", size) + payload)
    return path


def test_broken_audio_is_reported_never_scored_and_a_folder_goes_on(tmp_path: Path, toy_model: Path,
                                                                   bank_dir: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    good = noise(3, 0.05, seed=5)
    bad_floats = {"a_nan": np.where(np.arange(good.size) % 97 == 0, np.nan, good),
                  "b_huge": good * 1e30}
    for name, audio in bad_floats.items():
        _raw_wav(folder / f"{name}.wav", audio.astype("<f4").tobytes(), RATE, bits=32, code=3)
    write_wav(folder / "c_silence.wav", np.zeros(3 * RATE, np.float32), RATE)
    write_wav(folder / "d_flat_line.wav", np.full(3 * RATE, 0.25, np.float32), RATE)
    write_wav(folder / "e_clipped.wav", np.sign(good) * 1.0, RATE)
    # 8 kHz content in a 16 kHz file: the stream claims a band the recording never had
    write_wav(folder / "f_narrowband.wav", resample(noise(3, 0.05, seed=6), RATE, 2 * RATE), 2 * RATE)
    pcm = (good * 32767).astype("<i2").tobytes()
    _raw_wav(folder / "g_rate_1hz.wav", pcm, 1)
    _raw_wav(folder / "h_65535_channels.wav", pcm, RATE, channels=65535, bits=8)
    _raw_wav(folder / "i_truncated.wav", pcm, RATE, declared=len(pcm) * 4)
    write_wav(folder / "j_too_short.wav", good[: RATE // 2], RATE)
    write_wav(folder / "z_normal.wav", good, RATE)  # played last: the folder must get here
    cfg = parse_config(f"""
node: faults
model: {{path: {toy_model}}}
sources:
  - {{name: fan, type: folder, path: {folder}, realtime: false, bank: {bank_dir}, window_seconds: 1,
      hop_seconds: 1, publish_scores: true}}
output: {{jsonl: alerts.jsonl, stdout: false}}
metrics: {{enabled: false}}
""", source="test", base_dir=tmp_path)
    agent = Agent(cfg, None)
    scores: list[dict[str, Any]] = []
    publish = agent.outputs.publish_score
    agent.outputs.publish_score = lambda source, payload: (scores.append(payload), publish(source, payload))[1]  # type: ignore[method-assign]
    assert agent.run() == 0
    faults = agent.runtime.pipelines["fan"].source.health.faults
    windows = {"nonfinite": 3, "out_of_range": 3, "silence": 6, "clipping": 3, "narrowband": 3, "unreadable_file": 4}
    print(f"\nbroken audio: faults {faults}, scores {len(scores)}, alerts "
          f"{len((tmp_path / 'alerts.jsonl').read_text().splitlines())}")
    assert faults == windows, faults
    assert len(scores) == 3 and all(s["score"] is not None and not s["over"] for s in scores), scores
    assert (tmp_path / "alerts.jsonl").read_text() == "", "broken audio raised an alert"


def test_a_source_whose_bank_does_not_load_fails_alone_and_recovers(tmp_path: Path, toy_model: Path,
                                                                   bank_dir: Path) -> None:
    write_anomaly_wav(tmp_path / "a.wav", 10, (20, 20))
    broken = tmp_path / "broken_bank"
    broken.mkdir()
    (broken / "bank.json").write_text("{not json")
    cfg = parse_config(f"""
node: isolation
model: {{path: {toy_model}}}
sources:
  - {{name: good, type: file, path: a.wav, realtime: true, speed: 10, loop: true, bank: {bank_dir},
      window_seconds: 1, hop_seconds: 1}}
  - {{name: bad, type: file, path: a.wav, realtime: true, speed: 10, loop: true, bank: {broken},
      window_seconds: 1, hop_seconds: 1}}
output: {{jsonl: alerts.jsonl, stdout: false}}
metrics: {{enabled: false}}
""", source="test", base_dir=tmp_path)
    agent = Agent(cfg, None)  # starts: one source is enough to monitor
    assert list(agent.runtime.pipelines) == ["good"] and "bank.json" in str(agent.runtime.failed["bad"].error)
    state = agent.state()
    assert state["health"] == "degraded"
    assert [s["health"]["state"] for s in state["sources"]] == ["running", "failed"] or \
        [s["health"]["state"] for s in state["sources"]] == ["starting", "failed"]
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while agent.runtime.pipelines["good"].source.health.windows < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.runtime.pipelines["good"].source.health.windows >= 3, "the healthy source must run"
        shutil.rmtree(broken)
        build_bank(toy_model, broken)  # fixed on disk: the agent notices and starts the source
        while "bad" not in agent.runtime.pipelines and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        assert "bad" in agent.runtime.pipelines and not agent.runtime.failed
        while agent.runtime.pipelines["bad"].source.health.windows < 2 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        assert agent.runtime.pipelines["bad"].source.health.windows >= 2
    finally:
        agent.request_stop("test")
        thread.join(30)


@pytest.mark.parametrize("fault", ["read_only_state_dir", "corrupt_model", "corrupt_only_bank"])
def test_start_up_faults_are_one_line_and_exit_2(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                fault: str) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 4, (1, 2))
    model, bank, state = toy_model, bank_dir, tmp_path / "state"
    if fault == "read_only_state_dir":
        if os.geteuid() != 0:
            pytest.skip("mounting a read-only tmpfs needs root (CI runs as root)")
        state.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)], check=True, timeout=30)
    elif fault == "corrupt_model":
        model = tmp_path / "model.onnx"
        model.write_bytes(toy_model.read_bytes()[:200])
    else:
        bank = tmp_path / "bank_copy"
        shutil.copytree(bank_dir, bank)
        (bank / "layer_1" / "source.npy").write_bytes(b"garbage")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
node: n
state_dir: {state}
model: {{path: {model}}}
sources:
  - {{name: fan, type: file, path: {wav}, realtime: false, bank: {bank}, window_seconds: 1, hop_seconds: 1}}
metrics: {{enabled: false}}
""")
    try:
        result = subprocess.run(agent_command(cfg), capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        if fault == "read_only_state_dir":
            subprocess.run(["umount", "-l", str(state)], check=False, timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("edge-agent: error:")]
    assert result.returncode == 2, result.stderr
    # the error is one line, the last (info lines of what did load may come before it), never a traceback
    assert "Traceback" not in result.stderr and len(errors) == 1 and lines[-1] == errors[0], lines
    expected = {"read_only_state_dir": "state_dir", "corrupt_model": "model.path", "corrupt_only_bank": "source.npy"}
    assert expected[fault] in errors[0], errors
