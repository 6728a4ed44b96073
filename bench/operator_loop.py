"""The operator loop with the real mn04: how long on-site learning and false-positive feedback take to take effect,
and how much disk the evidence clips take per hour of alerts.

    .venv/bin/python bench/operator_loop.py [--json-dir bench/results]

`edge-agent run` with a source that has no bank, on a synthetic fan recording of 7 minutes (a bearing fault from
330 s to 360 s) looped at 20x, publishing to a real mosquitto: the node learns the first 5 minutes (10 s windows,
5 s hop), builds its bank on the device and monitors with it, by itself. Printed: the windows kept and left out,
the bank build time and the time from the start to monitoring; then the episodes per loop, their clips' audio
seconds and bytes (FLAC at the source's rate, plus the embeddings and meta), the time `cmd/feedback
false_positive` on the first episode takes from publish to its answer (bank rebuilt and swapped), and the
episodes in the 4 loops after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.evaluation.synthetic import write_demo_recording

EDGE_AGENT = benchlib.REPO / ".venv" / "bin" / "edge-agent"
SECONDS = 420.0  # the recording, looped
ANOMALY = (330.0, 360.0)  # a bearing fault, after the learning period
LEARN_MINUTES = 5
SPEED = 20
NODE = "bench-node"
CONFIG = """\
node: {node}
state_dir: {state}
model: {{path: {model}}}
sources:
  - name: machine
    type: file
    path: {recording}
    realtime: true
    speed: {speed}
    loop: true
    window_seconds: 10
    hop_seconds: 5
    learn: {{minutes: {minutes}}}
mqtt: {{host: 127.0.0.1, port: {port}}}
metrics: {{enabled: false}}
evidence: {{pre_roll_seconds: 10}}
"""



class Bus:
    """Every message of the node, with its arrival time."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, Any]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-operator")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("edge-asd/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, c: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload.decode(errors="replace")
        with self.lock:
            self.messages.append((time.monotonic(), msg.topic, payload))

    def on(self, suffix: str) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, p) for t, topic, p in self.messages if topic.endswith(suffix)]

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.05)


