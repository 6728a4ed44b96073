"""Fault injection on the data path, with a real mosquitto: crashes mid-episode (broker up and down), and what
every fault must leave behind: nothing lost, nothing out of order, every episode ended."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .agent_helpers import (
    BASE,
    Mosquitto,
    Watcher,
    alerts,
    start_agent,
    stop_agent,
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


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (CI runs as root) to fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


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
