"""A model and bank rollout to a group of nodes: time from publish to committed, and the disk it takes.

    .venv/bin/python bench/fleet_rollout.py [--nodes 3] [--json-dir bench/results]

N agents (`edge-agent run`, real mn04, each with its own state dir) run in group `line-1` on a real
mosquitto, replaying a machine recording in real time (10 s windows, 5 s hop). A loopback HTTP server (the
standard library's) serves the mn04 ONNX file (5.4 MB) and a bank archive built with it. One desired document
on `edge-asd/group/line-1/config/desired` names both by URL; every node downloads them, checks size and
sha256, unpacks the bank, self-tests both, runs the new config on trial and commits. Printed per node: the
seconds from the publish to the artifacts being ready (fetch + verify + self-test, from the node's log) and
to its `committed` answer, and the bytes in its artifact store afterwards (and at the peak, sampled).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

EDGE_AGENT = benchlib.REPO / ".venv" / "bin" / "edge-agent"
GROUP = "line-1"

CONFIG = """\
node: {node}
state_dir: {state}
model: {{path: {model}}}
sources:
  - {{name: machine, type: file, path: {recording}, realtime: true, loop: true, bank: {bank},
      window_seconds: 10, hop_seconds: 5}}
mqtt: {{host: 127.0.0.1, port: {port}}}
metrics: {{enabled: false}}
logging: {{level: info}}
fleet: {{groups: [{group}]}}
control: {{trial_seconds: 30}}
"""



class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    model = benchlib.model_path("mn04")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, recording, bank, www = tmp / "data", tmp / "recording.wav", tmp / "bank", tmp / "www"
        subprocess.run([str(EDGE_AGENT), "synth", str(data), "--machines", "fan", "--train-source", "40",
                        "--train-target", "5", "--test-per-class", "1", "--demo", str(recording),
                        "--demo-seconds", "120"], check=True, capture_output=True)
        subprocess.run([str(EDGE_AGENT), "enroll", "--model", str(model), "--bank", str(bank), "--train",
                        str(data / "fan" / "train"), "--no-progress"], check=True, capture_output=True)
        www.mkdir()
        shutil.copy(model, www / "mn04.onnx")
        with tarfile.open(www / "bank.tar.gz", "w:gz") as tar:
            tar.add(bank, arcname="bank")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"

        def ref(name: str, version: str) -> dict[str, Any]:
            body = (www / name).read_bytes()
            return {"url": f"{url}/{name}", "sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                    "version": version}

        port = benchlib.free_port()
        conf = tmp / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        conf.write_text(f"user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        nodes = [f"node-{i + 1}" for i in range(args.nodes)]
        results: dict[str, tuple[float, dict[str, Any]]] = {}
        online: set[str] = set()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet")

        def on_message(c: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            node = msg.topic.split("/")[1]
            if msg.topic.endswith("/config/result"):
                results.setdefault(node, (time.monotonic(), json.loads(msg.payload)))
            elif msg.topic.endswith("/state"):
                online.add(node)

        client.on_message = on_message
        client.on_connect = lambda c, *_: c.subscribe([("edge-asd/+/config/result", 1), ("edge-asd/+/state", 1)])
        client.connect("127.0.0.1", port)
        client.loop_start()
        procs = {}
        for node in nodes:
            (tmp / node).mkdir()
            config = tmp / node / "agent.yaml"
            config.write_text(CONFIG.format(node=node, state=tmp / node / "state", model=model, recording=recording,
                                            bank=bank, port=port, group=GROUP))
            procs[node] = subprocess.Popen([str(EDGE_AGENT), "run", "--config", str(config)],
                                           stdout=subprocess.DEVNULL,
                                           stderr=open(tmp / node / "agent.log", "wb"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 60
            while online != set(nodes) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(12)  # every node has scored a window: steady state
            doc = {"version": 1, "id": "mn04-rollout", "target": f"group/{GROUP}",
                   "config": {"model": ref("mn04.onnx", "mn04-as-432"),
                              "sources": {"*": {"bank": ref("bank.tar.gz", "fan-bank-1")}}}}
            peak = dict.fromkeys(nodes, 0)
            started = time.monotonic()
            client.publish(f"edge-asd/group/{GROUP}/config/desired", json.dumps(doc), qos=1,
                           retain=True).wait_for_publish(5)
            while len(results) < len(nodes) and time.monotonic() - started < 120:
                for node in nodes:
                    peak[node] = max(peak[node], store_bytes(tmp / node / "state" / "artifacts"))
                time.sleep(0.05)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(60)
            client.loop_stop()
            broker.terminate()
            server.shutdown()
        rows, raw = [], []
        for node in nodes:
            log = (tmp / node / "agent.log").read_text()
            ready = re.search(r"event=desired_artifacts_ready .*?seconds=([0-9.]+)", log)
            at, result = results.get(node, (float("nan"), {"phase": "no answer"}))
            final = store_bytes(tmp / node / "state" / "artifacts")
            row = {"node": node, "phase": result.get("phase"), "fetch_verify_selftest_s": float(ready.group(1))
                   if ready else None, "publish_to_committed_s": round(at - started, 2),
                   "store_bytes": final, "store_peak_bytes": peak[node]}
            raw.append(row)
            rows.append([node, row["phase"], row["fetch_verify_selftest_s"], row["publish_to_committed_s"],
                         f"{final / 1e6:.2f}", f"{peak[node] / 1e6:.2f}"])
        sizes = (doc["config"]["model"]["size"], doc["config"]["sources"]["*"]["bank"]["size"])
        print(f"### rollout of mn04 ({sizes[0] / 1e6:.2f} MB) + bank archive ({sizes[1] / 1e6:.3f} MB) "
              f"to {len(nodes)} nodes over loopback HTTP\n")
        print(benchlib.table(["node", "result", "fetch + verify + self-test s", "publish -> committed s",
                              "artifact store MB", "store peak MB"], rows))
        benchlib.write_json("fleet_rollout", {"machine": info, "nodes": raw, "model_bytes": sizes[0],
                                              "bank_archive_bytes": sizes[1]}, args.json_dir)


if __name__ == "__main__":
    main()
