"""Resampler cost per 10 s window: the current edge_agent.audio.resample against an earlier git revision.

    .venv/bin/python bench/resample.py [--baseline 4cebf07] [--json-dir bench/results]

The baseline module is read with `git show REV:edge_agent/resample.py` and imported from a temp
file, so before/after numbers come from one process, calls interleaved (old, new, old, ...) to
share whatever load the machine has. Both are checked against each other (max abs difference).
BLAS threads are limited with threadpoolctl: 1 (one core) and all cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
from threadpoolctl import threadpool_limits

from edge_agent.audio.resample import resample

PAIRS = ((48_000, 32_000), (48_000, 16_000), (16_000, 32_000), (44_100, 16_000), (44_100, 32_000))


def load_baseline(rev: str, tmp: Path) -> Any:
    for where in ("edge_agent/audio/resample.py", "edge_agent/resample.py"):  # the file moved with the packages
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], cwd=benchlib.REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = tmp / "resample_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("resample_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="4cebf07", help="git revision of the old resample.py")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    rows, results = [], {"machine": info, "baseline": args.baseline, "pairs": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = load_baseline(args.baseline, Path(tmp))
        for threads in sorted({1, os.cpu_count() or 1}):
            with threadpool_limits(threads):
                for rate_in, rate_out in PAIRS:
                    audio = np.random.default_rng(0).standard_normal(10 * rate_in).astype(np.float32) * 0.1
                    diff = float(np.abs(old.resample(audio, rate_in, rate_out)
                                        - resample(audio, rate_in, rate_out)).max())
                    times: dict[str, list[float]] = {"old": [], "new": []}
                    for _ in range(args.repeats):
                        for name, fn in (("old", old.resample), ("new", resample)):
                            t0 = time.perf_counter()
                            fn(audio, rate_in, rate_out)
                            times[name].append(time.perf_counter() - t0)
                    entry = {"threads": threads, "rate_in": rate_in, "rate_out": rate_out, "max_abs_diff": diff,
                             **{f"{k}_median_ms": float(np.median(v) * 1e3) for k, v in times.items()},
                             **{f"{k}_min_ms": float(np.min(v) * 1e3) for k, v in times.items()}}
                    results["pairs"].append(entry)
                    rows.append([threads, f"{rate_in} -> {rate_out}", entry["old_median_ms"], entry["new_median_ms"],
                                 entry["old_min_ms"], entry["new_min_ms"],
                                 f"{entry['old_median_ms'] / entry['new_median_ms']:.2f}x", f"{diff:.2g}"])
    print(f"### resample of one 10 s clip: {args.baseline} vs current (ms)\n")
    print(benchlib.table(["BLAS threads", "rates", "old median", "new median", "old min", "new min", "speed-up",
                          "max |old - new|"], rows))
    benchlib.write_json("resample", results, args.json_dir)


if __name__ == "__main__":
    main()
