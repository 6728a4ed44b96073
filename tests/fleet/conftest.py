"""Fixtures for the `edge-agent fleet` tests: a real mosquitto, three real agents in group line-1 (shared by the
whole package: starting them is the slow part), a watcher of every topic, and the CLI run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..agent.agent_helpers import (
    REPO,
    Mosquitto,
    Watcher,
    build_bank,
    start_agent,
    stop_agent,
    write_anomaly_wav,
    write_power_model,
)

PREFIX = "edge-asd"
GROUP = "line-1"
NODES = ("line-a", "line-b", "line-c")
ANOMALOUS = "line-c"  # its recording has an anomaly every second of wall time (10 s looped at 10x)


class Rig:
    """The broker, the agents and a watcher of `edge-asd/#`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = Mosquitto(tmp)
        self.broker.start()
        self.model = write_power_model(tmp / "power16.onnx")
        self.bank = tmp / "bank"
        build_bank(self.model, self.bank)
        self.normal_wav = write_anomaly_wav(tmp / "normal.wav", 10, (20, 20))  # no anomaly in 10 s
        self.anomaly_wav = write_anomaly_wav(tmp / "anomaly.wav", 10, (4, 7))
        self.watcher = Watcher(self.broker.port, f"{PREFIX}/#")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def port(self) -> int:
        return self.broker.port

    # --- agents ---

    def config(self, node: str, groups: tuple[str, ...] = (GROUP,), trusted_keys: tuple[str, ...] = ()) -> Path:
        wav = self.anomaly_wav if node == ANOMALOUS else self.normal_wav
        directory = self.tmp / node
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "agent.yaml"
        path.write_text(f"""
node: {node}
state_dir: {directory / "state"}
model: {{path: {self.model}}}
sources:
  - name: fan
    type: file
    path: {wav}
    realtime: true
    speed: 10
    loop: true
    bank: {self.bank}
    window_seconds: 1
    hop_seconds: 1
    hysteresis: {{raise_after: 2, clear_after: 2, update_every: 2}}
mqtt: {{host: 127.0.0.1, port: {self.port}, reconnect_min_seconds: 1, reconnect_max_seconds: 1}}
metrics: {{enabled: false}}
fleet: {{groups: {json.dumps(list(groups))}, trusted_keys: {json.dumps(list(trusted_keys))}}}
control: {{trial_seconds: 5}}
""")
        return path

    def log(self, node: str) -> Path:
        return self.tmp / node / "agent.log"

    def start(self, node: str, groups: tuple[str, ...] = (GROUP,), trusted_keys: tuple[str, ...] = ()) -> None:
        self.procs[node] = start_agent(self.config(node, groups, trusted_keys), self.log(node))

    def wait_online(self, node: str, timeout: float = 60.0) -> None:
        def online(_: object) -> bool:
            if self.procs[node].poll() is not None:
                raise AssertionError(f"{node} exited: {self.log(node).read_text()[-3000:]}")
            return "online" in self.watcher.on(f"{PREFIX}/{node}/status") and any(
                isinstance(s, dict) and s.get("status") == "online" for s in self.watcher.on(f"{PREFIX}/{node}/state"))
        self.watcher.wait_for(online, timeout=timeout, what=f"{node} online with a state")

    def stop(self, node: str) -> None:
        proc = self.procs.pop(node)
        if proc.poll() is None:
            assert stop_agent(proc, self.log(node)) == 0, self.log(node).read_text()[-3000:]

    def close(self) -> None:
        try:
            for node in list(self.procs):
                proc = self.procs.pop(node)
                if proc.poll() is None:
                    stop_agent(proc, self.log(node))
        finally:
            self.watcher.close()
            self.broker.stop()

    # --- what the watcher saw ---

    def states(self, node: str) -> list[dict[str, Any]]:
        return [s for s in self.watcher.on(f"{PREFIX}/{node}/state") if isinstance(s, dict)]

    def last_state(self, node: str) -> dict[str, Any]:
        states = self.states(node)
        assert states, f"no state of {node}"
        return states[-1]

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        self.watcher.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    # --- the CLI ---

    def cli(self, command: str, *args: str, timeout: float = 120.0, connect: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """`edge-agent fleet COMMAND --host 127.0.0.1 --port P ARGS...` as a subprocess."""
        argv = [sys.executable, "-m", "edge_agent", "fleet", command]
        if connect:
            argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="package")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    started = time.monotonic()
    r = Rig(tmp_path_factory.mktemp("fleet"))
    try:
        for node in NODES:
            r.start(node)
        for node in NODES:
            r.wait_online(node)
        print(f"\n[fleet] broker and {len(NODES)} agents up in {time.monotonic() - started:.1f} s")
        yield r
    finally:
        r.close()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exit 2 and exactly one line `edge-agent fleet: error: ...` (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("edge-agent fleet: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
