"""Rational-ratio resampling with a polyphase windowed-sinc filter (numpy only).

The filter is a Kaiser-windowed sinc (beta 5, half length 10 * max(up, down) taps), the same design
as scipy.signal.resample_poly, so results agree with it to float rounding. Only the output samples
are computed: cost is output_length * taps_per_phase multiply-adds.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a mono float signal from rate_in to rate_out Hz; returns float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive (got {rate_in} -> {rate_out})")
    if rate_in == rate_out:
        return audio
    common = gcd(rate_in, rate_out)
    up, down = rate_out // common, rate_in // common
    taps, half_len = _lowpass(up, down)
    n_in = audio.shape[0]
    n_out = -(-n_in * up // down)
    per_phase = -(-taps.shape[0] // up)
    # Blocked matrix products need the input in whole blocks of `span` samples (see _blocked_fir).
    span = -(-per_phase // down) * down
    tail = per_phase + down + 1 + 2 * span
    padded = np.zeros(per_phase + n_in + tail, np.float64)
    padded[per_phase:per_phase + n_in] = audio  # one buffer: fresh pages cost more than the arithmetic
    windows = sliding_window_view(padded, per_phase)
    out = np.empty(n_out, np.float32)  # float64 sums, rounded once on assignment
    for first in range(min(up, n_out)):
        # Output n uses input samples ending at i_max = (n*down + half_len) // up, with taps
        # h[r], h[r+up], ... where r = (n*down + half_len) % up. Outputs n = first + m*up share r.
        offset = first * down + half_len
        phase, newest = offset % up, offset // up
        phase_taps = taps[phase::up]
        kernel = np.zeros(per_phase, np.float64)
        kernel[per_phase - phase_taps.shape[0]:] = phase_taps[::-1]
        count = len(range(first, n_out, up))
        start = newest + per_phase - (per_phase - 1)
        if down < per_phase:
            out[first::up] = _blocked_fir(padded, start, kernel, count, down, span)
        else:
            # Windows `down` apart do not overlap: the strided view is read without a copy.
            rows = windows[start:start + count * down:down]
            out[first::up] = rows @ kernel
    return out


def _blocked_fir(padded: np.ndarray, start: int, kernel: np.ndarray, count: int, down: int,
                 span: int) -> np.ndarray:
    """y[m] = sum_j kernel[j] * padded[start + m*down + j] for m < count, as two matrix products.

    When windows overlap (down < taps), a strided [count, taps] view makes numpy copy count*taps
    values first, which costs more than the products (measured in bench/encoders.py). Instead the
    input is cut into contiguous blocks of span = group*down samples: the `group` outputs of block i
    read only blocks i and i+1, so y = blocks[:-1] @ A + blocks[1:] @ B with banded A, B.
    """
    group = span // down
    rows = -(-count // group)
    blocks = padded[start:start + (rows + 1) * span].reshape(rows + 1, span)
    band = np.zeros((2 * span, group), np.float64)
    for g in range(group):
        band[g * down:g * down + kernel.shape[0], g] = kernel
    y = blocks[:-1] @ band[:span] + blocks[1:] @ band[span:]
    return y.reshape(-1)[:count]


@lru_cache(maxsize=16)
def _lowpass(up: int, down: int) -> tuple[np.ndarray, int]:
    max_rate = max(up, down)
    half_len = 10 * max_rate
    numtaps = 2 * half_len + 1
    cutoff = 1.0 / max_rate  # relative to Nyquist
    n = np.arange(numtaps) - half_len
    taps = cutoff * np.sinc(cutoff * n) * np.kaiser(numtaps, 5.0)
    taps *= up / taps.sum()
    return taps, half_len
