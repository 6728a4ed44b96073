"""Stand-in for torchaudio.compliance.kaldi.get_mel_banks (no VTLN), for bench/official_efficientat.py only."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root
from export.mel_efficientat import kaldi_mel_banks


def get_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq,
                  vtln_low, vtln_high, vtln_warp_factor):
    """float32 [num_bins, window_length_padded // 2] (Kaldi's banks without the Nyquist column), None."""
    banks = kaldi_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq)[:, :-1]
    return torch.from_numpy(banks).float(), None
