"""The EfficientAT MobileNet front-end (models/preprocess.py AugmentMelSTFT in eval mode) as an ONNX-clean module.

waveform [B, S] at 32 kHz -> log-mel [B, 128, T]:
  pre-emphasis y[n] = x[n+1] - 0.97 x[n] (a 2-tap valid convolution: S-1 samples)
  STFT: n_fft 1024, symmetric Hann(800) centred in the 1024 frame, hop 320, center=True with
        reflect padding of 512 on both sides (torch.stft defaults)   -> T = 1 + (S-1) // 320
  power |X|^2; Kaldi mel banks (128 bins, 0 .. 15 kHz, Nyquist column zero); log(x + 1e-5); (x + 4.5) / 5

In eval mode the official code uses fmin = 0 and fmax = sr/2 - fmax_aug_range/2 = 16000 - 1000 = 15000 Hz.
The STFT is a strided conv1d with fixed windowed DFT bases: it exports to plain Conv/Pad ops that run
identically in onnxruntime on CPU, CUDA and TensorRT (the ONNX STFT op is not supported everywhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

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


class MelEfficientAT(nn.Module):
    """waveform [B, S] float32 -> normalized log-mel [B, 128, 1 + (S-1)//320]."""

    dft_bases: torch.Tensor
    mel_banks: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        mel = kaldi_mel_banks()
        used = np.flatnonzero(mel.any(axis=0))
        # FFT bins outside every mel triangle (0 Hz and above 15 kHz) are never computed.
        first, last = int(used[0]), int(used[-1]) + 1
        bins = np.arange(first, last, dtype=np.float64)
        # The window sits centred in the n_fft frame: sample n of the window is sample n + offset.
        self.window_offset = (N_FFT - WIN_LENGTH) // 2
        sample = np.arange(WIN_LENGTH, dtype=np.float64) + self.window_offset
        phase = 2.0 * math.pi * np.outer(bins, sample) / N_FFT
        window = symmetric_hann(WIN_LENGTH)
        bases = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window], axis=0)
        self.num_bins = last - first
        self.register_buffer("dft_bases", torch.from_numpy(bases[:, None, :]).float(), persistent=False)
        self.register_buffer("mel_banks", torch.from_numpy(mel[:, first:last]).float(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        emphasized = waveform[:, 1:] - PREEMPHASIS * waveform[:, :-1]
        padded = functional.pad(emphasized.unsqueeze(1), (N_FFT // 2, N_FFT // 2), mode="reflect")
        # Skip the zero-weighted window margins on both sides so exactly 1 + (S-1)//hop frames remain.
        trimmed = padded[:, :, self.window_offset : padded.shape[-1] - self.window_offset]
        spectrum = functional.conv1d(trimmed, self.dft_bases, stride=HOP_LENGTH)
        real, imag = spectrum[:, : self.num_bins], spectrum[:, self.num_bins :]
        power = real * real + imag * imag
        mel = torch.matmul(self.mel_banks, power)
        return (torch.log(mel + LOG_OFFSET) + NORM_SHIFT) / NORM_SCALE
