"""How close each float32 mn04 front-end comes to a float64 reference, per test signal (issue 13's precision bound).

    .venv/bin/python bench/frontend_precision.py [--json-dir bench/results]

Signals (10 s at 32 kHz, the ones tests/export/test_mel_efficientat.py uses): white noise, a 1 kHz tone, a chirp
(a loud pure tone sweeping past bins 70+ dB below it) and quiet noise. The reference is the EfficientAT front-end
in float64 numpy (pre-emphasis, centred reflect-padded STFT with np.fft, Kaldi mel banks, log). Columns: the max
absolute log-mel error of our front-end module in float32 with the split DFT (`fft`, the export default) and the
direct DFT (`conv`), and of the official formulation in float32 (torch.stft, an FFT; the official
AugmentMelSTFT's call). Log-mel units are (log(mel + 1e-5) + 4.5) / 5: an error e is a power ratio of exp(5 e).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchlib
import numpy as np

SR = 32000


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    t = np.arange(SR * 10) / SR
    return {
        "noise": 0.1 * rng.standard_normal(t.size),
        "tone 1 kHz": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "chirp": 0.3 * np.sin(2 * np.pi * (50 * t + 700 * t**2)),
        "quiet": 1e-3 * rng.standard_normal(t.size),
    }


def _reference(wave: np.ndarray) -> np.ndarray:
    from export.mel_efficientat import kaldi_mel_banks, symmetric_hann

    emphasized = wave[1:] - 0.97 * wave[:-1]
    padded = np.pad(emphasized, 512, mode="reflect")
    window = np.zeros(1024)
    window[112:912] = symmetric_hann(800)
    starts = np.arange(1 + (padded.size - 1024) // 320) * 320
    power = np.abs(np.fft.rfft(padded[starts[:, None] + np.arange(1024)] * window, axis=1)) ** 2
    return (np.log(kaldi_mel_banks() @ power.T + 1e-5) + 4.5) / 5.0


def _official_formulation(wave: np.ndarray) -> np.ndarray:
    import torch

    from export.mel_efficientat import kaldi_mel_banks

    x = torch.from_numpy(wave.astype(np.float32))[None]
    emphasized = x[:, 1:] - 0.97 * x[:, :-1]
    spectrum = torch.stft(emphasized, 1024, hop_length=320, win_length=800, center=True, return_complex=True,
                          window=torch.hann_window(800, periodic=False))
    banks = torch.from_numpy(kaldi_mel_banks()).float()
    return ((torch.log(banks @ (spectrum.abs() ** 2)[0] + 1e-5) + 4.5) / 5).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-dir", type=Path, default=None, help="write raw numbers as JSON here (bench/results)")
    args = parser.parse_args()
    import torch

    from export.mel_efficientat import STFT_METHODS, MelEfficientAT

    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    modules = {stft: MelEfficientAT(stft).eval() for stft in STFT_METHODS}
    errors: dict[str, dict[str, float]] = {}
    for name, wave in _signals().items():
        reference = _reference(wave)
        row = {}
        with torch.no_grad():
            for stft, module in modules.items():
                ours = module(torch.from_numpy(wave.astype(np.float32))[None])[0].numpy()
                row[f"ours {stft}"] = float(np.abs(ours - reference).max())
        row["official formulation (torch.stft)"] = float(np.abs(_official_formulation(wave) - reference).max())
        errors[name] = row
    columns = list(next(iter(errors.values())))
    print("### max |log-mel error| against the float64 reference, float32, 10 s\n")
    print(benchlib.table(["signal", *columns], [[name, *(f"{row[c]:.2e}" for c in columns)]
                                                 for name, row in errors.items()]))
    benchlib.write_json("frontend_precision", {"machine": info, "max_abs_error": errors}, args.json_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
