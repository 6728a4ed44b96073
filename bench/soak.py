"""A long run of the agent under churn: RSS, open files and threads over time, and their slopes.

    .venv/bin/python bench/soak.py --minutes 15 --speed 100 [--model mn04] [--json-dir bench/results]

The agent (`edge-agent run`, real mn04 by default) replays a synthetic machine recording with an anomalous
stretch, looped and sped up `--speed` times (so M minutes are M x speed minutes of audio), publishes
scores and alerts to a real mosquitto, and meanwhile, in turn every `--every` seconds: the broker is
restarted, the agent gets SIGHUP, a config push changes the threshold (answered after its trial). Every
2 s the agent's RSS (VmRSS), open file descriptors and threads are read from /proc. Printed: the samples
over time, the peak, and the slope of each over the second half of the run (a leak shows as a slope that
stays positive); whether every push was answered and the agent stayed up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

EDGE_AGENT = benchlib.REPO / ".venv" / "bin" / "edge-agent"

CONFIG = """\
node: soak
state_dir: {state}
model:
  path: {model}
sources:
  - name: machine
    type: file
    path: {recording}
    realtime: true
    speed: {speed}
    loop: true
    bank: {bank}
    window_seconds: 10
    hop_seconds: 5
    publish_scores: true
mqtt:
  host: 127.0.0.1
  port: {port}
  reconnect_min_seconds: 1
  reconnect_max_seconds: 2
metrics:
  enabled: false
logging:
  level: warning
"""



class Broker:
    def __init__(self, workdir: Path, port: int) -> None:
        self.conf = workdir / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        self.conf.write_text(f"user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


class Counter:
    """Counts what arrives on the agent's topics (a consumer beside it)."""

    def __init__(self, port: int) -> None:
        self.counts: dict[str, int] = {}
        self.results: list[dict[str, Any]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}")
        self.client.on_connect = lambda c, *_: c.subscribe("edge-asd/soak/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if msg.topic.endswith("config/result"):
            self.results.append(json.loads(msg.payload))

    def push(self, doc: str, request_id: str) -> None:
        self.client.publish("edge-asd/soak/config/set", json.dumps({"id": request_id, "config": doc}), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    return {"rss_mb": int(fields["VmRSS"][0]) / 1024, "threads": int(fields["Threads"][0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope_per_hour(t: np.ndarray, y: np.ndarray) -> float:
    half = t >= t[-1] / 2
    if half.sum() < 3:
        return 0.0
    return float(np.polyfit(t[half], y[half], 1)[0] * 3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--speed", type=float, default=100.0, help="replay speed (audio seconds per second)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between churn events")
    parser.add_argument("--model", default="mn04")
    parser.add_argument("--agent", type=Path, default=EDGE_AGENT,
                        help="the edge-agent command to soak (another revision's, to compare)")
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    model = benchlib.model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, recording, bank = tmp / "data", tmp / "recording.wav", tmp / "bank"
        subprocess.run([str(EDGE_AGENT), "synth", str(data), "--machines", "fan", "--train-source", "40",
                        "--train-target", "5", "--test-per-class", "1", "--demo", str(recording),
                        "--demo-seconds", "300"], check=True, capture_output=True)
        subprocess.run([str(EDGE_AGENT), "enroll", "--model", str(model), "--bank", str(bank), "--train",
                        str(data / "fan" / "train"), "--no-progress"], check=True, capture_output=True)
        port = benchlib.free_port()
        broker = Broker(tmp, port)
        broker.start()
        config = tmp / "agent.yaml"
        text = CONFIG.format(state=tmp / "state", model=model, recording=recording, bank=bank, speed=args.speed,
                             port=port)
        config.write_text(text)
        counter = Counter(port)
        log = open(tmp / "agent.log", "wb")  # noqa: SIM115 - closed below
        agent = subprocess.Popen([str(args.agent), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                 stderr=log)
        samples: list[dict[str, float]] = []
        events: list[tuple[float, str]] = []
        start = time.monotonic()
        next_event, turn, pushes = start + args.every, 0, 0
        try:
            while time.monotonic() - start < args.minutes * 60:
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited ({agent.returncode}); log: {tmp / 'agent.log'}")
                samples.append({"t": time.monotonic() - start, **sample(agent.pid)})
                if time.monotonic() >= next_event:
                    kind = ("broker_restart", "sighup", "push")[turn % 3]
                    if kind == "broker_restart":
                        broker.stop()
                        time.sleep(2.0)
                        broker.start()
                    elif kind == "sighup":
                        agent.send_signal(signal.SIGHUP)
                    else:
                        pushes += 1
                        doc = text.replace("publish_scores: true",
                                           f"publish_scores: true\n    threshold: {1e3 + pushes}")
                        counter.push(doc, f"push-{pushes}")
                    events.append((time.monotonic() - start, kind))
                    turn += 1
                    next_event += args.every
                time.sleep(2.0)
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(60)
            counter.close()
            broker.stop()
            log.close()
        t = np.array([s["t"] for s in samples])
        rss, fds, threads = (np.array([s[k] for s in samples]) for k in ("rss_mb", "fds", "threads"))
        audio_hours = (t[-1] * args.speed) / 3600
        answered = sorted({r["request_id"] for r in counter.results if r.get("request_id")})
        result = {
            "machine": info, "agent": str(args.agent),
            "minutes": args.minutes, "speed": args.speed, "model": args.model,
            "audio_hours": audio_hours, "exit_code": code, "events": events, "pushes": pushes,
            "pushes_answered": len(answered), "received": counter.counts,
            "rss_mb": {"first": float(rss[0]), "peak": float(rss.max()), "last": float(rss[-1]),
                       "slope_mb_per_hour_second_half": slope_per_hour(t, rss)},
            "fds": {"first": float(fds[0]), "peak": float(fds.max()), "last": float(fds[-1]),
                    "slope_per_hour_second_half": slope_per_hour(t, fds)},
            "threads": {"first": float(threads[0]), "peak": float(threads.max()), "last": float(threads[-1]),
                        "slope_per_hour_second_half": slope_per_hour(t, threads)},
            "samples": samples,
        }
    print(f"### soak: {args.minutes:g} min at {args.speed:g}x = {audio_hours:.1f} h of audio, model {args.model}, "
          f"{len(events)} churn events ({pushes} pushes, {len(answered)} answered), exit code {code}\n")
    rows = [[name, r["first"], r["peak"], r["last"], r[next(k for k in r if k.startswith("slope"))]]
            for name, r in (("RSS MB", result["rss_mb"]), ("open fds", result["fds"]), ("threads", result["threads"]))]
    print(benchlib.table(["measure", "first", "peak", "last", "slope per hour (second half)"], rows))
    print(f"\nreceived on the broker: {counter.counts}")
    benchlib.write_json("soak", result, args.json_dir)


if __name__ == "__main__":
    main()
