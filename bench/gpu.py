"""GPU readiness: the CUDA and TensorRT execution providers against CPU, measured side by side.

    .venv/bin/python bench/gpu.py [--encoders mn04,ced-tiny,beats] [--batch 1,8,32] [--json-dir DIR]
                                  [--require-gpu] [--no-agent] [--demo-seconds 30]

For each encoder, fp32 and fp16 exports (benchlib.model_path), and each of the providers cpu, cuda,
tensorrt (TensorRT with CUDA behind it for the nodes TensorRT does not take, as ONNX Runtime advises):

  * batch 1: median ms per window;
  * batched: windows/s at every --batch size (median of the timed calls);
  * the agent (fp32 only): `edge-agent run` on a file source paced like a sound card (realtime: true),
    `model.providers: [cuda]` against `[cpu]`, latency per window read from the `latency_ms` field of
    the score payloads (as bench/agent_memory.py does).

Every GPU number is shown with its ratio to the CPU number of the same model, batch and run
("x CPU": how many times faster). A provider this onnxruntime build lacks is not an error: its cells
read "n/a (provider missing)" and CPU is still measured; with --require-gpu the script exits 2 with
one line naming what is missing. A session that ONNX Runtime quietly placed on CPU is reported as
"n/a (fell back to CPU)", never timed as a GPU number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import onnxruntime as ort

from edge_agent.model.encoder import PROVIDER_NAMES, Encoder

GPU_PROVIDERS = ("cuda", "tensorrt")
PROVIDERS = ("cpu", *GPU_PROVIDERS)
# What Encoder(providers=...) is given per measured provider; the first one must end up in use.
REQUEST = {"cpu": ("cpu",), "cuda": ("cuda",), "tensorrt": ("tensorrt", "cuda")}
PRECISIONS = ("fp32", "fp16")
MISSING = "n/a (provider missing)"
FALLBACK = "n/a (fell back to CPU)"
NOT_MEASURED = "—"
EDGE_AGENT = benchlib.REPO / ".venv" / "bin" / "edge-agent"

AGENT_CONFIG = """\
node: bench-gpu
state_dir: {state}
model:
  path: {model}
  providers: [{provider}]
sources:
  - name: demo
    type: file
    path: {recording}
    realtime: true
    bank: {bank}
    window_seconds: 10
    hop_seconds: 5
    publish_scores: true
output:
  jsonl: {state}/alerts.jsonl
  stdout: true
metrics:
  enabled: false
logging:
  level: warning
"""


# --- detection -------------------------------------------------------------------------------------


def detect(available: Sequence[str] | None = None) -> dict[str, bool]:
    """{cpu, cuda, tensorrt: present in this onnxruntime build}."""
    have = ort.get_available_providers() if available is None else list(available)
    return {name: PROVIDER_NAMES[name] in have for name in PROVIDERS}


def missing_gpu(present: dict[str, bool]) -> list[str]:
    return [PROVIDER_NAMES[name] for name in GPU_PROVIDERS if not present[name]]


def gpu_name() -> str:
    """`nvidia-smi` name and driver of each GPU, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "none (nvidia-smi not found)"
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False)
    text = "; ".join(line.strip() for line in proc.stdout.splitlines() if line.strip())
    return text or f"none (nvidia-smi exit {proc.returncode}: {proc.stderr.strip()[:200]})"


# --- measurement -----------------------------------------------------------------------------------


