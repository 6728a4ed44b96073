"""The power spectrum of a framed signal as a two-stage split of its DFT, in MatMuls (ONNX-clean, any provider).

With n = row a + b (a frame as rows of `row` samples) and k = k1 + K1 k2 (K1 = n_fft / row):

    X[k1 + K1 k2] = sum_b e^(-2 pi i b k2 / row) [e^(-2 pi i b k1 / n_fft) sum_a w[n] x[n] e^(-2 pi i a k1 / K1)]

Stage 1 applies, for each b, the window and the twiddles (folded into one matrix) to the `window / row` rows of
a frame; stage 2 is one MatMul over b and the real and imaginary parts. When `row` divides the window and the
hop, a frame is consecutive rows of the signal laid out as rows, so stage 1 for every frame at once is one
grouped, strided convolution over the rows (a group per b, stride hop / row): no framing copies. It computes
the same products as a batched MatMul over framed rows, which ONNX Runtime ran ~1.8 ms slower per mn04 window
(the framing slices and transposes). Per frame this costs
row x 2 K1 x (window / row) + K1 x 2 row x 2 K2 multiply-adds (K2 = ceil(bins / K1)) where the direct DFT costs
window x 2 bins: 5-7x fewer for the EfficientAT and CED front-ends.

float32 rounding: stage 2 sums `row` terms of magnitude |X| / row, where the direct DFT sums `window` samples,
so next to a loud pure tone its error relative to the frame's loudest bin is a few times the direct DFT's
(export/mel_efficientat.py gives the numbers).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional


def split_matrices(window: np.ndarray, n_fft: int, row: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 (stage1 [row (b), 2 K1 (cos k1 | -sin k1), A (a)], stage2 [2 K2 (re | im), 2 row (b, yr | yi)]).

    stage1 = w[row a + b] e^(-2 pi i (a k1 / K1 + b k1 / n_fft)) gives Y[b, k1] = yr + i yi; stage 2 sums over b
    e^(-2 pi i b k2 / row) Y[b, k1] = (yr cos + yi sin) + i (yi cos - yr sin), bin k1 + K1 k2. The window's place
    inside the n_fft frame only turns the phase of each bin, which |X|^2 drops.
    """
    if n_fft % row or len(window) % row or len(window) > n_fft:
        raise ValueError(f"row {row} must divide n_fft {n_fft} and the window ({len(window)} <= n_fft)")
    k1_count, rows = n_fft // row, len(window) // row
    a, b, k1 = np.arange(rows), np.arange(row), np.arange(k1_count)
    phase = 2.0 * math.pi * (a[None, None, :] * k1[None, :, None] / k1_count
                             + b[:, None, None] * k1[None, :, None] / n_fft)
    weights = np.asarray(window, dtype=np.float64)[row * a[None, None, :] + b[:, None, None]]
    stage1 = np.concatenate([weights * np.cos(phase), -weights * np.sin(phase)], axis=1)
    theta = 2.0 * math.pi * np.outer(np.arange(-(-n_bins // k1_count)), b) / row
    cos, sin = np.cos(theta), np.sin(theta)
    real = np.stack([cos, sin], axis=2).reshape(cos.shape[0], 2 * row)
    imag = np.stack([-sin, cos], axis=2).reshape(cos.shape[0], 2 * row)
    return stage1, np.concatenate([real, imag], axis=0)


def split_power(signal: torch.Tensor, stage1: torch.Tensor, stage2: torch.Tensor, window: int, hop: int
                ) -> torch.Tensor:
    """signal [B, L] (frame t = samples hop t .. hop t + window - 1) -> |X|^2 [B, K1 K2 bins, T], bin-major."""
    row, rows = stage1.shape[0], stage1.shape[2]
    k1_count, k2_count = stage1.shape[1] // 2, stage2.shape[0] // 2
    if window != row * rows or hop % row:
        raise ValueError(f"window {window} and hop {hop} must be multiples of the row ({row})")
    batch, hop_rows = signal.shape[0], hop // row
    frames = (signal.shape[1] - window) // hop + 1
    used = (frames - 1) * hop_rows + rows  # the rows the frames read: the convolution gives exactly `frames`
    # [B, b, row index]: frame t's row a is column hop_rows t + a
    by_rows = signal[:, : used * row].reshape(batch, used, row).transpose(1, 2)
    # stage 1 for every frame: group b applies stage1[b] ((yr | yi) x k1 outputs, rows taps) to column b
    inner = functional.conv1d(by_rows, stage1.reshape(row * 2 * k1_count, 1, rows), stride=hop_rows, groups=row)
    # [B, b x (yr | yi) x k1, T] is [B, (b, yr | yi), k1 T] as stage 2 reads it
    outer = torch.matmul(stage2, inner.reshape(batch, 2 * row, k1_count * frames))  # [B, (re | im) x k2, k1 T]
    real, imag = outer[:, :k2_count], outer[:, k2_count:]
    return (real * real + imag * imag).reshape(batch, k2_count * k1_count, frames)
