"""Rational-ratio resampling with a polyphase windowed-sinc filter (numpy only).

The filter is a Kaiser-windowed sinc (beta 5, half length 10 * max(up, down) taps), the same design
as scipy.signal.resample_poly, so results agree with it to float rounding. Only the output samples
are computed: cost is output_length * taps_per_phase multiply-adds. `polyphase` computes any range of
outputs from a slice of the input; edge_agent.audio.stream_resample uses it to resample a live stream
block by block with the same filter and arithmetic (bit-identical to resampling the whole signal here).
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a mono float signal from rate_in to rate_out Hz; returns float32."""
    audio = np.asarray(audio, dtype=np.float32)
    up, down = ratio(rate_in, rate_out)
    if up == down:
        return audio
    n_in = audio.shape[0]
    n_out = -(-n_in * up // down)
    per_phase = phase_length(up, down)
    padded = np.zeros(per_phase + n_in + padding_after(up, down), np.float64)
    padded[per_phase:per_phase + n_in] = audio  # one buffer: fresh pages cost more than the arithmetic
    return polyphase(padded, -per_phase, 0, n_out, up, down)


def ratio(rate_in: int, rate_out: int) -> tuple[int, int]:
    """(up, down) in lowest terms; raises ValueError for a rate that is not positive."""
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive (got {rate_in} -> {rate_out})")
    common = gcd(rate_in, rate_out)
    return rate_out // common, rate_in // common


def phase_length(up: int, down: int) -> int:
    """Taps of one polyphase branch: output n reads this many input samples."""
    return -(-_lowpass(up, down)[0].shape[0] // up)


def padding_after(up: int, down: int) -> int:
    """Zeros that `polyphase` may read after the last input sample it needs (whole blocks, see _blocked_fir)."""
    per_phase = phase_length(up, down)
    span = -(-per_phase // down) * down
    return per_phase + down + 1 + 2 * span


def half_length(up: int, down: int) -> int:
    """Filter half length in taps at the upsampled rate: output n is centred on tap n * down + half_length."""
    return _lowpass(up, down)[1]


def newest_input(n: int, up: int, down: int) -> int:
    """Index of the latest input sample that output n depends on (its filter is centred on n * down / up)."""
    return (n * down + _lowpass(up, down)[1]) // up


def polyphase(padded: np.ndarray, first_index: int, n0: int, count: int, up: int, down: int) -> np.ndarray:
    """Outputs n0 .. n0+count-1 of the resampled signal, as float32.

    `padded` (float64) holds input samples from index `first_index` on (negative indices are the zeros
    before the signal), from the first sample that output n0 reads, through the last one that output
    n0+count-1 reads (`newest_input`), followed by at least `padding_after(up, down)` more values.
    The offline `resample` and the streaming `StreamResampler` both call this, so they agree.
    """
    half_len = _lowpass(up, down)[1]
    filters = _phase_filters(up, down)
    per_phase = filters[0][0].shape[0]
    span = -(-per_phase // down) * down
    # One strided view for all phases when outputs' windows do not overlap (made once: ~20 us a view).
    windows = sliding_window_view(padded, per_phase) if down >= per_phase else None
    out = np.empty(count, np.float32)  # float64 sums, rounded once on assignment
    for first in range(min(up, count)):
        # Output n uses input samples ending at i_max = (n*down + half_len) // up, with taps
        # h[r], h[r+up], ... where r = (n*down + half_len) % up. Outputs n = first + m*up share r.
        offset = (n0 + first) * down + half_len
        phase, newest = offset % up, offset // up
        kernel, band = filters[phase]
        todo = len(range(first, count, up))
        start = newest - first_index - (per_phase - 1)
        if start < 0:
            raise ValueError(f"output {n0 + first} reads input {newest - per_phase + 1}, before {first_index}")
        if windows is None:
            assert band is not None
            out[first::up] = _blocked_fir(padded, start, band, todo, down, span)
        else:
            # Windows `down` apart do not overlap: the strided view is read without a copy.
            rows = windows[start:start + todo * down:down]
            out[first::up] = rows @ kernel
    return out

def _blocked_fir(padded: np.ndarray, start: int, band: np.ndarray, count: int, down: int,
                 span: int) -> np.ndarray:
    """y[m] = sum_j kernel[j] * padded[start + m*down + j] for m < count, as two matrix products.

    When windows overlap (down < taps), a strided [count, taps] view makes numpy copy count*taps
    values first, which costs more than the products (measured in bench/encoders.py). Instead the
    input is cut into contiguous blocks of span = group*down samples: the `group` outputs of block i
    read only blocks i and i+1, so y = blocks[:-1] @ A + blocks[1:] @ B with banded A, B (`band`,
    from _phase_filters).
    """
    group = span // down
    rows = -(-count // group)
    blocks = padded[start:start + (rows + 1) * span].reshape(rows + 1, span)
    y = blocks[:-1] @ band[:span] + blocks[1:] @ band[span:]
    return y.reshape(-1)[:count]


@lru_cache(maxsize=16)
def _phase_filters(up: int, down: int) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    """Per phase r: the time-reversed taps h[r], h[r+up], ... (right-aligned in per_phase) and, when
    outputs' windows overlap (down < per_phase), the banded matrix of _blocked_fir. Cached: a stream
    resampler computes a few outputs per block and would otherwise rebuild them every call."""
    taps = _lowpass(up, down)[0]
    per_phase = -(-taps.shape[0] // up)
    span = -(-per_phase // down) * down
    group = span // down
    out = []
    for phase in range(up):
        phase_taps = taps[phase::up]
        kernel = np.zeros(per_phase, np.float64)
        kernel[per_phase - phase_taps.shape[0]:] = phase_taps[::-1]
        kernel.flags.writeable = False
        band = None
        if down < per_phase:
            band = np.zeros((2 * span, group), np.float64)
            for g in range(group):
                band[g * down:g * down + per_phase, g] = kernel
            band.flags.writeable = False
        out.append((kernel, band))
    return tuple(out)


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
