"""Where an exported encoder's time goes: ONNX Runtime's own profiler, one thread, per op type and per front-end node.

    .venv/bin/python bench/profile_onnx.py [--model models/mn04.onnx] [--repeats 25] [--json-dir bench/results]

Without --model, mn04 is exported with the real weights (benchlib.model_path). Each call embeds one 10 s window of
noise; the table gives the mean kernel time per call by op type, split into the front-end (nodes under
/frontend/) and the network, then the front-end's slowest nodes. Profiling adds its own overhead: the shares are
what this is for, the bench tables give the times.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import numpy as np


def profile(model: Path, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        window = int(meta.get("window_samples", 320000))
        x = (np.random.default_rng(0).standard_normal((1, window)) * 0.1).astype(np.float32)
        for _ in range(repeats):
            session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    by_node: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name, op = event["name"].removesuffix("_kernel_time"), event["args"]["op_name"]
        part = "front-end" if name.startswith("/frontend/") else "network"
        by_op[(part, op)] += event["dur"] / repeats / 1000
        if part == "front-end":
            by_node[(name, op)] += event["dur"] / repeats / 1000
    return {"repeats": repeats, "by_op_ms": [[part, op, ms] for (part, op), ms in by_op.items()],
            "front_end_nodes_ms": [[name, op, ms] for (name, op), ms in by_node.items()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    model = args.model or benchlib.model_path("mn04")
    result = profile(model, args.repeats)
    totals = collections.defaultdict(float)
    for part, _, ms in result["by_op_ms"]:
        totals[part] += ms
    print(f"### {model.name}: kernel time per call by op type (one thread, mean of {args.repeats} calls)\n")
    print(", ".join(f"{part} {ms:.2f} ms" for part, ms in totals.items()) + "\n")
    rows = [[part, op, f"{ms:.3f}"] for part, op, ms in sorted(result["by_op_ms"], key=lambda r: -r[2])[:15]]
    print(benchlib.table(["part", "op", "ms"], rows))
    print("\n### the front-end's slowest nodes\n")
    nodes = sorted(result["front_end_nodes_ms"], key=lambda r: -r[2])[:8]
    print(benchlib.table(["node", "op", "ms"], [[name, op, f"{ms:.3f}"] for name, op, ms in nodes]))
    benchlib.write_json("profile_onnx", {"machine": info, "model": model.name, **result}, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
