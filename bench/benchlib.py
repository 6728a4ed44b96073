"""Shared helpers of the bench/ scripts: machine description, timing statistics, tables, model files.

The bench scripts are run by hand (never in CI); each prints markdown tables and can write its raw
numbers as JSON. Timings are medians of repeated runs because the machine may be shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from export import EXPORTER_VERSION

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models" / "bench"  # /models/ is git-ignored
RESULTS_DIR = REPO / "bench" / "results"
# The real mn04 weights: $EDGE_ASD_WEIGHTS_DIR (as edge-export reads it), else ../shared/models beside the checkout.
WEIGHTS_DIR = Path(os.environ.get("EDGE_ASD_WEIGHTS_DIR") or REPO.parent / "shared" / "models")
MN04_CHECKPOINT = WEIGHTS_DIR / "efficientat" / "mn04_as_mAP_432.pt"
ENCODERS = ("mn04", "beats", "ced-tiny", "ced-mini", "ced-small", "ced-base")
PRECISIONS = ("fp32", "fp16", "int8")


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load and library versions of this run."""
    cpu = platform.processor() or ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"Model name:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
        # a VM's model name hides the generation ("AMD EPYC"); family and model tell Zen 4 (25) from Zen 5 (26)
        family, model = re.search(r"CPU family:\s*(\d+)", text), re.search(r"\nModel:\s*(\d+)", text)
        if family and model:
            cpu += f" (family {family.group(1)} model {model.group(1)})"
        flags = re.search(r"Flags:\s*(.+)", text)
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")
               if flags and f in flags.group(1).split()]
    except OSError:
        isa = []
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for package in ("onnxruntime", "torch", "hnswlib", "onnx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
                for i in threadpool_info()]
    except ImportError:
        blas = []
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1), "blas": blas,
            "load_1m": round(os.getloadavg()[0], 2), "kernel": platform.release(), "versions": versions,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items())
    blas = f" (BLAS: {', '.join(info['blas'])})" if info.get("blas") else ""
    return (f"{info['cpu']} ({', '.join(info['isa'])}), {info['cores']} cores, {info['mem_gib']} GiB; "
            f"{libs}{blas}; load(1m) at start {info['load_1m']}; {info['date_utc']}")


def timings(fn: Callable[[], object], repeats: int, warmup: int = 1, min_seconds: float = 0.0) -> np.ndarray:
    """Wall-clock seconds of `repeats` calls (more while min_seconds is not reached), after warm-up."""
    for _ in range(warmup):
        fn()
    out = []
    begin = time.perf_counter()
    while len(out) < repeats or time.perf_counter() - begin < min_seconds:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each call, the calls run one after another in every round, so that all of them share
    whatever the machine is doing at each moment (the ratios between them are from the same moments)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) * 1e3 for name, values in seconds.items()}


def print_against_official(title: str, results: dict[str, dict[str, float]], repeats: int,
                           official: str = "official (torch eager)") -> None:
    """results: variant -> {what: median ms}; one row per (variant, what) with its speed relative to `official`."""
    print(f"\n### {title} per 10 s window, batch 1, one thread, median of {repeats} interleaved calls\n")
    rows = [[variant, name, f"{value:.2f}", f"{ms[official] / value:.2f}x"]
            for variant, ms in results.items() for name, value in ms.items()]
    print(table(["variant", "what", "ms", "speed vs official"], rows))


def ort_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stats_ms(seconds: np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "n": int(ms.size)}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if value == 0 or 1e-3 <= abs(value) < 1e5:
                return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict[str, Any], results_dir: Path | None) -> None:
    if results_dir is None:
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"\n(raw numbers: {path})", file=sys.stderr)


def model_path(name: str, precision: str = "fp32", models_dir: Path = MODELS_DIR) -> Path:
    """Export NAME in `precision` into models_dir/<precision>/ unless this exporter version wrote it there already.

    mn04 uses the real checkpoint; the others random weights (speed does not depend on them).
    All blocks are exported (edge-export's default), so latency covers the whole encoder. A file an older exporter
    wrote (another front-end, other default layers) is exported again: a bench measures what a user would export.
    """
    out_dir = models_dir / precision
    path = out_dir / f"{name}.onnx"
    if path.is_file() and exporter_version(path) == EXPORTER_VERSION:
        return path
    from export.onnx_export import export_model  # torch only when an export is needed

    real = name == "mn04" and MN04_CHECKPOINT.is_file()
    result = export_model(name, out_dir, checkpoint=MN04_CHECKPOINT if real else None, random_init=not real,
                          fp16=precision == "fp16", quantize="int8" if precision == "int8" else None)
    for stale in out_dir.glob(f"{name}.random-seed*.pt"):
        stale.unlink()
    print(f"exported {path} ({precision}, {result.seconds:.0f} s, rel err "
          f"{result.max_rel_error if result.precision_rel_error is None else result.precision_rel_error})",
          file=sys.stderr)
    return result.path


def exporter_version(path: Path) -> str | None:
    """The exporter version recorded in an ONNX file's metadata (None if it has none)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.get_modelmeta().custom_metadata_map.get("exporter_version")


def add_common_arguments(parser: Any) -> None:
    parser.add_argument("--json-dir", type=Path, default=None,
                        help=f"write raw numbers as JSON here (e.g. {RESULTS_DIR.relative_to(REPO)})")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a bench's own mosquitto)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
