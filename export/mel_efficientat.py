"""The EfficientAT MobileNet front-end (models/preprocess.py AugmentMelSTFT in eval mode) as an ONNX-clean module.

waveform [B, S] at 32 kHz -> log-mel [B, 128, T]:
  pre-emphasis y[n] = x[n+1] - 0.97 x[n] (a 2-tap valid convolution: S-1 samples)
  STFT: n_fft 1024, symmetric Hann(800) centred in the 1024 frame, hop 320, center=True with
        reflect padding of 512 on both sides (torch.stft defaults)   -> T = 1 + (S-1) // 320
  power |X|^2; Kaldi mel banks (128 bins, 0 .. 15 kHz, Nyquist column zero); log(x + 1e-5); (x + 4.5) / 5

In eval mode the official code uses fmin = 0 and fmax = sr/2 - fmax_aug_range/2 = 16000 - 1000 = 15000 Hz.

Two formulations of the STFT, both plain Conv/MatMul/Reshape/Slice ops that run in onnxruntime on CPU, CUDA
and TensorRT (the ONNX STFT and DFT ops measured slower on ONNX Runtime's CPU kernels, docs/encoders.md):
- `fft` (default): a split of the 1024-point DFT into 32 x 32 (export/split_dft.py), n = 32 a + b,
  k = k1 + 32 k2. The signal is reflect-padded by win/2 = 400 (the window's zero margins are never padded), so
  frame t is samples 320 t .. 320 t + 799: 25 consecutive rows of 32 samples, 10 rows apart. Stage 1 is one
  grouped conv1d over the rows (a group per b, 25 taps, stride 10) for k1 = 0..16 (the signal is real);
  stage 2 one MatMul over b (cos and sin sums for k2 = 0..15) and a grouped 1x1 conv that forms, from each
  k1 column, bins k1 + 32 k2 and 32 k2 - k1. The power comes out in the split's row order and the mel filters
  are re-indexed to it. 0.13 GFLOP against the direct DFT's 1.53 per 10 s.
- `conv`: the direct DFT as a strided conv1d with windowed DFT bases (479 bins x 800 taps), the export of
  earlier releases (kept for comparison: `edge-export --stft conv`, `bench/stft_formulations.py`).
The mel filters are triangles: they are applied in bands of 16 filters, each a MatMul over the spectrum rows
its filters touch.

float32 rounding: the split's stage 2 adds 32 terms of magnitude |X| / 32 where the direct DFT adds 800
windowed samples, so next to a loud pure tone (a chirp's far bins) its log-mel error against a float64
reference is a few times the conv's and the official float32 torch.stft front-end's
(`bench/frontend_precision.py`); on broadband signals all three stay below 1e-4
(tests/export/test_mel_efficientat.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from export.split_dft import SplitMatrices, rows_from_bins, split_matrices, split_power

SAMPLE_RATE = 32000
N_FFT = 1024
WIN_LENGTH = 800
HOP_LENGTH = 320
N_MELS = 128
FMIN = 0.0
FMAX = 15000.0
PREEMPHASIS = 0.97
LOG_OFFSET = 1e-5
NORM_SHIFT = 4.5
NORM_SCALE = 5.0
STFT_METHODS = ("fft", "conv")
DEFAULT_STFT = "fft"
ROW = 32  # the fft split: n = ROW * a + b; ROW divides n_fft, the window and the hop
MEL_BAND = 16  # mel filters per banded MatMul


def kaldi_mel_scale(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = FMIN,
    fmax: float = FMAX,
) -> np.ndarray:
    """Triangular filters equally spaced on the Kaldi mel scale, float64 [n_mels, n_fft // 2 + 1].

    Kaldi evaluates the triangles at the n_fft/2 bins below Nyquist; the Nyquist column is zero
    (EfficientAT pads it on). fmax <= 0 counts down from Nyquist, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    if fmax <= 0.0:
        fmax += nyquist
    if not 0.0 <= fmin < fmax <= nyquist:
        raise ValueError(f"mel range {fmin}..{fmax} Hz does not fit 0..{nyquist} Hz")
    mel_low = float(kaldi_mel_scale(fmin))
    mel_step = (float(kaldi_mel_scale(fmax)) - mel_low) / (n_mels + 1)
    edges = mel_low + mel_step * np.arange(n_mels + 2, dtype=np.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = kaldi_mel_scale(sample_rate / n_fft * np.arange(n_fft // 2, dtype=np.float64))[None, :]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([banks, np.zeros((n_mels, 1))], axis=1)


def symmetric_hann(length: int) -> np.ndarray:
    """torch.hann_window(length, periodic=False) in float64."""
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(length, dtype=np.float64) / (length - 1))


def num_frames(samples: int) -> int:
    """Frames for a waveform of `samples` samples (pre-emphasis drops one, center=True adds one)."""
    return 1 + (samples - 1) // HOP_LENGTH


def fft_split_matrices(window: np.ndarray, n_bins: int) -> SplitMatrices:
    """The split DFT's two stages for this front-end (export/split_dft.py): rows of ROW samples, n_fft 1024."""
    return split_matrices(window, N_FFT, ROW, n_bins)


def mel_bands(mel: np.ndarray, size: int = MEL_BAND) -> list[tuple[int, int, int]]:
    """(first filter, first column, end column) of each band of `size` filters: the columns (spectrum rows) its
    filters touch."""
    bands = []
    for first in range(0, mel.shape[0], size):
        touched = np.flatnonzero(mel[first:first + size].any(axis=0))
        bands.append((first, int(touched[0]), int(touched[-1]) + 1))
    return bands


class MelEfficientAT(nn.Module):
    """waveform [B, S] float32 -> normalized log-mel [B, 128, 1 + (S-1)//320]; `stft`: "fft" or "conv"."""

    dft_bases: torch.Tensor
    mel_banks: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    combine: torch.Tensor

    def __init__(self, stft: str = DEFAULT_STFT) -> None:
        super().__init__()
        if stft not in STFT_METHODS:
            raise ValueError(f"stft {stft!r} is not one of {STFT_METHODS}")
        self.stft = stft
        mel = kaldi_mel_banks()
        used = np.flatnonzero(mel.any(axis=0))
        # FFT bins outside every mel triangle (0 Hz and above 15 kHz) are never computed.
        first, last = int(used[0]), int(used[-1]) + 1
        window = symmetric_hann(WIN_LENGTH)
        # The window sits centred in the n_fft frame: sample n of the window is sample n + offset.
        self.window_offset = (N_FFT - WIN_LENGTH) // 2
        if stft == "conv":
            bins = np.arange(first, last, dtype=np.float64)
            sample = np.arange(WIN_LENGTH, dtype=np.float64) + self.window_offset
            phase = 2.0 * math.pi * np.outer(bins, sample) / N_FFT
            bases = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window], axis=0)
            self.num_bins = last - first
            self.register_buffer("dft_bases", torch.from_numpy(bases[:, None, :]).float(), persistent=False)
            self.register_buffer("mel_banks", torch.from_numpy(mel[:, first:last]).float(), persistent=False)
            return
        # The split computes bins 0 .. last - 1 and a few above (the phase of the window's offset drops out of
        # |X|^2), in the order of its rows: the filters are re-indexed to those rows, not the spectrum to bins.
        split = fft_split_matrices(window, last)
        computed = rows_from_bins(mel[:, :last], N_FFT, ROW, last)
        self.bands = mel_bands(computed)
        for name, weights in split._asdict().items():
            self.register_buffer(name, torch.from_numpy(weights).float(), persistent=False)
        for index, (f, lo, hi) in enumerate(self.bands):
            self.register_buffer(f"mel_band_{index}", torch.from_numpy(computed[f:f + MEL_BAND, lo:hi]).float(),
                                 persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        emphasized = waveform[:, 1:] - PREEMPHASIS * waveform[:, :-1]
        if self.stft == "conv":
            padded = functional.pad(emphasized.unsqueeze(1), (N_FFT // 2, N_FFT // 2), mode="reflect")
            # Skip the zero-weighted window margins on both sides so exactly 1 + (S-1)//hop frames remain.
            trimmed = padded[:, :, self.window_offset : padded.shape[-1] - self.window_offset]
            spectrum = functional.conv1d(trimmed, self.dft_bases, stride=HOP_LENGTH)
            real, imag = spectrum[:, : self.num_bins], spectrum[:, self.num_bins :]
            mel = torch.matmul(self.mel_banks, real * real + imag * imag)
        else:
            # Reflect padding of n_fft/2 without the window's zero margins is reflect padding of win/2; on the right
            # only as far as the last frame reads: frame t is then samples 320 t .. 320 t + 799, with no slicing.
            length = int(emphasized.shape[-1])  # a constant in the export (fixed window; split_dft.split_power)
            right = WIN_LENGTH // 2 - length % HOP_LENGTH
            padded = functional.pad(emphasized.unsqueeze(1), (WIN_LENGTH // 2, right), mode="reflect")
            power = self._fft_power(padded[:, 0])
            mel = torch.cat([torch.matmul(self.get_buffer(f"mel_band_{i}"), power[:, lo:hi])
                             for i, (_, lo, hi) in enumerate(self.bands)], dim=1)
        return (torch.log(mel + LOG_OFFSET) + NORM_SHIFT) / NORM_SCALE

    def _fft_power(self, trimmed: torch.Tensor) -> torch.Tensor:
        """trimmed [B, L] (frame t = samples 320 t .. 320 t + 799) -> |X|^2 [B, 544 rows, T]: bins 0..479 (and
        some above) in the split's row order (export/split_dft.py power_row_bins)."""
        return split_power(trimmed, self.stage1, self.stage2, self.combine, WIN_LENGTH, HOP_LENGTH)
