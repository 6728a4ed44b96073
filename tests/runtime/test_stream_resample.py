"""StreamResampler: block by block it gives the offline resampler's output on the whole signal."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.audio.resample import resample
from edge_agent.audio.stream_resample import StreamResampler

RATES = [(48000, 32000), (48000, 16000), (16000, 32000), (44100, 16000), (32000, 16000), (16000, 44100),
         (16000, 16000)]


def _stream(x: np.ndarray, rs: StreamResampler, rng: np.random.Generator, max_block: int) -> np.ndarray:
    parts, at = [], 0
    while at < x.shape[0]:
        n = int(rng.integers(0, max_block + 1))  # empty blocks too
        parts.append(rs.process(x[at:at + n]))
        at += n
    parts.append(rs.flush())
    return np.concatenate(parts)


@pytest.mark.parametrize(("rate_in", "rate_out"), RATES)
@pytest.mark.parametrize("max_block", [1, 37, 4800])
def test_blocks_of_any_size_match_offline_on_the_whole_signal(rate_in: int, rate_out: int, max_block: int) -> None:
    rng = np.random.default_rng(max_block)
    x = rng.standard_normal(rate_in // 4 if max_block > 1 else 3000).astype(np.float32)
    got = _stream(x, StreamResampler(rate_in, rate_out), rng, max_block)
    expected = resample(x, rate_in, rate_out)
    assert got.dtype == np.float32 and got.shape == expected.shape
    # Same filter, same sums: only float64 summation order (BLAS blocking) and float32 rounding differ.
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_outputs_come_once_their_input_arrived_and_reset_starts_over() -> None:
    rs = StreamResampler(48000, 16000)
    assert rs.latency == 30  # output 0 reads input up to (0 * 3 + half length 30) // 1 = 30 (0.6 ms)
    x = np.random.default_rng(1).standard_normal(4800).astype(np.float32)
    first = rs.process(x)
    assert first.shape[0] == (4800 - 30 + 2) // 3  # outputs n with 3n + 30 < 4800
    rs.reset()
    again = np.concatenate([rs.process(x), rs.flush()])
    np.testing.assert_allclose(again, resample(x, 48000, 16000), atol=2e-6)
    with pytest.raises(ValueError, match="mono"):
        rs.process(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize(("rate_in", "rate_out", "edge"), [(48000, 32000, 10), (48000, 16000, 10),
                                                           (16000, 32000, 20)])
def test_window_cut_from_the_stream_matches_the_window_resampled_alone_inside(rate_in: int, rate_out: int,
                                                                               edge: int) -> None:
    """Resampled alone, a window sees zeros beyond its ends; cut from the stream it sees the real neighbours.

    Only the first and last `edge` = ceil(half_len / down) output samples can differ (half_len = 10 * max(up, down)).
    """
    rng = np.random.default_rng(2)
    x = rng.standard_normal(3 * rate_in).astype(np.float32)
    rs = StreamResampler(rate_in, rate_out)
    assert edge == -(-rs._half // rs.down)
    stream = _stream(x, rs, rng, rate_in // 10)
    start_s, window_s = 1.0, 1.0  # starts on a whole output sample for these rates
    a, n = round(start_s * rate_in), round(window_s * rate_in)
    alone = resample(x[a:a + n], rate_in, rate_out)
    cut = stream[round(start_s * rate_out):round(start_s * rate_out) + alone.shape[0]]
    np.testing.assert_allclose(cut[edge:-edge], alone[edge:-edge], rtol=0, atol=2e-6)
    assert np.abs(cut[:edge] - alone[:edge]).max() > 1e-3  # the edges do differ (real signal vs zeros)
    assert np.abs(cut[-edge:] - alone[-edge:]).max() > 1e-3