def run_agent(tmp: Path, name: str, model: Path, recording: Path, speed: float, port: int) -> subprocess.Popen[bytes]:
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG.format(node=NODE, state=tmp / "state", model=model, recording=recording, speed=speed,
                                    port=port, minutes=LEARN_MINUTES))
    return subprocess.Popen([str(EDGE_AGENT), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "wb"))


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def ends(bus: Bus, after: float = 0.0) -> list[dict[str, Any]]:
    return [p for t, p in bus.on("/machine/alert") if t >= after and isinstance(p, dict) and p["type"] == "end"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-dir", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep the run's files (logs, state) here")
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    model = benchlib.model_path("mn04")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name) if args.work is None else args.work
        tmp.mkdir(parents=True, exist_ok=True)
        procs: list[subprocess.Popen[bytes]] = []
        recording = write_demo_recording(tmp / "fan.wav", seconds=SECONDS, anomaly_span=ANOMALY, seed=1)
        port = benchlib.free_port()
        conf = tmp / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        conf.write_text(f"user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        bus = Bus(port)
        try:
            # --- learning, then monitoring: one agent, as a node commissioned on site ---
            started = time.monotonic()
            procs.append(run_agent(tmp, "node", model, recording, SPEED, port))
            bus.wait(lambda: bus.on("/cmd/result"), 300, "the learning's result")
            (at, learned), = [(t, p) for t, p in bus.on("/cmd/result") if p.get("command") == "learn"]
            if not learned["ok"]:
                raise SystemExit(f"learning failed: {learned}")
            result = learned["result"]
            learn = {"windows": result["windows"], "kept": result["kept"], "outliers": result["outliers"],
                     "faults": result["faults"], "build_seconds": result["build_seconds"],
                     "start_to_monitoring_s": round(at - started, 2), "audio_minutes": LEARN_MINUTES,
                     "speed": SPEED, "threshold": result["threshold"],
                     "recording_bytes": (result.get("clip") or {}).get("bytes"),
                     "recording_seconds": (result.get("clip") or {}).get("duration")}
            loop_wall = SECONDS / SPEED
            mark = at
            bus.wait(lambda: len([e for e in ends(bus, mark) if e.get("clip", {}).get("status") == "ready"]) >= 3,
                     6 * loop_wall + 60, "three episodes with clips")
            before = [e for e in ends(bus, mark) if e.get("clip", {}).get("status") == "ready"]
            seconds_before = time.monotonic() - mark
            first = before[0]
            request = "bench-feedback"
            sent = time.monotonic()
            bus.client.publish(f"edge-asd/{NODE}/cmd/feedback", json.dumps(
                {"id": request, "event_id": first["event_id"], "label": "false_positive"}), qos=1)
            bus.wait(lambda: any(p.get("request_id") == request for _, p in bus.on("/cmd/result")), 120,
                     "the feedback's answer")
            (answered, feedback), = [(t, p) for t, p in bus.on("/cmd/result") if p.get("request_id") == request]
            after_mark = answered
            time.sleep(4 * loop_wall)
            after = ends(bus, after_mark)
            clips = [e["clip"] for e in before]
            store = tmp / "state" / "evidence"
            on_disk = {c["id"]: sum(p.stat().st_size for p in store.glob(f"{c['id']}.*")) for c in clips}
            audio_s = sum(c["duration"] for c in clips)
            flac = sum(c["bytes"] for c in clips)
            total = sum(on_disk.values())
            evidence = {"clips": len(clips), "audio_seconds": round(audio_s, 1), "flac_bytes": flac,
                        "bytes_on_disk": total, "sample_rate": clips[0]["sample_rate"],
                        "flac_mb_per_hour_of_clip_audio": round(flac / audio_s * 3600 / 1e6, 1),
                        "disk_mb_per_hour_of_clip_audio": round(total / audio_s * 3600 / 1e6, 1),
                        "episodes_before": len(before), "loops_before": round(seconds_before / loop_wall, 2)}
            fb = {"ok": feedback["ok"], "publish_to_answer_s": round(answered - sent, 3),
                  "rebuild_seconds": (feedback.get("result") or {}).get("seconds"),
                  "refs_added": (feedback.get("result") or {}).get("refs_added"),
                  "error": feedback.get("error"), "episodes_in_4_loops_after": len(after),
                  "threshold_before": (feedback.get("result") or {}).get("previous_threshold"),
                  "threshold_after": (feedback.get("result") or {}).get("threshold")}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    stop(proc)
            bus.client.loop_stop()
            broker.terminate()
    print(f"### on-site learning (mn04, {LEARN_MINUTES} min of audio at {SPEED}x, 10 s windows, 5 s hop)\n")
    print(benchlib.table(["windows", "kept", "outliers", "faults", "bank build s", "start -> monitoring s"],
                         [[learn["windows"], learn["kept"], learn["outliers"], learn["faults"],
                           learn["build_seconds"], learn["start_to_monitoring_s"]]]))
    print("\n### evidence clips (fan with a bearing fault, 30 s per 7-minute loop)\n")
    print(benchlib.table(["clips", "audio s", "FLAC bytes", "on disk bytes", "rate Hz", "FLAC MB per h",
                          "disk MB per h"],
                         [[evidence["clips"], evidence["audio_seconds"], evidence["flac_bytes"],
                           evidence["bytes_on_disk"], evidence["sample_rate"],
                           evidence["flac_mb_per_hour_of_clip_audio"], evidence["disk_mb_per_hour_of_clip_audio"]]]))
    print("\n### false-positive feedback on the first episode\n")
    print(benchlib.table(["ok", "refs added", "publish -> answer s", "bank rebuild s", "threshold before -> after",
                          "episodes before", "episodes in 4 loops after"],
                         [[fb["ok"], fb["refs_added"], fb["publish_to_answer_s"], fb["rebuild_seconds"],
                           f"{fb['threshold_before']} -> {fb['threshold_after']}",
                           f"{evidence['episodes_before']} in {evidence['loops_before']} loops",
                           fb["episodes_in_4_loops_after"]]]))
    sizes = rebuild_by_bank_size(model)
    print("\n### the bank change behind feedback and learning, by bank size (mn04 layers, random embeddings)\n")
    print(benchlib.table(["source refs", "feedback: add 12 target refs, recalibrate, save, load s",
                          "learning: outliers + build from scratch s"],
                         [[r["refs"], r["feedback_s"], r["learn_s"]] for r in sizes]))
    benchlib.write_json("operator_loop", {"machine": info, "learn": learn, "evidence": evidence, "feedback": fb,
                                          "by_bank_size": sizes}, args.json_dir)


def rebuild_by_bank_size(model: Path) -> list[dict[str, Any]]:
    """What `feedback` and `learn` spend on the bank itself (the rest is MQTT and a swap), at growing sizes."""
    import numpy as np

    from edge_agent.model.encoder import Encoder
    from edge_agent.scoring.bank_edit import Calibration, build_new_banks, edit_banks
    from edge_agent.scoring.config import ScoringConfig
    from edge_agent.scoring.outliers import loo_outliers

    member = Encoder(model, providers=["cpu"]).member
    rng = np.random.default_rng(0)
    rows = []
    for n in (720, 2000, 10000):
        def embeddings(count: int) -> dict[str, np.ndarray]:
            return {layer: rng.standard_normal((count, member.info.dim(layer))).astype(np.float32)
                    for layer in member.info.default_layers}
        source = embeddings(n)
        with tempfile.TemporaryDirectory() as tmp_name:
            t0 = time.perf_counter()
            loo_outliers([source])
            enrolled = build_new_banks(Path(tmp_name) / "bank", [member], [source], [f"s{i}" for i in range(n)],
                                       ScoringConfig(), Calibration())
            learn_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            edit_banks(Path(tmp_name) / "bank", enrolled.banks, ScoringConfig(), Calibration(), add_domain="target",
                       add=[embeddings(12)], add_names=[f"feedback:x:{i}" for i in range(12)])
            feedback_s = time.perf_counter() - t0
        rows.append({"refs": n, "feedback_s": round(feedback_s, 2), "learn_s": round(learn_s, 2)})
    return rows


if __name__ == "__main__":
    main()