def measure_provider(path: Path, provider: str, batches: Sequence[int], repeats: int) -> dict[str, Any]:
    """Batch-1 ms per window and windows/s per batch of one model on one provider, or why not."""
    t0 = time.perf_counter()
    try:
        enc = Encoder(path, providers=REQUEST[provider])
    except Exception as exc:  # a provider present in the build can still fail to start (driver, libs)
        return {"error": f"n/a (session failed: {str(exc).splitlines()[0][:120]})"}
    load_s = time.perf_counter() - t0
    if enc.providers[0] != PROVIDER_NAMES[provider]:
        return {"error": FALLBACK, "used": enc.providers}
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"used": enc.providers, "load_s": load_s, "throughput": {}}
    for batch in sorted({1, *batches}):
        windows = rng.standard_normal((batch, enc.info.window_samples)).astype(np.float32) * 0.1
        # warm-up 3: TensorRT builds its engine per input shape on the first calls
        seconds = benchlib.timings(partial(enc.embed, windows), repeats, warmup=3)
        median = float(np.median(seconds))
        if batch == 1:
            out["batch1"] = benchlib.stats_ms(seconds)
        out["throughput"][str(batch)] = batch / median
    return out


def measure_encoder(paths: dict[str, Path], present: dict[str, bool], batches: Sequence[int],
                    repeats: int) -> dict[str, dict[str, Any]]:
    """{precision: {provider: measurement or {"error": ...}}}."""
    result: dict[str, dict[str, Any]] = {}
    for precision, path in paths.items():
        result[precision] = {}
        for provider in PROVIDERS:
            if not present[provider]:
                result[precision][provider] = {"error": MISSING}
                continue
            result[precision][provider] = measure_provider(path, provider, batches, repeats)
            print(f"done {path.name} {precision} {provider}", file=sys.stderr, flush=True)
    return result


