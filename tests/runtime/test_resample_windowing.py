from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import resample_poly

from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import fit_to_window, sliding_windows


@pytest.mark.parametrize(("rate_in", "rate_out"), [(16000, 32000), (44100, 16000), (48000, 32000),
                                                   (32000, 16000), (16000, 44100), (8000, 16000)])
@pytest.mark.parametrize("length", [1, 5, 999, 48000])
def test_resample_matches_scipy(rate_in: int, rate_out: int, length: int) -> None:
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    g = np.gcd(rate_in, rate_out)
    expected = resample_poly(x.astype(np.float64), rate_out // g, rate_in // g)
    got = resample(x, rate_in, rate_out)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_resample_preserves_a_tone_and_removes_aliases() -> None:
    t = np.arange(48000) / 48000
    tone = np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 12000 * t)  # 12 kHz is above 16k's Nyquist
    out = resample(tone.astype(np.float32), 48000, 16000)
    spectrum = np.abs(np.fft.rfft(out[2000:14000] * np.hanning(12000)))
    freqs = np.fft.rfftfreq(12000, 1 / 16000)
    assert abs(freqs[spectrum.argmax()] - 1000) < 5
    assert spectrum[np.abs(freqs - 4000) < 50].max() < 1e-3 * spectrum.max()  # 12k would alias to 4k


def test_resample_same_rate_is_identity_and_rejects_bad_rates() -> None:
    x = np.arange(10, dtype=np.float32)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


def test_fit_to_window_crops_and_tiles_without_padding() -> None:
    x = np.arange(1, 8, dtype=np.float32)
    np.testing.assert_array_equal(fit_to_window(x, 3), [1, 2, 3])
    tiled = fit_to_window(x, 17)
    np.testing.assert_array_equal(tiled, np.concatenate([x, x, x[:3]]))
    assert (tiled != 0).all()
    with pytest.raises(ValueError, match="empty"):
        fit_to_window(np.zeros(0, np.float32), 3)


def test_sliding_windows_cover_full_windows_only() -> None:
    x = np.arange(10, dtype=np.float32)
    starts = [s for s, w in sliding_windows(x, 4, 3)]
    assert starts == [0, 3, 6]
    assert all(w.shape == (4,) for _, w in sliding_windows(x, 4, 3))
