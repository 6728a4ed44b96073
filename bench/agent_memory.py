"""The monitoring agent (`edge-agent run --config`): peak RSS and end-to-end latency per window.

    .venv/bin/python bench/agent_memory.py [--models mn04,ced-tiny,mn04+ced-tiny] [--json-dir bench/results]

`a+b` is an ensemble: the agent's `models:` with both encoders, one ensemble bank.

For each encoder: `edge-agent synth` writes a small training set and a demo recording (normal, with
an anomaly in the middle); `edge-agent enroll` builds the bank (ld-domain, the defaults); then the
agent runs twice on the recording with the embedded-default style config (file source, 10 s window,
5 s hop, JSONL/stdout output, no broker, metrics off):

  * as fast as possible (realtime: false): wall time, windows/s, and the peak RSS of the agent
    process (ru_maxrss from wait4, the kernel's own high-water mark);
  * paced like a sound card (realtime: true, speed 1): latency per window from capture (the time the
    window's last block was delivered) to the score being published, read from the `latency_ms`
    field of the per-window score payloads (publish_scores: true) that the agent prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

EDGE_AGENT = benchlib.REPO / ".venv" / "bin" / "edge-agent"

CONFIG = """\
node: bench
state_dir: {state}
{model}
sources:
  - name: demo
    type: file
    path: {recording}
    realtime: {realtime}
    bank: {bank}
    window_seconds: 10
    hop_seconds: 5
    publish_scores: true
    hysteresis:
      raise_after: 2
      clear_after: 2
output:
  jsonl: {state}/alerts.jsonl
  stdout: true
metrics:
  enabled: false
logging:
  level: warning
"""


def run_agent(config: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EDGE_AGENT), "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"edge-agent run failed ({code}):\n{err[-3000:]}")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    scores = [x for x in lines if "latency_ms" in x]
    alerts = [x for x in lines if x.get("type") in ("new", "update", "end")]
    latency = np.array([x["latency_ms"] for x in scores])
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "windows": len(scores),
            "alerts": len(alerts), "latency_ms_median": float(np.median(latency)) if latency.size else None,
            "latency_ms_p95": float(np.percentile(latency, 95)) if latency.size else None,
            "latency_ms_max": float(latency.max()) if latency.size else None,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def import_rss_mb() -> float:
    """Peak RSS of a process that only imports the agent (numpy, onnxruntime, edge_agent)."""
    proc = subprocess.Popen([str(benchlib.REPO / ".venv" / "bin" / "python"), "-c",
                             "import edge_agent.cli, edge_agent.agent.daemon"])
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mn04,ced-tiny,mn04+ced-tiny")
    parser.add_argument("--demo-seconds", type=float, default=60.0)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    # Exports run in a child: on Linux a child's ru_maxrss starts from what it shares with this process when it is
    # forked, so this process must never hold torch and an exported model while it measures the agent.
    members = sorted({member for name in args.models.split(",") if name for member in name.split("+")})
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import benchlib; [benchlib.model_path(m) for m in {members!r}]"], check=True)
    results: dict[str, Any] = {"machine": info, "demo_seconds": args.demo_seconds, "models": {},
                               "import_only_rss_mb": import_rss_mb()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, recording = tmp / "data", tmp / "recording.wav"
        subprocess.run([str(EDGE_AGENT), "synth", str(data), "--machines", "fan", "--train-source", "40",
                        "--train-target", "5", "--test-per-class", "1", "--demo", str(recording),
                        "--demo-seconds", str(args.demo_seconds)], check=True, capture_output=True)
        for name in [m for m in args.models.split(",") if m]:
            paths = [benchlib.model_path(member) for member in name.split("+")]
            model = (f"model:\n  path: {paths[0]}" if len(paths) == 1
                     else "models:\n" + "".join(f"  - path: {p}\n" for p in paths).rstrip("\n"))
            bank = tmp / f"bank-{name}"
            subprocess.run([str(EDGE_AGENT), "enroll", *[a for p in paths for a in ("--model", str(p))], "--bank",
                            str(bank), "--train", str(data / "fan" / "train"), "--no-progress"], check=True,
                           capture_output=True)
            row = {}
            for mode, realtime in (("fast", "false"), ("realtime", "true")):
                state = tmp / f"state-{name}-{mode}"
                config = tmp / f"{name}-{mode}.yaml"
                config.write_text(CONFIG.format(state=state, model=model, recording=recording,
                                                realtime=realtime, bank=bank))
                row[mode] = run_agent(config)
                print(f"done {name} {mode}: {row[mode]}", flush=True)
            results["models"][name] = row

    print(f"\n### edge-agent run on a {args.demo_seconds:.0f} s file source (10 s window, 5 s hop)\n")
    rows = []
    for name, r in results["models"].items():
        f, rt = r["fast"], r["realtime"]
        rows.append([name, f["windows"], f["wall_s"], f["peak_rss_mb"], rt["peak_rss_mb"],
                     rt["latency_ms_median"], rt["latency_ms_p95"], rt["latency_ms_max"], f["latency_ms_median"]])
    print(benchlib.table(["encoder", "windows", "fast: wall s", "fast: peak RSS MB", "realtime: peak RSS MB",
                          "realtime: latency ms median", "p95", "max", "fast: latency ms median (queued)"],
                         rows))
    print(f"\nimports only (python -c 'import edge_agent.cli, edge_agent.agent.daemon'): peak RSS "
          f"{results['import_only_rss_mb']:.1f} MB")
    benchlib.write_json("agent_memory", results, args.json_dir)


if __name__ == "__main__":
    main()
