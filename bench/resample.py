"""Resampler cost per 10 s window: the current edge_agent.audio.resample against an earlier git revision.

    .venv/bin/python bench/resample.py [--baseline 4cebf07] [--json-dir bench/results]
    .venv/bin/python bench/resample.py --stream [--json-dir bench/results]   # needs `pip install soxr`

The baseline module is read with `git show REV:edge_agent/resample.py` and imported from a temp
file, so before/after numbers come from one process, calls interleaved (old, new, old, ...) to
share whatever load the machine has. Both are checked against each other (max abs difference).
BLAS threads are limited with threadpoolctl: 1 (one core) and all cores.

--stream compares, in one process, edge_agent.audio.stream_resample.StreamResampler with python-soxr's
ResampleStream (HQ and VHQ), both fed 10 s of audio in 0.1 s blocks on one thread (calls interleaved),
and the offline resample of the whole 10 s. Accuracy is measured against float64 references:
  - sweep: a linear chirp from 20 Hz to 0.8 x the lower Nyquist, whose exact value at each output time is
    known; SNR and max |error| on the middle 8 s (after aligning by the best integer lag, reported).
  - edge of band: the same at 0.9 x the lower Nyquist (the filters differ most at the top of the band).
  - leak: downsampling, a tone at 1.25 x the output Nyquist must vanish (output / input RMS in dB);
    upsampling, a tone at 0.45 x the input rate must make no images above the input Nyquist (image / tone).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
from threadpoolctl import threadpool_limits

from edge_agent.audio.resample import resample
from edge_agent.audio.stream_resample import StreamResampler

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


STREAM_PAIRS = ((48_000, 32_000), (48_000, 16_000), (16_000, 32_000))
BLOCK_SECONDS = 0.1
SECONDS = 10


def _ours_stream(rate_in: int, rate_out: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(audio: np.ndarray) -> np.ndarray:
        rs = StreamResampler(rate_in, rate_out)
        block = round(BLOCK_SECONDS * rate_in)
        parts = [rs.process(audio[i:i + block]) for i in range(0, audio.shape[0], block)]
        return np.concatenate([*parts, rs.flush()])
    return run


def _ours_offline(rate_in: int, rate_out: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(audio: np.ndarray) -> np.ndarray:
        return resample(audio, rate_in, rate_out)
    return run


def _soxr_stream(rate_in: int, rate_out: int, quality: str) -> Callable[[np.ndarray], np.ndarray]:
    import soxr

    def run(audio: np.ndarray) -> np.ndarray:
        rs = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=quality)
        block = round(BLOCK_SECONDS * rate_in)
        starts = range(0, audio.shape[0], block)
        parts = [rs.resample_chunk(audio[i:i + block], last=i + block >= audio.shape[0]) for i in starts]
        return np.concatenate(parts)
    return run


def _chirp(t: np.ndarray, f1: float) -> np.ndarray:
    f0 = 20.0
    return 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * SECONDS)))


def _accuracy(fn: Callable[[np.ndarray], np.ndarray], rate_in: int, rate_out: int, top: float) -> dict[str, float]:
    """SNR (dB) and max |error| of a chirp up to `top` x the lower Nyquist, against its exact float64 samples."""
    f1 = top * min(rate_in, rate_out) / 2
    x = _chirp(np.arange(SECONDS * rate_in) / rate_in, f1).astype(np.float32)
    ref = _chirp(np.arange(SECONDS * rate_out) / rate_out, f1)
    y = fn(x).astype(np.float64)
    mid = slice(rate_out, (SECONDS - 1) * rate_out)
    best: dict[str, float] = {}
    for lag in range(-64, 65):  # soxr and ours both compensate their delay: expect lag 0
        got = y[mid.start + lag:mid.stop + lag]
        if got.shape[0] != ref[mid].shape[0]:
            continue
        err = got - ref[mid]
        snr = 10 * np.log10(np.sum(ref[mid] ** 2) / max(np.sum(err**2), 1e-300))
        if not best or snr > best["snr_db"]:
            best = {"snr_db": float(snr), "max_err": float(np.abs(err).max()), "lag": lag}
    return best


def _leak(fn: Callable[[np.ndarray], np.ndarray], rate_in: int, rate_out: int) -> float:
    t = np.arange(SECONDS * rate_in) / rate_in
    if rate_out < rate_in:  # a tone above the output Nyquist must be removed, not aliased
        x = (0.5 * np.sin(2 * np.pi * 1.25 * rate_out / 2 * t)).astype(np.float32)
        y = fn(x)[rate_out:(SECONDS - 1) * rate_out]
        return float(20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2)) / (0.5 / np.sqrt(2))))
    x = (0.5 * np.sin(2 * np.pi * 0.45 * rate_in * t)).astype(np.float32)  # images appear above rate_in / 2
    y = fn(x)[rate_out:(SECONDS - 1) * rate_out].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.shape[0]))) ** 2
    freqs = np.fft.rfftfreq(y.shape[0], 1 / rate_out)
    image = spectrum[freqs > rate_in / 2].sum()
    return float(10 * np.log10(image / spectrum.sum()))


def stream_main(args: argparse.Namespace, info: dict[str, Any]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import soxr

    print(f"soxr {soxr.__version__} (libsoxr {getattr(soxr, '__libsoxr_version__', '?')}); "
          f"CPU flags checked: {', '.join(info['isa']) or 'none of avx2/avx512'}; {BLOCK_SECONDS} s blocks, "
          "1 BLAS thread\n", flush=True)
    rows: list[list[object]] = []
    results: dict[str, Any] = {"machine": info, "block_seconds": BLOCK_SECONDS, "pairs": []}
    with threadpool_limits(1):
        for rate_in, rate_out in STREAM_PAIRS:
            fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
                "ours stream": _ours_stream(rate_in, rate_out),
                "soxr HQ stream": _soxr_stream(rate_in, rate_out, "HQ"),
                "soxr VHQ stream": _soxr_stream(rate_in, rate_out, "VHQ"),
                "ours offline (whole 10 s)": _ours_offline(rate_in, rate_out),
            }
            audio = np.random.default_rng(0).standard_normal(SECONDS * rate_in).astype(np.float32) * 0.1
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn(audio)  # warm-up (filter design, caches)
            for _ in range(args.repeats):
                for name, fn in fns.items():  # interleaved: the same load for all
                    t0 = time.perf_counter()
                    fn(audio)
                    times[name].append(time.perf_counter() - t0)
            ours_ms = float(np.median(times["ours stream"]) * 1e3)
            for name, fn in fns.items():
                ms = float(np.median(times[name]) * 1e3)
                sweep, top = _accuracy(fn, rate_in, rate_out, 0.8), _accuracy(fn, rate_in, rate_out, 0.9)
                leak = _leak(fn, rate_in, rate_out)
                entry = {"rate_in": rate_in, "rate_out": rate_out, "resampler": name, "median_ms": ms,
                         "min_ms": float(np.min(times[name]) * 1e3), "sweep_0.8": sweep, "sweep_0.9": top,
                         "leak_db": leak}
                results["pairs"].append(entry)
                rows.append([f"{rate_in} -> {rate_out}", name, f"{ms:.2f}", f"{ms / ours_ms:.2f}x",
                             f"{sweep['snr_db']:.1f}", f"{sweep['max_err']:.1e}", f"{top['snr_db']:.1f}",
                             f"{top['max_err']:.1e}", f"{leak:.1f}", sweep["lag"]])
    print(f"### streaming resample of {SECONDS} s of audio in {BLOCK_SECONDS} s blocks, 1 thread\n")
    print(benchlib.table(["rates", "resampler", "ms / 10 s (median)", "time / ours stream",
                          "sweep SNR dB (<=0.8 Nyq)", "max err", "SNR dB (<=0.9 Nyq)", "max err (0.9)",
                          "stopband leak dB", "lag"], rows))
    benchlib.write_json("resample_stream", results, args.json_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="4cebf07", help="git revision of the old resample.py")
    parser.add_argument("--stream", action="store_true",
                        help="compare the stream resampler with python-soxr (speed and accuracy) instead")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    if args.stream:
        stream_main(args, info)
        return
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
