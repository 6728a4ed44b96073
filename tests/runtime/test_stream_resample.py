"""StreamResampler: block by block it gives the offline resampler's output on the whole signal (the same soxr
engine), and its tail at once when asked."""

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
    np.testing.assert_array_equal(got, expected)  # soxr's stream is its offline result, whatever the blocks


@pytest.mark.parametrize(("rate_in", "rate_out"), RATES[:3])
def test_the_tail_comes_at_once_without_disturbing_the_stream_and_reset_starts_over(rate_in: int,
                                                                                    rate_out: int) -> None:
    rs = StreamResampler(rate_in, rate_out)
    x = np.random.default_rng(1).standard_normal(3 * rate_in).astype(np.float32)
    block, parts = rate_in // 10, []
    for i in range(0, x.shape[0], block):
        parts.append(rs.process(x[i:i + block]))
        held = round((i + block) * rate_out / rate_in) - rs.outputs
        assert 0 <= held < 2000  # soxr holds back up to ~1 500 outputs (16k -> 32k), in its own blocks
        tail = rs.peek_tail()
        assert tail.shape == (held,)
        # the tail is what flushing here would give: the offline result of the input so far
        so_far = np.concatenate([*parts, tail])
        np.testing.assert_allclose(so_far, resample(x[:i + block], rate_in, rate_out), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(np.concatenate([*parts, rs.flush()]), resample(x, rate_in, rate_out))
    assert rs.inputs == rs.outputs == 0  # flush resets
    again = np.concatenate([rs.process(x[:block]), rs.flush()])
    np.testing.assert_array_equal(again, resample(x[:block], rate_in, rate_out))
    with pytest.raises(ValueError, match="mono"):
        rs.process(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize(("rate_in", "rate_out", "edge"), [(48000, 32000, 100), (48000, 16000, 100),
                                                           (16000, 32000, 200)])
def test_window_cut_from_the_stream_matches_the_window_resampled_alone_inside(rate_in: int, rate_out: int,
                                                                               edge: int) -> None:
    """Resampled alone, a window sees zeros beyond its ends; cut from the stream it sees the real neighbours.

    Only the first and last `edge` output samples differ (soxr HQ's filter reaches ~3 ms to each side: 86-89
    outputs at 32 and 16 kHz, 168-180 when upsampling 16k -> 32k, measured).
    """
    rng = np.random.default_rng(2)
    x = rng.standard_normal(3 * rate_in).astype(np.float32)
    rs = StreamResampler(rate_in, rate_out)
    stream = _stream(x, rs, rng, rate_in // 10)
    start_s, window_s = 1.0, 1.0  # starts on a whole output sample for these rates
    a, n = round(start_s * rate_in), round(window_s * rate_in)
    alone = resample(x[a:a + n], rate_in, rate_out)
    cut = stream[round(start_s * rate_out):round(start_s * rate_out) + alone.shape[0]]
    np.testing.assert_allclose(cut[edge:-edge], alone[edge:-edge], rtol=0, atol=2e-6)
    assert np.abs(cut[:edge] - alone[:edge]).max() > 1e-3  # the edges do differ (real signal vs zeros)
    assert np.abs(cut[-edge:] - alone[-edge:]).max() > 1e-3
