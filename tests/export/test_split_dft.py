"""The split DFT (export/split_dft.py) for any row, window, hop and bin count it accepts: float64 against np.fft."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export import split_dft


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    row = draw(st.sampled_from([2, 4, 8, 16, 32]))
    k1_count = draw(st.sampled_from([2, 4, 8, 16, 32]))
    n_fft = row * k1_count
    window = row * draw(st.integers(1, k1_count))
    hop = row * draw(st.integers(1, 12))
    n_bins = draw(st.integers(1, n_fft // 2 + 1))
    return n_fft, row, window, hop, n_bins


@settings(max_examples=150, deadline=None)
@given(_layouts(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_split_power_is_the_windowed_dft_power(layout: tuple[int, int, int, int, int], frames: int,
                                              seed: int) -> None:
    n_fft, row, window_length, hop, n_bins = layout
    rng = np.random.default_rng(seed)
    window = rng.uniform(0.1, 1.0, window_length)
    signal = rng.standard_normal(hop * (frames - 1) + window_length + int(rng.integers(0, hop)))
    weights = [torch.from_numpy(w) for w in split_dft.split_matrices(window, n_fft, row, n_bins)]
    power = split_dft.split_power(torch.from_numpy(signal)[None], *weights, window_length, hop)[0].numpy()
    row_bins = split_dft.power_row_bins(n_fft, row, n_bins)
    assert power.shape == (len(row_bins), frames)
    held = row_bins >= 0
    # every bin below n_bins is in exactly one row; repeated rows are marked -1, never counted twice
    assert set(range(n_bins)) <= set(row_bins[held].tolist())
    assert len(set(row_bins[held].tolist())) == int(held.sum())
    framed = np.stack([signal[hop * t: hop * t + window_length] * window for t in range(frames)])
    expected = np.abs(np.fft.fft(framed, n_fft, axis=1).T) ** 2  # [n_fft, T]: bins past n_fft/2 mirror
    scale = expected.max()
    # the rows above n_bins may pass n_fft, where the DFT repeats: bin k is bin k mod n_fft
    np.testing.assert_allclose(power[held], expected[row_bins[held] % n_fft], rtol=0, atol=1e-9 * scale)


def test_rows_from_bins_zeroes_repeated_rows_and_missing_bins() -> None:
    matrix = np.arange(2 * 20, dtype=np.float64).reshape(2, 20) + 1.0
    rows = split_dft.rows_from_bins(matrix, 64, 8, 20)
    row_bins = split_dft.power_row_bins(64, 8, 20)
    for r, b in enumerate(row_bins):
        expected = matrix[:, b] if 0 <= b < 20 else np.zeros(2)
        np.testing.assert_array_equal(rows[:, r], expected)
    # each bin's weights appear exactly once, so a filter over the rows sums what it sums over the bins
    np.testing.assert_allclose(rows.sum(axis=1), matrix.sum(axis=1))


def test_split_power_refuses_a_hop_off_the_rows() -> None:
    weights = [torch.from_numpy(w) for w in split_dft.split_matrices(np.ones(32), 64, 8, 33)]
    with pytest.raises(ValueError, match="window 32 and hop 12 must be multiples of the row"):
        split_dft.split_power(torch.zeros(1, 200, dtype=torch.float64), *weights, 32, 12)
