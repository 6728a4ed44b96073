"""Per-encoder latency of one 10 s window, stage by stage, and what limits it.

    .venv/bin/python bench/encoders.py [--encoders mn04,ced-tiny] [--refs 10000] [--json-dir bench/results]

Tables:
  1. stages per window (batch 1): resample from a 48 kHz capture + crop, encoder (ONNX Runtime fp32,
     front-end inside), kNN search alone, scoring (search + ld-domain normalizer + layer mean) against
     a 10k-ref source bank and a 10-ref target bank, publish (score payload + JSON + JSONL append);
     real-time factor = pipeline time / 10 s.
  2. encoder: ONNX Runtime fp32/fp16/int8 vs PyTorch eager, 1 thread vs all cores, batch 1.
  3. FLOPs per window (torch.utils.flop_counter on the PyTorch model: conv, matmul, attention;
     2 FLOPs per multiply-add; the DFT front-ends are matmuls/convs and are counted) and the share of
     this CPU's float32 matmul peak (torch.mm 4096^3, measured here) the ONNX encoder reaches.

mn04 uses the real EfficientAT checkpoint; BEATs and CED random weights (speed does not depend on
them). Models are exported on first use into models/bench/<precision>/ (git-ignored).
The banks are clustered random vectors of each layer's dimension (search cost depends on N and D).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
from threadpoolctl import threadpool_limits

from edge_agent.agent.payloads import AlertContext, score_payload
from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import fit_to_window
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer

CAPTURE_RATE = 48_000
WINDOW_SECONDS = 10.0
TARGET_REFS = 10


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """Refs around `clusters` centres with per-cluster spread: a stand-in for machine-sound embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    spread = rng.uniform(0.2, 0.6, clusters).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return centres[which] + spread[which, None] * rng.standard_normal((n, dim)).astype(np.float32)


def capture(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * CAPTURE_RATE)) / CAPTURE_RATE
    return (0.1 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def build_scorer(enc: Encoder, n_refs: int) -> tuple[BankScorer, float]:
    layers = enc.info.default_layers
    src = {layer: clustered(n_refs, enc.info.dim(layer), i) for i, layer in enumerate(layers)}
    tgt = {layer: clustered(TARGET_REFS, enc.info.dim(layer), 100 + i) for i, layer in enumerate(layers)}
    bank = MemoryBank(enc.info, {"source": src, "target": tgt})
    t0 = time.perf_counter()
    scorer = BankScorer.fit(bank, ScoringConfig(layers=layers))
    return scorer, time.perf_counter() - t0


def stage_times(name: str, enc: Encoder, scorer: BankScorer, repeats: int, out_file: Any) -> dict[str, Any]:
    audio = capture(WINDOW_SECONDS)
    window = fit_to_window(resample(audio, CAPTURE_RATE, enc.info.sample_rate), enc.info.window_samples)
    emb = enc.embed(window[None])
    layers = scorer.layers
    query = {layer: emb[layer] for layer in layers}
    # The same query point near the bank, as a normal window would be.
    for layer in layers:
        query[layer] = scorer.bank.get(layer, "source")[:1] + 0.01
    ctx = AlertContext(node="bench", source="s", model=enc.model_id, bank="b" * 16, threshold=1.0)

    def do_knn() -> None:
        for layer in layers:
            norm = scorer.normalizers[layer]
            norm.bank.source.query(query[layer], 1)
            if norm.bank.target is not None:
                norm.bank.target.query(query[layer], 1)

    def do_publish() -> None:
        line = json.dumps(score_payload(ctx, time.time(), 0.5, 12.3), separators=(",", ":"))
        out_file.write(line + "\n")
        out_file.flush()

    fns = {
        "resample": lambda: fit_to_window(resample(audio, CAPTURE_RATE, enc.info.sample_rate),
                                          enc.info.window_samples),
        "encoder": lambda: enc.embed(window[None]),
        "knn": do_knn,
        "score": lambda: scorer.score(query),
        "publish": do_publish,
    }
    out = {stage: benchlib.stats_ms(benchlib.timings(fn, repeats, warmup=2)) for stage, fn in fns.items()}
    around = sum(out[s]["median_ms"] for s in ("resample", "score", "publish"))
    out["around_encoder_ms"] = around
    out["around_share"] = around / out["encoder"]["median_ms"]
    out["rtf"] = (around + out["encoder"]["median_ms"]) / (WINDOW_SECONDS * 1e3)
    return out


def ort_ms(path: Path, threads: int, repeats: int) -> dict[str, float]:
    enc = Encoder(path, providers=("cpu",), intra_op_threads=threads)
    window = np.random.default_rng(0).standard_normal((1, enc.info.window_samples)).astype(np.float32) * 0.1
    return benchlib.stats_ms(benchlib.timings(lambda: enc.embed(window), repeats, warmup=2))


def torch_model(name: str) -> Any:
    from export.registry import family_for

    family = family_for(name)
    layers = family.default_exported_layers(name)
    ckpt = benchlib.MN04_CHECKPOINT if name == "mn04" else None
    return family.build(name, layers, "time-mean", ckpt, 0).eval()


def torch_ms(model: Any, samples: int, threads: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, samples)).astype(np.float32) * 0.1)

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return benchlib.stats_ms(benchlib.timings(run, repeats, warmup=2))


