"""Stand-ins for torchaudio.compliance.kaldi (for bench/official_*.py only): get_mel_banks, which EfficientAT's
official front-end calls at construction, and fbank with the arguments BEATs's official preprocess passes
(16 kHz, 25 ms / 10 ms frames, 128 bins, torchaudio's other defaults), from this repository's
export.kaldi_fbank (tested against a float64 Kaldi reference): the official formulation, not its code."""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root
from export.kaldi_fbank import WAVE_SCALE, KaldiFbank
from export.mel_efficientat import kaldi_mel_banks


def get_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq,
                  vtln_low, vtln_high, vtln_warp_factor):
    """float32 [num_bins, window_length_padded // 2] (Kaldi's banks without the Nyquist column), None."""
    banks = kaldi_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq)[:, :-1]
    return torch.from_numpy(banks).float(), None


@functools.cache
def _fbank_module(samples: int) -> KaldiFbank:
    return KaldiFbank(samples, normalize=False).eval()


def fbank(waveform, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10, **_ignored):
    """waveform [1, S] already scaled to 16-bit range -> log mel fbank [frames, 128]."""
    if (num_mel_bins, sample_frequency, frame_length, frame_shift) != (128, 16000, 25, 10):
        raise NotImplementedError("this stand-in covers BEATs's fbank arguments only")
    return _fbank_module(waveform.shape[-1])(waveform.reshape(1, -1) / WAVE_SCALE)[0]
