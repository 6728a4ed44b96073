"""The power spectrum of a framed real signal as a two-stage split of its DFT (ONNX-clean, any provider).

With n = row a + b (a frame as rows of `row` samples) and k = k1 + K1 k2 (K1 = n_fft / row):

    X[k1 + K1 k2] = sum_b e^(-2 pi i b k2 / row) Y[b, k1]
    Y[b, k1] = e^(-2 pi i b k1 / n_fft) sum_a w[n] x[n] e^(-2 pi i a k1 / K1)

Stage 1 applies, for each b, the window and the twiddles (folded into one matrix) to the `window / row` rows of
a frame. When `row` divides the window and the hop, a frame is consecutive rows of the signal laid out as rows,
so stage 1 for every frame at once is one grouped, strided convolution over the rows (a group per b, stride
hop / row): no framing copies.

The signal is real, so the inner sum for K1 - k1 is the conjugate of the one for k1, and
Y[b, K1 - k1] = e^(-2 pi i b / row) conj(Y[b, k1]). Stage 1 therefore computes only k1 = 0 .. K1/2, and
stage 2, one MatMul over b and the real and imaginary parts, turns each such column into two sets of bins:
the direct ones, k1 + K1 k2, and the mirrored ones, (K1 - k1) + K1 k2 = sum_b e^(-2 pi i b (k2 + 1) / row)
conj(Y[b, k1]). The power comes out in that order, not by bin: `power_row_bins` names the bin of each row and
`rows_from_bins` re-indexes a matrix over bins (the mel filters) to match, so no gather or transpose reorders
the spectrum. Per frame this costs row x 2 (K1/2 + 1) x (window / row) + (K1/2 + 1) x 2 row x 4 K2
multiply-adds (K2 = ceil(bins / K1)); the split over all K1 columns (exporter 0.4.0) cost
row x 2 K1 x (window / row) + K1 x 2 row x 2 K2, and the direct DFT window x 2 bins.

float32 rounding: stage 2 sums `row` terms of magnitude |X| / row, where the direct DFT sums `window` samples,
so next to a loud pure tone its error relative to the frame's loudest bin is a few times the direct DFT's
(export/mel_efficientat.py gives the numbers).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional


def _check(window_length: int, n_fft: int, row: int) -> None:
    if n_fft % row or window_length % row or window_length > n_fft or (n_fft // row) % 2:
        raise ValueError(f"row {row} must divide n_fft {n_fft} an even number of times and the window "
                         f"({window_length} <= n_fft)")


def split_matrices(window: np.ndarray, n_fft: int, row: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 (stage1 [row (b), 2 H (cos k1 | -sin k1), A (a)], stage2 [2 x 2 K2 (re | im, k2, direct | mirror),
    2 row (b, yr | yi)]), H = K1/2 + 1 columns k1 = 0 .. K1/2.

    stage1 = w[row a + b] e^(-2 pi i (a k1 / K1 + b k1 / n_fft)) gives Y[b, k1] = yr + i yi. Stage 2's direct rows
    sum e^(-2 pi i b k2 / row) Y = (yr cos + yi sin) + i (yi cos - yr sin); its mirror rows sum
    e^(-2 pi i b (k2 + 1) / row) conj(Y) = (yr cos' - yi sin') - i (yi cos' + yr sin'). The window's place inside
    the n_fft frame only turns the phase of each bin, which |X|^2 drops.
    """
    _check(len(window), n_fft, row)
    k1_count, rows = n_fft // row, len(window) // row
    a, b, k1 = np.arange(rows), np.arange(row), np.arange(k1_count // 2 + 1)
    phase = 2.0 * math.pi * (a[None, None, :] * k1[None, :, None] / k1_count
                             + b[:, None, None] * k1[None, :, None] / n_fft)
    weights = np.asarray(window, dtype=np.float64)[row * a[None, None, :] + b[:, None, None]]
    stage1 = np.concatenate([weights * np.cos(phase), -weights * np.sin(phase)], axis=1)
    k2 = np.arange(-(-n_bins // k1_count))

    def by_b(first: np.ndarray, second: np.ndarray) -> np.ndarray:  # columns (b, yr | yi)
        return np.stack([first, second], axis=2).reshape(len(k2), 2 * row)

    direct, mirror = 2.0 * math.pi * np.outer(k2, b) / row, 2.0 * math.pi * np.outer(k2 + 1, b) / row
    cos, sin, cos_m, sin_m = np.cos(direct), np.sin(direct), np.cos(mirror), np.sin(mirror)
    real = np.stack([by_b(cos, sin), by_b(cos_m, -sin_m)], axis=1).reshape(2 * len(k2), 2 * row)
    imag = np.stack([by_b(-sin, cos), by_b(-sin_m, -cos_m)], axis=1).reshape(2 * len(k2), 2 * row)
    return stage1, np.concatenate([real, imag], axis=0)


def power_row_bins(n_fft: int, row: int, n_bins: int) -> np.ndarray:
    """The bin of each row `split_power` returns, -1 where the row repeats a bin another row holds.

    Rows are (k2, direct | mirror, k1 = 0 .. K1/2): direct k1 + K1 k2, mirror (K1 - k1) + K1 k2. The mirror of
    k1 = 0 is the next k2's direct k1 = 0 and that of k1 = K1/2 is its own direct bin: both are -1.
    """
    k1_count = n_fft // row
    half = k1_count // 2
    k1 = np.arange(half + 1)
    blocks = []
    for k2 in range(-(-n_bins // k1_count)):
        mirror = np.where((k1 == 0) | (k1 == half), -1, k1_count - k1 + k1_count * k2)
        blocks += [k1 + k1_count * k2, mirror]
    return np.concatenate(blocks)


def rows_from_bins(matrix: np.ndarray, n_fft: int, row: int, n_bins: int) -> np.ndarray:
    """A matrix over bins [M, any] re-indexed to the rows of a split computing `n_bins` bins [M, rows] (zero on
    repeated rows and on bins the matrix lacks)."""
    row_bins = power_row_bins(n_fft, row, n_bins)
    kept = (row_bins >= 0) & (row_bins < matrix.shape[1])
    out = np.zeros((matrix.shape[0], len(row_bins)), dtype=matrix.dtype)
    out[:, kept] = matrix[:, row_bins[kept]]
    return out


def split_power(signal: torch.Tensor, stage1: torch.Tensor, stage2: torch.Tensor, window: int, hop: int
                ) -> torch.Tensor:
    """signal [B, L] (frame t = samples hop t .. hop t + window - 1) -> |X|^2 [B, rows, T], rows as
    `power_row_bins` names them."""
    row, rows = stage1.shape[0], stage1.shape[2]
    columns, out_rows = stage1.shape[1] // 2, stage2.shape[0] // 2
    if window != row * rows or hop % row:
        raise ValueError(f"window {window} and hop {hop} must be multiples of the row ({row})")
    batch, hop_rows = signal.shape[0], hop // row
    frames = (signal.shape[1] - window) // hop + 1
    used = (frames - 1) * hop_rows + rows  # the rows the frames read: the convolution gives exactly `frames`
    # [B, b, row index]: frame t's row a is column hop_rows t + a
    by_rows = signal[:, : used * row].reshape(batch, used, row).transpose(1, 2)
    # stage 1 for every frame: group b applies stage1[b] ((yr | yi) x k1 outputs, rows taps) to column b
    inner = functional.conv1d(by_rows, stage1.reshape(row * 2 * columns, 1, rows), stride=hop_rows, groups=row)
    # [B, b x (yr | yi) x k1, T] is [B, (b, yr | yi), k1 T] as stage 2 reads it
    outer = torch.matmul(stage2, inner.reshape(batch, 2 * row, columns * frames))  # [B, (re | im) x rows, k1 T]
    real, imag = outer[:, :out_rows], outer[:, out_rows:]
    return (real * real + imag * imag).reshape(batch, out_rows * columns, frames)