def torch_flops(model: Any, samples: int) -> tuple[float, float]:
    """(FLOPs per window, of which in the front-end submodule)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, samples))
    front = sum(v for key, counts in counter.get_flop_counts().items() if key.endswith(".frontend")
                for v in counts.values())
    return float(counter.get_total_flops()), float(front)


def matmul_peaks(threads: int, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5) -> dict[str, float]:
    """float32 GFLOP/s of square n x n x n matrix products on `threads` threads, best size of `sizes`
    (median of repeats each), three ways: torch.mm (MKL/oneDNN), numpy (OpenBLAS) and a one-node ONNX
    MatMul in ONNX Runtime (MLAS). The best of all is this CPU's measured peak."""
    out = {"torch": 0.0, "numpy": 0.0, "onnxruntime": 0.0}
    for n in sizes:
        for key, value in _matmul_gflops(n, threads, repeats).items():
            out[key] = max(out[key], value)
    out["peak"] = max(out.values())
    return out


def _matmul_gflops(n: int, threads: int, repeats: int) -> dict[str, float]:
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    flop = 2 * n**3
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
                              [onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = {"torch": flop / np.median(benchlib.timings(lambda: torch.mm(ta, tb), repeats)) / 1e9,
           "onnxruntime": flop / np.median(benchlib.timings(lambda: session.run(None, {"a": a}), repeats)) / 1e9}
    with threadpool_limits(threads):
        out["numpy"] = flop / np.median(benchlib.timings(lambda: a @ b, repeats)) / 1e9
    return out


def frontend_share(path: Path, threads: int, runs: int = 5) -> float:
    """Share of ONNX Runtime node time spent in the front-end (nodes under /frontend/), from ORT's profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        samples = int(session.get_modelmeta().custom_metadata_map["window_samples"])
        window = np.random.default_rng(0).standard_normal((1, samples)).astype(np.float32) * 0.1
        for _ in range(runs):
            session.run(None, {"waveform": window})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    front = sum(e["dur"] for e in nodes if e["name"].startswith("/frontend/"))
    return front / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default=",".join(benchlib.ENCODERS))
    parser.add_argument("--refs", type=int, default=10_000, help="source refs in the bank per layer")
    parser.add_argument("--skip-precisions", action="store_true", help="fp32 only in table 2")
    parser.add_argument("--stages-only", action="store_true", help="table 1 only")
    parser.add_argument("--print-json", type=Path, default=None, help="re-print the tables of a saved run")
    parser.add_argument("--remeasure-peak", action="store_true", help="with --print-json: measure the matmul "
                        "peak again and store it in that file")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    names = [n for n in args.encoders.split(",") if n]
    cores = os.cpu_count() or 1
    if args.print_json:
        saved = json.loads(args.print_json.read_text())
        if args.remeasure_peak:
            saved["matmul_gflops"] = {t: matmul_peaks(t) for t in sorted({1, cores})}
            saved["peak_gflops"] = {t: p["peak"] for t, p in saved["matmul_gflops"].items()}
            print_peaks(saved["matmul_gflops"])
            args.print_json.write_text(json.dumps(saved, indent=1) + "\n")
        saved["peak_gflops"] = {int(k): v for k, v in saved["peak_gflops"].items()}
        print_tables(saved, cores)
        return
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n")
    results: dict[str, Any] = {"machine": info, "refs": args.refs, "encoders": {}}

    peaks = {t: matmul_peaks(t) for t in sorted({1, cores})}
    results["matmul_gflops"] = peaks
    results["peak_gflops"] = {t: p["peak"] for t, p in peaks.items()}
    print_peaks(peaks)

    precisions = ("fp32",) if args.skip_precisions else benchlib.PRECISIONS
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "scores.jsonl", "a") as out_file:
        for name in names:
            paths = {p: benchlib.model_path(name, p) for p in precisions}
            enc = Encoder(paths["fp32"], providers=("cpu",), intra_op_threads=1)
            scorer, fit_s = build_scorer(enc, args.refs)
            row: dict[str, Any] = {"layers": list(scorer.layers),
                                   "dims": [enc.info.dim(layer) for layer in scorer.layers],
                                   "search": {layer: scorer.normalizers[layer].bank.source.kind
                                              for layer in scorer.layers},
                                   "scorer_fit_s": fit_s}
            with threadpool_limits(1):  # one core: numpy's BLAS too, not only ONNX Runtime
                row["stages_1thread"] = stage_times(name, enc, scorer, args.repeats, out_file)
            del scorer
            if args.stages_only:
                results["encoders"][name] = row
                continue
            model = torch_model(name)
            samples = enc.info.window_samples
            row["flops"], row["frontend_flops"] = torch_flops(model, samples)
            row["frontend_time_share"] = {str(t): frontend_share(paths["fp32"], t) for t in sorted({1, cores})}
            row["ort"] = {p: {str(t): ort_ms(path, t, args.repeats) for t in sorted({1, cores})}
                          for p, path in paths.items()}
            row["torch"] = {str(t): torch_ms(model, samples, t, args.repeats) for t in sorted({1, cores})}
            del model
            results["encoders"][name] = row
            print(f"done {name}", flush=True)

    print_tables(results, cores)
    benchlib.write_json("encoders", results, args.json_dir)


def print_peaks(peaks: dict[int, dict[str, float]]) -> None:
    for t, p in peaks.items():
        print(f"float32 matmul (best of 1024^3, 2048^3, 4096^3), {t} thread(s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in p.items()) + " GFLOP/s")
    print()


def print_tables(results: dict[str, Any], cores: int) -> None:
    enc = results["encoders"]
    print(f"\n### Stages per 10 s window, batch 1, one core (1 ORT and 1 BLAS thread), {results['refs']} "
          "source refs\n")
    rows = []
    for name, r in enc.items():
        s = r["stages_1thread"]
        rows.append([name, ", ".join(f"{layer} ({d})" for layer, d in zip(r["layers"], r["dims"], strict=True)),
                     *(f"{s[k]['median_ms']:.3g} / {s[k]['p95_ms']:.3g}"
                       for k in ("resample", "encoder", "knn", "score", "publish")),
                     f"{100 * s['around_share']:.1f} %", f"{s['rtf']:.4f}"])
    print(benchlib.table(["encoder", "scored layers (dim)", "resample 48k ms (med / p95)",
                          "encoder ms", "kNN search ms", "score ms (search + ld-domain)", "publish ms",
                          "around / encoder", "RTF"], rows))

    enc = {name: r for name, r in enc.items() if "ort" in r}
    if not enc:
        return
    print("\n### Encoder latency per window (median ms, batch 1): ONNX Runtime vs PyTorch eager\n")
    threads = sorted({1, cores})
    headers = ["encoder"]
    for t in threads:
        headers += [f"torch {t}t", *(f"ORT {p} {t}t" for p in next(iter(enc.values()))["ort"]),
                    f"ORT fp32 speed-up {t}t"]
    rows = []
    for name, r in enc.items():
        row: list[object] = [name]
        for t in threads:
            tm = r["torch"][str(t)]["median_ms"]
            row.append(tm)
            row += [r["ort"][p][str(t)]["median_ms"] for p in r["ort"]]
            row.append(f"{tm / r['ort']['fp32'][str(t)]['median_ms']:.2f}x")
        rows.append(row)
    print(benchlib.table(headers, rows))

    print("\n### FLOPs per window and share of the float32 matmul peak (ORT fp32)\n")
    rows = []
    for name, r in enc.items():
        front = f"{100 * r['frontend_flops'] / r['flops']:.1f} % / " + " / ".join(
            f"{100 * v:.0f} %" for v in r["frontend_time_share"].values()) if "frontend_flops" in r else ""
        row = [name, r["flops"] / 1e9, front]
        for t in threads:
            ms = r["ort"]["fp32"][str(t)]["median_ms"]
            gflops = r["flops"] / (ms / 1e3) / 1e9
            row += [gflops, f"{100 * gflops / results['peak_gflops'][t]:.1f} %"]
        rows.append(row)
    headers = ["encoder", "GFLOP / window", "front-end: FLOPs / ORT time " + " / ".join(f"{t}t" for t in threads)]
    for t in threads:
        headers += [f"GFLOP/s {t}t", f"of peak {t}t"]
    print(benchlib.table(headers, rows))


if __name__ == "__main__":
    main()
