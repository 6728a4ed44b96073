"""Is a window audio worth scoring? Broken input (NaN, absurd values, digital silence or a flat line,
clipping, content that stops far below the stream's rate) is a fault to report, not an anomaly: a window
with a fault is never scored."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Field metadata in the form the agent's config validation reads: lo, hi (inclusive), lo_open.
_RANGE = "lo", "hi", "lo_open", "pattern"


def _limits(lo: float, hi: float, lo_open: bool = False) -> dict[str, object]:
    return dict(zip(_RANGE, (lo, hi, lo_open, None), strict=True))


@dataclass(frozen=True)
class AudioChecks:
    # the AC RMS (mean removed) below which a window is silence or a flat line; 1e-5 is -100 dBFS
    rms_floor: float = field(default=1e-5, metadata=_limits(0.0, 1.0))
    max_abs: float = field(default=16.0, metadata=_limits(1.0, 1e6))  # beyond: not audio (float WAVs, bugs)
    clip_level: float = field(default=0.999, metadata=_limits(0.5, 1.0))  # |x| at or above: a clipped sample
    clip_fraction: float = field(default=0.01, metadata=_limits(0.0, 1.0, lo_open=True))  # over it: clipping
    # The top of the band (0.6-0.95 Nyquist) this many dB below its middle (0.2-0.45): a recording made at a
    # lower rate and resampled (natural recordings measured here: at most 24 dB; 8 -> 16 kHz: 64 dB). 0: off.
    band_drop_db: float = field(default=40.0, metadata=_limits(0.0, 200.0))


@dataclass(frozen=True)
class Fault:
    kind: str  # nonfinite | out_of_range | silence | clipping | narrowband
    detail: str


def window_fault(samples: np.ndarray, rate: int, checks: AudioChecks) -> Fault | None:
    """The first fault of a window, or None when it can be scored."""
    x = np.asarray(samples, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        return Fault("nonfinite", f"{int((~finite).sum())} of {x.size} samples are NaN or infinite")
    peak = float(np.abs(x).max(initial=0.0))
    if peak > checks.max_abs:
        return Fault("out_of_range", f"samples reach {peak:.3g}; audio lies within +-1 (limit {checks.max_abs:g})")
    rms = float(np.sqrt(np.mean((x.astype(np.float64) - float(x.mean())) ** 2))) if x.size else 0.0
    if rms < checks.rms_floor:
        return Fault("silence", f"RMS {rms:.3g} below the floor {checks.rms_floor:.3g}: digital silence or a flat "
                                "line (a muted or unplugged input?)")
    clipped = float(np.mean(np.abs(x) >= checks.clip_level))
    if clipped > checks.clip_fraction:
        return Fault("clipping", f"{clipped:.1%} of the samples are at full scale (input gain too high?)")
    if checks.band_drop_db > 0:
        drop = _band_drop_db(x, rate)
        if drop > checks.band_drop_db:
            return Fault("narrowband", f"nothing above about {0.45 * rate / 2:.0f} Hz ({drop:.0f} dB down): the audio "
                                       f"was recorded at a lower rate than the stream's {rate} Hz")
    return None


def _band_drop_db(x: np.ndarray, rate: int) -> float:
    """How far the top of the band lies below its middle, in dB, over the first second."""
    n = min(x.size, rate)
    if n < 64:
        return 0.0
    power = np.abs(np.fft.rfft(x[:n] * np.hanning(n))) ** 2
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    nyquist = rate / 2
    top = power[(freqs >= 0.6 * nyquist) & (freqs <= 0.95 * nyquist)]
    middle = power[(freqs >= 0.2 * nyquist) & (freqs <= 0.45 * nyquist)]
    if not top.size or not middle.size or middle.mean() <= 0:
        return 0.0
    return float(10 * np.log10(middle.mean() / max(top.mean(), 1e-30)))
