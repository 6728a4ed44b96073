"""How many windows the agent should embed per ONNX call when several wait (`BATCH_MAX` in agent/inference.py):
throughput and the process's peak RSS by batch size, per encoder.

    .venv/bin/python bench/batch_size.py [--encoders mn04,ced-tiny] [--batches 1,2,4,8] [--seconds 3]
        [--onnx NAME=PATH ...] [--json-dir bench/results]

--onnx adds any exported file (e.g. `edge-export mn04 --stft conv` for the front-end before issue 13).

Each (encoder, batch) runs in a fresh process (peak RSS is per process and never goes down): ONNX Runtime on the
CPU provider with its default threads (all cores, as the agent), random audio, windows per second over
`--seconds` of back-to-back calls after two warm-up calls, and the peak RSS after them (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import benchlib

_CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feed = session.get_inputs()[0]
x = (np.random.default_rng(0).standard_normal((batch, feed.shape[1])) * 0.1).astype(np.float32)
for _ in range(2):
    session.run(None, {feed.name: x})
start, windows = time.perf_counter(), 0
while time.perf_counter() - start < seconds:
    session.run(None, {feed.name: x})
    windows += batch
rate = windows / (time.perf_counter() - start)
print(json.dumps({"windows_per_s": rate, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(path: str, batch: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(batch), str(seconds)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="mn04,ced-tiny")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=PATH", help="another ONNX file")
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[str, Any]] = {}
    files = {name: str(benchlib.model_path(name, "fp32")) for name in args.encoders.split(",") if name}
    for item in args.onnx:
        name, _, path = item.partition("=")
        if not (name and path and Path(path).is_file()):
            parser.error(f"--onnx {item!r}: expected NAME=PATH of an existing file")
        files[name] = path
    for name, path in files.items():
        results[name] = {str(b): measure(path, b, args.seconds) for b in batches}
        print(f"done {name}", flush=True)
    print("\n### Windows per second and peak RSS by batch size (ORT fp32, default threads)\n")
    rows = []
    for name, by_batch in results.items():
        one = by_batch[str(batches[0])]["windows_per_s"]
        rows.append([name, *(f"{r['windows_per_s']:.1f} ({r['windows_per_s'] / one:.2f}x) / {r['peak_rss_mb']:.0f} MB"
                             for r in by_batch.values())])
    print(benchlib.table(["encoder", *(f"batch {b}: windows/s (vs batch {batches[0]}) / peak RSS" for b in batches)],
                         rows))
    benchlib.write_json("batch_size", {"machine": info, "seconds": args.seconds, "files": files, "results": results},
                        args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
