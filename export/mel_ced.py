"""The CED front-end (torchaudio MelSpectrogram + AmplitudeToDB(top_db=120) + the checkpoint's BatchNorm).

waveform [B, S] at 16 kHz -> [B, 64, T], T = 1 + S // 160 (160000 samples -> 1001 frames):
  STFT n_fft 512, win 512 periodic Hann, hop 160, center=True: 256 samples of reflect padding each side
  power |X|^2 (257 bins); 64 triangular mel filters, HTK mel scale 2595 log10(1 + f/700), 0 .. 8 kHz,
      no area normalization (torchaudio melscale_fbanks defaults; triangles are linear in Hz)
  dB = 10 log10(max(mel, 1e-10)); then max(dB, max over the clip - 120)
  BatchNorm2d(64) in eval mode over the mel bins (running statistics and affine from the checkpoint)

torchaudio's AmplitudeToDB takes the top_db maximum over the whole [B, 64, T] batch, so a clip's
features depend on its batch mates; here the maximum is per clip, which is what a single-clip
(batch 1) run of the official code computes.

The STFT (`stft`): "fft" (the default since exporter 0.3.0): reflect padding (an ONNX Pad) and the two-stage
split DFT of export/split_dft.py, rows of 32 samples (512 = 16 x 32, hop 160 = 5 rows): 0.10 GFLOP per 10 s.
"matmul" (earlier releases): reflect padding and framing as one constant Gather index table and the windowed
DFT as one [512, 514] MatMul, 0.53 GFLOP.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from export.split_dft import rows_from_bins, split_matrices, split_power

SAMPLE_RATE = 16000
N_FFT = 512
HOP_LENGTH = 160
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
TOP_DB = 120.0
AMIN = 1e-10
BN_EPS = 1e-5
STFT_METHODS = ("fft", "matmul")
DEFAULT_STFT = "fft"
ROW = 32  # the split DFT's rows: 512 = 16 x 32, hop 160 = 5 rows


def num_frames(samples: int) -> int:
    if samples <= N_FFT // 2:
        raise ValueError(f"{samples} samples is too short for reflect padding of {N_FFT // 2}")
    return 1 + samples // HOP_LENGTH


def periodic_hann(length: int = N_FFT) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(length, dtype=np.float64) / length)


def htk_mel(freq: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def htk_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def htk_mel_banks(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                  f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk") in float64: [n_fft//2+1, n_mels]."""
    bin_freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    edges = htk_mel_to_hz(np.linspace(float(htk_mel(f_min)), float(htk_mel(f_max)), n_mels + 2))
    widths = np.diff(edges)
    offsets = edges[None, :] - bin_freqs[:, None]  # [bins, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def reflect_frame_index(samples: int) -> np.ndarray:
    """[frames, n_fft] indices into the unpadded waveform for center=True reflect-padded framing."""
    pad = N_FFT // 2
    padded = np.arange(-pad, samples + pad)
    padded = np.abs(padded)  # left edge: x[-k] -> x[k]
    over = padded > samples - 1
    padded[over] = 2 * (samples - 1) - padded[over]  # right edge: x[S-1+k] -> x[S-1-k]
    starts = np.arange(num_frames(samples))[:, None] * HOP_LENGTH
    return padded[starts + np.arange(N_FFT)[None, :]].astype(np.int64)


def windowed_dft_basis(window: np.ndarray, n_fft: int) -> np.ndarray:
    n = np.arange(window.shape[0], dtype=np.float64)[:, None]
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[None, :]
    phase = 2.0 * math.pi * ((n * k) % n_fft) / n_fft
    return np.concatenate([np.cos(phase), -np.sin(phase)], axis=1) * window[:, None]


class MelCED(nn.Module):
    """waveform [B, S] -> BatchNorm'd log-mel [B, 64, 1 + S // 160].

    The BatchNorm parameters are buffers filled from a checkpoint (`load_batchnorm`); the module is
    only meaningful after that. `decibels()` returns the features before the BatchNorm.
    """

    frame_index: torch.Tensor
    dft_basis: torch.Tensor
    mel_banks: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    combine: torch.Tensor
    bn_scale: torch.Tensor
    bn_shift: torch.Tensor

    def __init__(self, samples: int, stft: str = DEFAULT_STFT) -> None:
        super().__init__()
        if stft not in STFT_METHODS:
            raise ValueError(f"stft {stft!r} is not one of {STFT_METHODS}")
        self.stft = stft
        self.bins = N_FFT // 2 + 1
        if stft == "matmul":
            self.register_buffer("frame_index", torch.from_numpy(reflect_frame_index(samples)))
            self.register_buffer("dft_basis", torch.from_numpy(windowed_dft_basis(periodic_hann(), N_FFT)).float())
            self.register_buffer("mel_banks", torch.from_numpy(htk_mel_banks()).float())
        else:
            num_frames(samples)  # refuses a waveform too short for the reflect padding
            split = split_matrices(periodic_hann(), N_FFT, ROW, self.bins)
            for name, weights in split._asdict().items():
                self.register_buffer(name, torch.from_numpy(weights).float(), persistent=False)
            # [64, the split's power rows]: the filters re-indexed to the order the split computes the bins in
            mel_rows = rows_from_bins(htk_mel_banks().T, N_FFT, ROW, self.bins)
            self.register_buffer("mel_banks", torch.from_numpy(mel_rows).float())
        self.register_buffer("bn_scale", torch.ones(N_MELS, 1))
        self.register_buffer("bn_shift", torch.zeros(N_MELS, 1))

    def load_batchnorm(self, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor, eps: float = BN_EPS) -> None:
        """Fold eval-mode BatchNorm into one scale and shift per mel bin (computed in float64)."""
        scale = weight.double() / torch.sqrt(running_var.double() + eps)
        self.bn_scale.copy_(scale.float().reshape(-1, 1))
        self.bn_shift.copy_((bias.double() - running_mean.double() * scale).float().reshape(-1, 1))

    def decibels(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.stft == "matmul":
            frames = waveform[:, self.frame_index]  # [B, T, 512]
            spectrum = torch.matmul(frames, self.dft_basis)
            real, imag = spectrum[..., : self.bins], spectrum[..., self.bins :]
            mel = torch.matmul(real * real + imag * imag, self.mel_banks).transpose(1, 2)  # [B, 64, T]
        else:
            padded = functional.pad(waveform.unsqueeze(1), (N_FFT // 2, N_FFT // 2), mode="reflect")[:, 0]
            power = split_power(padded, self.stage1, self.stage2, self.combine, N_FFT, HOP_LENGTH)
            mel = torch.matmul(self.mel_banks, power)  # [B, 64, T]
        db = 10.0 * torch.log10(mel.clamp_min(AMIN))
        floor = db.amax(dim=(1, 2), keepdim=True) - TOP_DB
        return torch.maximum(db, floor)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.decibels(waveform) * self.bn_scale + self.bn_shift
