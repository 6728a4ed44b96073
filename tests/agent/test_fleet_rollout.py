"""Fleet rollout on the node side, with three real agents on a real mosquitto and artifacts served by a real
HTTP server on loopback: group and node documents, precedence, older versions, broadcast commands, models and
banks by URL (a wrong hash is refused everywhere and every node keeps its version)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .agent_helpers import Mosquitto, Watcher, start_agent, stop_agent, wait_for_log, write_anomaly_wav

PREFIX = "edge-asd"
NODES = ("n1", "n2", "n3")
GROUP = "line-1"


class Fleet:
    """Three agents in group line-1, and a watcher of every topic."""

    def __init__(self, tmp: Path, broker: Mosquitto, model: Path, bank: Path, nodes: tuple[str, ...] = NODES) -> None:
        self.tmp, self.broker, self.model, self.bank = tmp, broker, model, bank
        self.wav = write_anomaly_wav(tmp / "fan.wav", 10, (20, 20))  # normal sound only
        self.watcher = Watcher(broker.port, f"{PREFIX}/#")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for node in nodes:
            self.start(node)
        for node in nodes:
            self.watcher.wait_for(lambda m, n=node: self.states(n), what=f"{node}'s state")

    def config(self, node: str) -> Path:
        path = self.tmp / node / "agent.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"""
node: {node}
state_dir: {self.tmp / node / "state"}
model: {{path: {self.model}}}
sources:
  - {{name: fan, type: file, path: {self.wav}, realtime: true, speed: 10, loop: true, bank: {self.bank},
      window_seconds: 1, hop_seconds: 1}}
