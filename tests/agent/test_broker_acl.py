"""The shipped broker ACL (configs/mosquitto/acl) on a real mosquitto with a password file: a node cannot push
to another node, a consumer cannot command, the operator can."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml

from .agent_helpers import (
    BASE,
    NODE,
    REPO,
    Mosquitto,
    Watcher,
    start_agent,
    stop_agent,
    write_anomaly_wav,
    write_config,
)

USERS = {NODE: "pw-a", "node-b": "pw-b", "operator": "pw-op", "alerts": "pw-alerts"}


def _as(user: str) -> object:
    def setup(client: paho.Client) -> None:
        client.username_pw_set(user, USERS[user])
    return setup


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{user}:{password}\n" for user, password in USERS.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True, timeout=30)
    passwd.chmod(0o600)
    broker = Mosquitto(tmp_path, f"allow_anonymous false\npassword_file {passwd}\n"
                                 f"acl_file {REPO / 'configs' / 'mosquitto' / 'acl'}\n")
    broker.start()
    yield broker
    broker.stop()


def test_only_the_operator_can_push_and_command_a_node(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                       acl_broker: Mosquitto) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    (tmp_path / "pw").write_text(USERS[NODE])
    cfg = write_config(tmp_path, toy_model, bank_dir, acl_broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n",
                       mqtt_extra=f"  username: {NODE}\n  password_file: pw")
    original = cfg.read_text()
    operator = Watcher(acl_broker.port, f"{BASE}/#", setup=_as("operator"))
    consumer = Watcher(acl_broker.port, "edge-asd/#", setup=_as("alerts"))
    other_node = Watcher(acl_broker.port, f"{BASE}/#", setup=_as("node-b"))
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    try:
        operator.wait_for(lambda m: len(operator.on(f"{BASE}/fan/score")) >= 2, what="scores, seen by the operator")
        consumer.wait_for(lambda m: len(consumer.on(f"{BASE}/fan/score")) >= 2, what="scores, seen by a consumer")

        # node-b's credentials, on node-a's control topics; then a consumer's: the broker drops both
        other_node.publish(f"{BASE}/config/set", json.dumps({"id": "from-node-b", "config": {"node": "x"}}))
        other_node.publish(f"{BASE}/cmd/status", json.dumps({"id": "status-from-node-b"}))
        consumer.publish(f"{BASE}/cmd/status", json.dumps({"id": "status-from-consumer"}))
        # the operator's command is answered, and the agent answers in order: nothing came before it
        operator.publish(f"{BASE}/cmd/status", json.dumps({"id": "status-from-operator"}))
        operator.wait_for(lambda m: operator.on(f"{BASE}/cmd/result"), what="the operator's status")
        assert [r["request_id"] for r in operator.on(f"{BASE}/cmd/result")] == ["status-from-operator"]
        assert operator.on(f"{BASE}/config/result") == []
        assert cfg.read_text() == original

        # a consumer reads alerts and state but never the answers meant for the operator
        assert consumer.on(f"{BASE}/cmd/result") == [] and consumer.on(f"{BASE}/config/result") == []
        # another node reads nothing of node-a (its own subscription to node-a's topics is empty)
        assert other_node.messages == []

        operator.publish(f"{BASE}/config/set", json.dumps({"id": "from-operator", "config": {
            **_doc(original), "sources": [{**_doc(original)["sources"][0], "threshold": 500.0}]}}))
        operator.wait_for(lambda m: operator.on(f"{BASE}/config/result"), what="the operator's push answered")
        result = operator.on(f"{BASE}/config/result")[0]
        assert result["ok"] is True and result["request_id"] == "from-operator"
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-2000:]
        for watcher in (operator, consumer, other_node):
            watcher.close()


def _doc(text: str) -> dict:
    return yaml.safe_load(text)


def test_only_the_operator_can_publish_desired_documents_and_fleet_commands(tmp_path: Path, toy_model: Path,
                                                                           bank_dir: Path,
                                                                           acl_broker: Mosquitto) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (20, 20))
    (tmp_path / "pw").write_text(USERS[NODE])
    cfg = write_config(tmp_path, toy_model, bank_dir, acl_broker.port, wav, realtime=True, loop=True, speed=10,
                       mqtt_extra=f"  username: {NODE}\n  password_file: pw",
                       extra="fleet: {groups: [line-1]}\ncontrol: {trial_seconds: 2}")
    operator = Watcher(acl_broker.port, f"{BASE}/#", setup=_as("operator"))
    other_node = Watcher(acl_broker.port, "edge-asd/group/#", setup=_as("node-b"))
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)

    def desired(version: int, threshold: float) -> str:
        return json.dumps({"version": version, "config": {"sources": {"*": {"threshold": threshold}}}})
    try:
        operator.wait_for(lambda m: operator.on(f"{BASE}/state"), what="the node's state")
        # another node's credentials: its group document, its own node's document and a broadcast are dropped
        other_node.publish("edge-asd/group/line-1/config/desired", desired(9, 300.0))
        other_node.publish(f"{BASE}/config/desired", desired(9, 300.0))
        other_node.publish("edge-asd/$broadcast/cmd/status", json.dumps({"id": "broadcast-from-node-b"}))
        # the operator's group document and broadcast are applied and answered, and nothing came before them
        operator.publish("edge-asd/group/line-1/config/desired", desired(1, 400.0))
        operator.wait_for(lambda m: operator.on(f"{BASE}/config/result"), what="the group document answered")
        operator.publish("edge-asd/$broadcast/cmd/status", json.dumps({"id": "broadcast-from-operator"}))
        operator.wait_for(lambda m: operator.on(f"{BASE}/cmd/result"), what="the broadcast answered")
        results = operator.on(f"{BASE}/config/result")
        assert [(r["version"], r["phase"]) for r in results] == [(1, "committed")], results
        assert [r["request_id"] for r in operator.on(f"{BASE}/cmd/result")] == ["broadcast-from-operator"]
        # a node reads group documents (the operator's), but its own publishes were dropped
        assert [p["version"] for t, p, _ in other_node.messages] == [1], other_node.messages
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()[-2000:]
        for watcher in (operator, other_node):
            watcher.close()