def agent_latency(model: Path, provider: str, recording: Path, bank: Path, work: Path) -> dict[str, Any]:
    """`edge-agent run`, realtime, on `provider`: latency_ms of the score payloads (median, p95)."""
    state = work / f"state-{model.stem}-{provider}"
    config = work / f"{model.stem}-{provider}.yaml"
    config.write_text(AGENT_CONFIG.format(state=state, model=model, provider=provider, recording=recording,
                                          bank=bank))
    proc = subprocess.run([str(EDGE_AGENT), "run", "--config", str(config)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return {"error": f"n/a (edge-agent run exit {proc.returncode}: {proc.stderr.strip()[-200:]})"}
    latency = np.array([json.loads(line)["latency_ms"] for line in proc.stdout.splitlines()
                        if line.startswith("{") and "latency_ms" in line])
    if not latency.size:
        return {"error": "n/a (no score payloads)"}
    return {"latency_ms_median": float(np.median(latency)), "latency_ms_p95": float(np.percentile(latency, 95)),
            "windows": int(latency.size)}


def measure_agent(model: Path, present: dict[str, bool], work: Path, recording: Path,
                  train: Path) -> dict[str, Any]:
    bank = work / f"bank-{model.stem}"
    subprocess.run([str(EDGE_AGENT), "enroll", "--model", str(model), "--providers", "cpu", "--bank", str(bank),
                    "--train", str(train), "--no-progress"], check=True, capture_output=True)
    out: dict[str, Any] = {}
    for provider in ("cpu", "cuda"):
        out[provider] = (agent_latency(model, provider, recording, bank, work) if present[provider]
                         else {"error": MISSING})
        print(f"done agent {model.stem} {provider}: {out[provider]}", file=sys.stderr, flush=True)
    return out


# --- the table -------------------------------------------------------------------------------------


def _cell(value: float, cpu: float | None, faster_when_higher: bool, unit: str) -> str:
    text = f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    if cpu is None or cpu <= 0 or value <= 0:
        return text
    ratio = value / cpu if faster_when_higher else cpu / value
    return f"{text} ({ratio:.2f}x CPU)"


def table(results: dict[str, Any], batches: Sequence[int]) -> str:
    """One markdown table: a row per encoder, precision and provider; GPU cells with their ratio to CPU."""
    headers = ["encoder", "precision", "provider", "batch 1 ms/window",
               *(f"batch {b} windows/s" for b in batches), "agent latency ms (median, realtime)"]
    rows = []
    for name, enc in results["encoders"].items():
        for precision, by_provider in enc["ort"].items():
            cpu = by_provider.get("cpu", {})
            for provider in PROVIDERS:
                m = by_provider[provider]
                row: list[object] = [name, precision, provider]
                if "error" in m:
                    row += [m["error"]] * (1 + len(batches))
                else:
                    base = cpu.get("batch1", {}).get("median_ms") if provider != "cpu" else None
                    row.append(_cell(m["batch1"]["median_ms"], base, False, "ms"))
                    for b in batches:
                        base = cpu.get("throughput", {}).get(str(b)) if provider != "cpu" else None
                        row.append(_cell(m["throughput"][str(b)], base, True, "/s"))
                agent = enc.get("agent", {}).get(provider) if precision == "fp32" else None
                if agent is None:
                    row.append(NOT_MEASURED)
                elif "error" in agent:
                    row.append(agent["error"])
                else:
                    cpu_agent = enc["agent"].get("cpu", {}).get("latency_ms_median") if provider != "cpu" else None
                    row.append(_cell(agent["latency_ms_median"], cpu_agent, False, "ms"))
                rows.append(row)
    return benchlib.table(headers, rows)


# --- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, available: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="mn04,ced-tiny,beats")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes for windows/s")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 2 (one line naming them) when the CUDA or TensorRT provider is missing")
    parser.add_argument("--no-agent", action="store_true", help="skip the edge-agent run latency column")
    parser.add_argument("--demo-seconds", type=float, default=30.0,
                        help="length of the realtime recording the agent runs on (one run per provider)")
    parser.add_argument("--models-dir", type=Path, default=benchlib.MODELS_DIR,
                        help="where <precision>/<encoder>.onnx are found or exported to")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.encoders.split(",") if n]
    batches = sorted({int(b) for b in args.batch.split(",") if b})
    precisions = [p for p in args.precisions.split(",") if p]

    have = ort.get_available_providers() if available is None else list(available)
    present = detect(have)
    missing = missing_gpu(present)
    if args.require_gpu and missing:
        print(f"--require-gpu: missing execution provider(s) {', '.join(missing)} in onnxruntime "
              f"{ort.__version__} (available: {', '.join(have)})", file=sys.stderr)
        return 2

    info = benchlib.machine()
    gpu = gpu_name()
    print(f"machine: {benchlib.machine_line(info)}")
    print(f"onnxruntime.get_available_providers(): {have}")
    print(f"GPU: {gpu}")
    if missing:
        print(f"missing providers: {', '.join(missing)}: their cells read {MISSING!r}; CPU is measured")
    print()
    results: dict[str, Any] = {"machine": info, "available_providers": have, "gpu": gpu, "missing": missing,
                               "batches": batches, "encoders": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        work = Path(tmp_name)
        recording, data = work / "recording.wav", work / "data"
        if not args.no_agent:
            subprocess.run([str(EDGE_AGENT), "synth", str(data), "--machines", "fan", "--train-source", "40",
                            "--train-target", "5", "--test-per-class", "1", "--demo", str(recording),
                            "--demo-seconds", str(args.demo_seconds)], check=True, capture_output=True)
        for name in names:
            paths = {p: benchlib.model_path(name, p, args.models_dir) for p in precisions}
            row: dict[str, Any] = {"ort": measure_encoder(paths, present, batches, args.repeats)}
            if not args.no_agent and "fp32" in paths:
                row["agent"] = measure_agent(paths["fp32"], present, work, recording, data / "fan" / "train")
            results["encoders"][name] = row

    agent_note = ("" if args.no_agent else
                  f"; agent: edge-agent run, {args.demo_seconds:.0f} s file source, realtime, 10 s window, "
                  "5 s hop, fp32, providers [cpu] vs [cuda]")
    print(f"### GPU vs CPU, same run (median of {args.repeats} timed calls; \"x CPU\" = times faster than "
          f"the CPU provider, same model and batch{agent_note})\n")
    print(table(results, batches))
    benchlib.write_json("gpu", results, args.json_dir)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
