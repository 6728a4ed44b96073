"""The BEATs front-end: Kaldi fbank (torchaudio.compliance.kaldi.fbank with BEATs' arguments) as an ONNX-clean module.

waveform [B, S] at 16 kHz -> normalized log-mel [B, T, 128], T = 1 + (S - 400) // 160 (snip_edges):
  x * 2^15 (BEATs feeds int16-scaled audio to Kaldi)
  frames of 400 samples (25 ms), shift 160 (10 ms); no padding: 160000 samples -> 998 frames
  per frame: subtract the frame mean (DC), then pre-emphasis y[n] = x[n] - 0.97 x[n-1] where the
             first sample uses itself (y[0] = 0.03 x[0]), then the povey window = symmetric Hann(400)^0.85
  zero-pad to 512, power spectrum |X|^2 (257 bins)
  128 triangular filters equally spaced on the Kaldi mel scale 1127 ln(1 + f/700), 20 Hz .. Nyquist,
      evaluated at the 256 bins below Nyquist (the Nyquist bin gets weight 0)
  log(max(mel, float32 eps)); dither 0
  (fbank - 15.41663) / (2 * 6.55582)   (BEATs' dataset statistics)

Framing is one Gather with a constant index table and the windowed DFT is one MatMul with a
constant [400, 514] basis, so the graph is plain ONNX ops with no STFT/DFT op.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
FRAME_SHIFT = 160
N_FFT = 512
N_MELS = 128
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85
WAVE_SCALE = 2.0**15
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
LOG_FLOOR = float(np.finfo(np.float32).eps)


def num_frames(samples: int) -> int:
    if samples < FRAME_LENGTH:
        raise ValueError(f"{samples} samples is shorter than one {FRAME_LENGTH}-sample frame")
    return 1 + (samples - FRAME_LENGTH) // FRAME_SHIFT


def povey_window(length: int = FRAME_LENGTH) -> np.ndarray:
    """Kaldi's povey window: the symmetric Hann window raised to 0.85, float64."""
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(length, dtype=np.float64) / (length - 1))
    return hann**POVEY_EXPONENT


def kaldi_mel(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, low_freq: float = LOW_FREQ
) -> np.ndarray:
    """Kaldi mel filters from low_freq to Nyquist, float64 [n_fft // 2 + 1, n_mels] (Nyquist row zero)."""
    nyquist = 0.5 * sample_rate
    mel_low = float(kaldi_mel(low_freq))
    step = (float(kaldi_mel(nyquist)) - mel_low) / (n_mels + 1)
    edges = mel_low + step * np.arange(n_mels + 2, dtype=np.float64)
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    bin_mel = kaldi_mel(np.arange(n_fft // 2, dtype=np.float64) * sample_rate / n_fft)[:, None]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([banks, np.zeros((1, n_mels))], axis=0)


def windowed_dft_basis(window: np.ndarray, n_fft: int) -> np.ndarray:
    """[len(window), 2 * (n_fft // 2 + 1)]: columns cos then -sin of the n_fft-point DFT, times the window.

    Samples beyond len(window) are the zero padding to n_fft, so they need no rows.
    """
    n = np.arange(window.shape[0], dtype=np.float64)[:, None]
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[None, :]
    phase = 2.0 * math.pi * ((n * k) % n_fft) / n_fft
    return np.concatenate([np.cos(phase), -np.sin(phase)], axis=1) * window[:, None]


class KaldiFbank(nn.Module):
    """waveform [B, S] float32 -> BEATs-normalized Kaldi fbank [B, num_frames(S), 128]."""

    frame_index: torch.Tensor
    dft_basis: torch.Tensor
    mel_banks: torch.Tensor

    def __init__(self, samples: int, normalize: bool = True) -> None:
        super().__init__()
        frames = num_frames(samples)
        starts = np.arange(frames, dtype=np.int64)[:, None] * FRAME_SHIFT
        self.register_buffer("frame_index", torch.from_numpy(starts + np.arange(FRAME_LENGTH)))
        basis = windowed_dft_basis(povey_window(), N_FFT)
        self.register_buffer("dft_basis", torch.from_numpy(basis).float())
        self.register_buffer("mel_banks", torch.from_numpy(kaldi_mel_banks()).float())
        self.bins = N_FFT // 2 + 1
        self.normalize = normalize

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        frames = (waveform * WAVE_SCALE)[:, self.frame_index]  # [B, T, 400]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - PREEMPHASIS * previous
        spectrum = torch.matmul(frames, self.dft_basis)  # [B, T, 514]
        real, imag = spectrum[..., : self.bins], spectrum[..., self.bins :]
        power = real * real + imag * imag
        fbank = torch.matmul(power, self.mel_banks).clamp_min(LOG_FLOOR).log()
        if self.normalize:
            fbank = (fbank - FBANK_MEAN) / (2.0 * FBANK_STD)
        return fbank