mqtt: {{host: 127.0.0.1, port: {self.broker.port}, reconnect_min_seconds: 1, reconnect_max_seconds: 1}}
metrics: {{enabled: false}}
fleet: {{groups: [{GROUP}]}}
control: {{trial_seconds: 2, push_roots: [{self.tmp}]}}
""")
        return path

    def log(self, node: str) -> Path:
        return self.tmp / node / "agent.log"

    def start(self, node: str) -> None:
        self.procs[node] = start_agent(self.config(node), self.log(node))

    def stop(self, node: str) -> None:
        assert stop_agent(self.procs[node], self.log(node)) == 0, self.log(node).read_text()[-3000:]

    def close(self) -> None:
        for node, proc in self.procs.items():
            if proc.poll() is None:
                self.stop(node)
        self.watcher.close()

    def states(self, node: str) -> list[dict[str, Any]]:
        return [s for s in self.watcher.on(f"{PREFIX}/{node}/state") if isinstance(s, dict)]

    def results(self, node: str, version: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.watcher.on(f"{PREFIX}/{node}/config/result")
                if version is None or r.get("version") == version]

    def publish(self, topic: str, doc: dict[str, Any] | str, retain: bool = True) -> float:
        payload = doc if isinstance(doc, str) else json.dumps(doc)
        deadline = time.monotonic() + 15
        while not self.watcher.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)  # after a broker restart
        self.watcher.client.publish(f"{PREFIX}/{topic}", payload, qos=1, retain=retain).wait_for_publish(5)
        return time.monotonic()

    def wait_results(self, nodes: tuple[str, ...], version: int, timeout: float = 30) -> dict[str, dict[str, Any]]:
        self.watcher.wait_for(lambda m: all(self.results(n, version) for n in nodes), timeout=timeout,
                              what=f"results of version {version} from {nodes}")
        return {n: self.results(n, version)[0] for n in nodes}

    def last_state(self, node: str) -> dict[str, Any]:
        return self.states(node)[-1]


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, toy_model: Path, bank_dir: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker, toy_model, bank_dir)
    try:
        yield f
    finally:
        f.close()


def _threshold(state: dict[str, Any]) -> float:
    return float(state["sources"][0]["threshold"])


def test_group_and_node_documents_versions_and_broadcast(fleet: Fleet) -> None:
    def doc(version: int, threshold: float, target: str) -> dict[str, Any]:
        return {"version": version, "id": f"t{threshold}", "target": target,
                "config": {"sources": {"*": {"threshold": threshold}}}}

    # the node's own document first: at an equal version it beats the group's that follows
    fleet.publish("n1/config/desired", doc(1, 5.0, "node/n1"))
    assert fleet.wait_results(("n1",), 1)["n1"]["phase"] == "committed"
    started = fleet.publish(f"group/{GROUP}/config/desired", doc(1, 6.0, f"group/{GROUP}"))
    results = fleet.wait_results(("n2", "n3"), 1)
    seconds = time.monotonic() - started
    assert all(r["phase"] == "committed" and r["origin"] == f"group/{GROUP}" for r in results.values()), results
    time.sleep(1.0)
    assert len(fleet.results("n1", 1)) == 1, "n1 must ignore the group's version 1: its own version 1 wins"
    fleet.watcher.wait_for(lambda m: _threshold(fleet.last_state("n1")) == 5.0 and
                           all(_threshold(fleet.last_state(n)) == 6.0 for n in ("n2", "n3")), what="thresholds")
    # a newer group version reaches every node, n1 included
    started2 = fleet.publish(f"group/{GROUP}/config/desired", doc(2, 7.0, f"group/{GROUP}"))
    results = fleet.wait_results(NODES, 2)
    seconds2 = time.monotonic() - started2
    assert all(r["phase"] == "committed" for r in results.values()), results
    for node in NODES:
        fleet.watcher.wait_for(lambda m, n=node: fleet.last_state(n)["config"]["status"] == "committed" and
                               fleet.last_state(n)["config"]["version"] == 2, what=f"{node} reports version 2")
        state = fleet.last_state(node)
        assert state["config"]["committed_version"] == 2 and state["config"]["desired_origin"] == f"group/{GROUP}"
        assert _threshold(state) == 7.0 and state["fleet"]["groups"] == [GROUP]
    # an older version is ignored: no answer, nothing changes
    fleet.publish("n2/config/desired", doc(1, 9.0, "node/n2"))
    time.sleep(1.5)
    assert len(fleet.results("n2", 1)) == 1 and _threshold(fleet.last_state("n2")) == 7.0
    assert "event=desired_ignored" in fleet.log("n2").read_text()
    # a broadcast status: every node answers and re-publishes its retained state
    before = {n: len(fleet.states(n)) for n in NODES}
    fleet.publish("$broadcast/cmd/status", json.dumps({"id": "roll-call"}), retain=False)
    fleet.watcher.wait_for(lambda m: all(
        any(r.get("request_id") == "roll-call" and r["ok"] for r in fleet.watcher.on(f"{PREFIX}/{n}/cmd/result"))
        and len(fleet.states(n)) > before[n] for n in NODES), what="every node answering the broadcast")
    # a group command reaches the group's nodes
    fleet.publish(f"group/{GROUP}/cmd/status", json.dumps({"id": "group-call"}), retain=False)
    fleet.watcher.wait_for(lambda m: all(
        any(r.get("request_id") == "group-call" for r in fleet.watcher.on(f"{PREFIX}/{n}/cmd/result"))
        for n in NODES), what="every node answering the group command")
    # a restart keeps the committed version without applying it again
    fleet.stop("n3")
    fleet.start("n3")
    fleet.watcher.wait_for(lambda m: fleet.last_state("n3")["status"] == "online" and
                           fleet.last_state("n3")["config"]["committed_version"] == 2 and
                           _threshold(fleet.last_state("n3")) == 7.0, what="n3 back on version 2")
    time.sleep(1.0)
    assert len(fleet.results("n3", 2)) == 1, "a restart must not apply the same version again"
    print(f"\ngroup push, 2 nodes: {seconds:.2f} s; 3 nodes: {seconds2:.2f} s from publish to all committed")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_and_banks_by_url_wrong_hash_refused_everywhere(fleet: Fleet, http_root: tuple[Path, str],
                                                               bank_dir: Path, toy_model: Path) -> None:
    root, url = http_root
    shutil.copy(toy_model, root / "model.onnx")
    with tarfile.open(root / "bank.tar.gz", "w:gz") as tar:
        tar.add(bank_dir, arcname="bank")
    model_ref = {"url": f"{url}/model.onnx", "sha256": _sha(root / "model.onnx"),
                 "size": (root / "model.onnx").stat().st_size, "version": "m-2"}
    bank_ref = {"url": f"{url}/bank.tar.gz", "sha256": _sha(root / "bank.tar.gz"),
                "size": (root / "bank.tar.gz").stat().st_size, "version": "b-7"}
    hashes = {n: fleet.last_state(n)["config_hash"] for n in NODES}
    # a wrong sha256: refused by every node, which keeps running what it ran
    wrong = {"version": 1, "target": f"group/{GROUP}",
             "config": {"model": {**model_ref, "sha256": "0" * 64}}}
    fleet.publish(f"group/{GROUP}/config/desired", wrong)
    results = fleet.wait_results(NODES, 1)
    for result in results.values():
        assert result["phase"] == "refused" and "sha256" in result["error"]["message"], result
    windows = {n: fleet.last_state(n)["sources"][0]["health"]["windows"] for n in NODES}
    for node in NODES:
        fleet.watcher.wait_for(lambda m, n=node: fleet.last_state(n)["config"]["status"] == "refused",
                               what=f"{node} reports the refusal")
        assert fleet.last_state(node)["config_hash"] == hashes[node]
        assert not list((fleet.tmp / node / "state" / "artifacts").glob("0000*"))
    # the right document: fetched, verified, self-tested, on trial, committed on every node
    good = {"version": 2, "id": "models-v2", "target": f"group/{GROUP}",
            "config": {"model": model_ref, "sources": {"fan": {"bank": bank_ref}}}}
    started = fleet.publish(f"group/{GROUP}/config/desired", good)
    arrivals: dict[str, float] = {}

    def committed(m: list) -> bool:
        for n in NODES:
            if n not in arrivals and fleet.results(n, 2):
                arrivals[n] = time.monotonic() - started
        return len(arrivals) == len(NODES)
    fleet.watcher.wait_for(committed, timeout=60, what="version 2 on every node")
    for node in NODES:
        assert fleet.results(node, 2)[0]["phase"] == "committed", fleet.results(node, 2)
        fleet.watcher.wait_for(lambda m, n=node: fleet.last_state(n)["config"]["committed_version"] == 2,
                               what=f"{node} reporting version 2")
        state = fleet.last_state(node)
        assert state["model"]["version"] == "m-2" and state["model"]["sha256"] == model_ref["sha256"]
        assert state["sources"][0]["bank"]["version"] == "b-7"
        store = fleet.tmp / node / "state" / "artifacts"
        assert (store / model_ref["sha256"] / "model.onnx").is_file()
        assert (store / bank_ref["sha256"] / "bank").is_dir()
        assert state["sources"][0]["health"]["windows"] > windows[node], "the node kept monitoring"
    disk = {n: sum(p.stat().st_size for p in (fleet.tmp / n / "state" / "artifacts").rglob("*") if p.is_file())
            for n in NODES}
    log = fleet.log("n1").read_text()
    assert "event=desired_refused" in log and "event=config_committed" in log
    wait_for_log(fleet.log("n1"), lambda text: "event=artifact_fetched" in text, what="the fetch logged")
    print(f"\nartifact rollout (model {model_ref['size']} B + bank {bank_ref['size']} B), publish -> committed: "
          + ", ".join(f"{n} {t:.2f} s" for n, t in sorted(arrivals.items()))
          + "; artifact store per node: " + ", ".join(f"{n} {b} B" for n, b in sorted(disk.items())))


def test_a_version_that_fails_its_trial_rolls_back_on_every_node_and_is_not_retried(fleet: Fleet) -> None:
    # Every window below the RMS floor: refused as broken audio, so no source delivers a window under it.
    bad = {"version": 1, "target": f"group/{GROUP}", "config": {"sources": {"*": {"audio_checks": {"rms_floor": 1.0}}}}}
    started = fleet.publish(f"group/{GROUP}/config/desired", bad)
    results = fleet.wait_results(NODES, 1, timeout=30)
    took = time.monotonic() - started
    for node, result in results.items():
        assert result["phase"] == "rolled_back" and "no window" in result["error"]["message"], (node, result)
    assert took >= 2.0, "rolled back at the trial deadline (trial_seconds 2)"
    for node in NODES:
        fleet.watcher.wait_for(lambda m, n=node: fleet.last_state(n)["config"]["status"] == "rolled_back",
                               what=f"{node} reports the rollback")
    time.sleep(1.0)
    fleet.publish("$broadcast/cmd/status", json.dumps({"id": "after-rollback"}), retain=False)

    def answer(node: str) -> dict[str, Any] | None:
        found = [r for r in fleet.watcher.on(f"{PREFIX}/{node}/cmd/result") if r.get("request_id") == "after-rollback"]
        return found[0] if found else None
    fleet.watcher.wait_for(lambda m: all(answer(n) for n in NODES), what="the status answers")
    for node in NODES:
        answered = answer(node)
        assert answered is not None and answered["result"]["sources"][0]["health"]["windows"] > 0, \
            f"{node} must monitor again under its previous config"
    # the broker hands the retained version 1 to a reconnecting node: it is not tried again
    fleet.broker.stop()
    fleet.broker.start()
    fleet.watcher.wait_for(lambda m: all("event=desired_ignored" in fleet.log(n).read_text() for n in NODES),
                           what="version 1 ignored after the reconnect")
    assert all(len(fleet.results(n, 1)) == 1 for n in NODES)
    # the fix is a new version
    fleet.publish(f"group/{GROUP}/config/desired", {**bad, "version": 2, "config": {"sources": {"*": {
        "audio_checks": {"rms_floor": 1e-4}}}}})
    results = fleet.wait_results(NODES, 2)
    assert all(r["phase"] == "committed" for r in results.values()), results
    print(f"\nrollback of a version that fails its trial on 3 nodes: {took:.2f} s after the publish")


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Serves `body` slowly: 10 KB every 0.1 s."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            for i in range(0, len(self.body), 10_000):
                self.wfile.write(self.body[i:i + 10_000])
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node gave up on this download

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_slow_download_reports_progress_and_a_newer_version_supersedes_it(tmp_path: Path, broker: Mosquitto,
                                                                            toy_model: Path, bank_dir: Path) -> None:
    _Trickle.body = toy_model.read_bytes() + b"\0" * 400_000  # 4 s to download; never completes here
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fleet = Fleet(tmp_path, broker, toy_model, bank_dir, nodes=("n1",))
    try:
        slow = {"version": 1, "config": {"model": {
            "url": f"http://127.0.0.1:{server.server_address[1]}/big.onnx", "size": len(_Trickle.body),
            "sha256": hashlib.sha256(_Trickle.body).hexdigest()}}}
        fleet.publish("n1/config/desired", slow)

        def downloading(m: list) -> bool:
            progress = fleet.last_state("n1")["config"]["progress"]
            return bool(progress) and progress["phase"] == "downloading" and (progress["percent"] or 0) >= 10
        fleet.watcher.wait_for(downloading, what="download progress in the retained state")
        progress = fleet.last_state("n1")["config"]["progress"]
        assert progress["version"] == 1 and progress["artifact"] == "config.model", progress
        assert fleet.last_state("n1")["config"]["status"] == "fetching"
        fleet.publish("n1/config/desired", {"version": 2, "config": {"sources": {"*": {"threshold": 3.0}}}})
        results = fleet.wait_results(("n1",), 2)
        first = fleet.results("n1", 1)
        assert first and first[0]["phase"] == "refused" and "superseded by version 2" in first[0]["error"]["message"]
        assert results["n1"]["phase"] == "committed"
        assert fleet.results("n1").index(first[0]) < fleet.results("n1").index(results["n1"]), "answered in order"
        staging = tmp_path / "n1" / "state" / "artifacts" / "staging"
        assert not any(p.stat().st_size >= len(_Trickle.body) for p in staging.glob("*")), "the download stopped"
        fleet.watcher.wait_for(lambda m: fleet.last_state("n1")["config"]["progress"] is None
                               and fleet.last_state("n1")["config"]["committed_version"] == 2, what="version 2")
    finally:
        fleet.close()
        server.shutdown()
