"""Stand-ins for the torchaudio transforms the official EfficientAT and CED code names, for bench/official_*.py only.

MelSpectrogram and AmplitudeToDB follow torchaudio's defaults as the official CED front-end calls them
(periodic Hann, power 2, center=True with reflect padding, HTK mel filters without normalization, dB with
amin 1e-10 and the top_db clamp over the whole batch); the mel filters come from
`export.mel_ced.htk_mel_banks`, tested against a float64 reference of torchaudio's formula.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from export.mel_ced import htk_mel_banks


class FrequencyMasking:  # named by EfficientAT's preprocess.py; unused in eval mode
    pass


class TimeMasking:
    pass


class _Buffers(torch.nn.Module):
    def __init__(self, **buffers: torch.Tensor) -> None:
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)


class MelSpectrogram(torch.nn.Module):
    """Its state_dict keys are torchaudio's (spectrogram.window, mel_scale.fb), so official checkpoints load."""

    def __init__(self, sample_rate=16000, n_fft=400, win_length=None, hop_length=None, f_min=0.0, f_max=None,
                 n_mels=128, center=True, **_ignored) -> None:
        super().__init__()
        self.n_fft, self.win_length = n_fft, win_length or n_fft
        self.hop, self.center = hop_length or self.win_length // 2, center
        banks = htk_mel_banks(n_mels, n_fft, sample_rate, f_min, f_max if f_max is not None else sample_rate / 2)
        self.spectrogram = _Buffers(window=torch.hann_window(self.win_length))
        self.mel_scale = _Buffers(fb=torch.from_numpy(banks).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, hop_length=self.hop, win_length=self.win_length,
                          window=self.spectrogram.window, center=self.center, pad_mode="reflect",
                          return_complex=True).abs() ** 2
        return torch.matmul(spec.transpose(-1, -2), self.mel_scale.fb).transpose(-1, -2)


class AmplitudeToDB(torch.nn.Module):
    def __init__(self, stype="power", top_db=None) -> None:
        super().__init__()
        self.top_db = top_db

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        db = 10.0 * torch.log10(torch.clamp(x, min=1e-10))
        if self.top_db is not None:
            db = torch.maximum(db, db.amax() - self.top_db)
        return db
