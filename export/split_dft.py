"""The power spectrum of a framed real signal as a split of its DFT in convolutions and one MatMul (ONNX-clean,
any provider).

With n = row a + b (a frame as rows of `row` samples) and k = k1 + K1 k2 (K1 = n_fft / row):

    X[k1 + K1 k2] = sum_b e^(-2 pi i b k2 / row) Y[b, k1]
    Y[b, k1] = e^(-2 pi i b k1 / n_fft) sum_a w[n] x[n] e^(-2 pi i a k1 / K1)

Stage 1 applies, for each b, the window and the twiddles (folded into one matrix) to the `window / row` rows of
a frame. When `row` divides the window and the hop, a frame is consecutive rows of the signal laid out as rows,
so stage 1 for every frame at once is one grouped, strided convolution over the rows (a group per b, stride
hop / row): no framing copies. The signal is real, so the inner sum for K1 - k1 is the conjugate of the one for
k1, and stage 1 computes only k1 = 0 .. K1/2.

Stage 2 sums over b with real weights only: one MatMul gives C = sum_b cos(2 pi b k2 / row) Y and
S = sum_b sin(...) Y for the real and the imaginary part of Y alike (b is the only contracted axis). Then
C - iS is the direct bin k1 + K1 k2, and C + iS = sum_b e^(+2 pi i b k2 / row) Y the mirrored one: since
Y[b, K1 - k1] = e^(-2 pi i b / row) conj(Y[b, k1]), |C + iS| = |X[K1 k2 - k1]|. A grouped 1x1 convolution (a
group per k2, 4 x 4) forms the real and imaginary parts of both, and |.|^2 follows. The power comes out by row
(k2, mirror | direct, k1), not by bin: `power_row_bins` names the bin of each row and `rows_from_bins`
re-indexes a matrix over bins (the mel filters) to match, so no gather or transpose reorders the spectrum.

Per frame this costs row x 2 H x (window / row) + 2 K x row x 2 H + 16 K H multiply-adds (H = K1/2 + 1,
K = ceil(bins / K1) + 1); exporter 0.4.0's split over all K1 columns cost row x 2 K1 x (window / row) +
K1 x 2 row x 2 K2 (K2 = ceil(bins / K1)), the direct DFT window x 2 bins.

float32 rounding: stage 2 sums `row` terms of magnitude |X| / row, where the direct DFT sums `window` samples,
so next to a loud pure tone its error relative to the frame's loudest bin is a few times the direct DFT's
(export/mel_efficientat.py gives the numbers).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional

# Per k2, inputs (cos yr, cos yi, sin yr, sin yi) -> (mirror re, mirror im, direct re, direct im).
_COMBINE = np.array([[1, 0, 0, -1], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, -1, 0]], dtype=np.float64)


class SplitMatrices(NamedTuple):
    """float64 weights of the split: stage1 [row (b), 2 H (cos k1 | -sin k1), A (a)], stage2 [K (k2) x
    (cos | sin), row (b)], combine [4 K, 4, 1] (a group per k2)."""

    stage1: np.ndarray
    stage2: np.ndarray
    combine: np.ndarray


def split_matrices(window: np.ndarray, n_fft: int, row: int, n_bins: int) -> SplitMatrices:
    """The split's weights for a window (placed anywhere in the n_fft frame: its place only turns each bin's
    phase, which |X|^2 drops) computing bins 0 .. n_bins - 1 (and some above)."""
    if n_fft % row or len(window) % row or len(window) > n_fft or (n_fft // row) % 2:
        raise ValueError(f"row {row} must divide n_fft {n_fft} an even number of times and the window "
                         f"({len(window)} <= n_fft)")
    k1_count, rows = n_fft // row, len(window) // row
    a, b, k1 = np.arange(rows), np.arange(row), np.arange(k1_count // 2 + 1)
    phase = 2.0 * math.pi * (a[None, None, :] * k1[None, :, None] / k1_count
                             + b[:, None, None] * k1[None, :, None] / n_fft)
    weights = np.asarray(window, dtype=np.float64)[row * a[None, None, :] + b[:, None, None]]
    stage1 = np.concatenate([weights * np.cos(phase), -weights * np.sin(phase)], axis=1)
    k2_count = _k2_count(n_fft, row, n_bins)
    theta = 2.0 * math.pi * np.outer(np.arange(k2_count), b) / row
    stage2 = np.stack([np.cos(theta), np.sin(theta)], axis=1).reshape(2 * k2_count, row)
    return SplitMatrices(stage1, stage2, np.tile(_COMBINE, (k2_count, 1))[:, :, None])


def _k2_count(n_fft: int, row: int, n_bins: int) -> int:
    return -(-n_bins // (n_fft // row)) + 1  # one more k2 than the direct bins need: its mirror rows


def power_row_bins(n_fft: int, row: int, n_bins: int) -> np.ndarray:
    """The bin of each row `split_power` returns, -1 where the row repeats a bin another row holds or lies below 0.

    Rows are (k2, mirror | direct, k1 = 0 .. K1/2): mirror K1 k2 - k1, direct k1 + K1 k2. The mirror of k1 = 0 is
    its own direct bin and that of k1 = K1/2 the previous k2's direct bin: both are -1, as is every mirror row of
    k2 = 0.
    """
    k1_count = n_fft // row
    half = k1_count // 2
    k1 = np.arange(half + 1)
    blocks = []
    for k2 in range(_k2_count(n_fft, row, n_bins)):
        mirror = np.where((k1 == 0) | (k1 == half) | (k2 == 0), -1, k1_count * k2 - k1)
        blocks += [mirror, k1 + k1_count * k2]
    return np.concatenate(blocks)


def rows_from_bins(matrix: np.ndarray, n_fft: int, row: int, n_bins: int) -> np.ndarray:
    """A matrix over bins [M, any] re-indexed to the rows of a split computing `n_bins` bins [M, rows] (zero on
    repeated rows and on bins the matrix lacks)."""
    row_bins = power_row_bins(n_fft, row, n_bins)
    kept = (row_bins >= 0) & (row_bins < matrix.shape[1])
    out = np.zeros((matrix.shape[0], len(row_bins)), dtype=matrix.dtype)
    out[:, kept] = matrix[:, row_bins[kept]]
    return out


def split_power(signal: torch.Tensor, stage1: torch.Tensor, stage2: torch.Tensor, combine: torch.Tensor,
                window: int, hop: int) -> torch.Tensor:
    """signal [B, L] (frame t = samples hop t .. hop t + window - 1) -> |X|^2 [B, rows, T], rows as
    `power_row_bins` names them."""
    row, rows = stage1.shape[0], stage1.shape[2]
    columns, k2_count = stage1.shape[1] // 2, stage2.shape[0] // 2
    if window != row * rows or hop % row:
        raise ValueError(f"window {window} and hop {hop} must be multiples of the row ({row})")
    hop_rows = hop // row
    # int(): exports have a fixed window length (only the batch is dynamic), so the sizes below are constants in
    # the graph rather than Shape/Gather/Div chains run on every call
    length = int(signal.shape[1])
    frames = (length - window) // hop + 1
    used = (frames - 1) * hop_rows + rows  # the rows the frames read: the convolution gives exactly `frames`
    # [B, b, row index]: frame t's row a is column hop_rows t + a
    if length != used * row:  # no Slice where the signal is exactly the frames
        signal = signal[:, : used * row]
    # -1 for the batch: a constant shape (signal.shape[0] would add Shape/Gather/Concat ops)
    by_rows = signal.reshape(-1, used, row).transpose(1, 2)
    # stage 1 for every frame: group b applies stage1[b] ((yr | yi) x k1 outputs, rows taps) to column b
    inner = functional.conv1d(by_rows, stage1.reshape(row * 2 * columns, 1, rows), stride=hop_rows, groups=row)
    # [B, b x (yr | yi) x k1, T] is [B, b, (yr | yi) k1 T]: stage 2 contracts b alone
    sums = torch.matmul(stage2, inner.reshape(-1, row, 2 * columns * frames))  # [B, (k2, cos | sin), ...]
    # [B, (k2, cos | sin, yr | yi), k1 T] -> per k2 (mirror re, mirror im, direct re, direct im)
    parts = functional.conv1d(sums.reshape(-1, 4 * k2_count, columns * frames), combine, groups=k2_count)
    squares = (parts * parts).reshape(-1, 2 * k2_count, 2, columns * frames)
    return squares.sum(dim=2).reshape(-1, 2 * k2_count * columns, frames)
