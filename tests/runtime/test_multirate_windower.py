"""Overlapping windows cut from a stream resampled once per rate: the same windows as the plain Windower, handed
out as soon as they are complete, their copies equal to the resampled stream except the last few samples (computed
as at a stream's end, like per-window resampling), and to per-window resampling away from the edges."""

from __future__ import annotations

import numpy as np

from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import MultiRateWindower, Windower, fit_to_window, make_windower


def _stream(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1


def _feed(windower: Windower | MultiRateWindower, audio: np.ndarray, block: int, rate: int) -> list:
    out = []
    for i in range(0, len(audio), block):
        out += windower.push(audio[i:i + block], 1_780_000_000.0 + i / rate)
    return out


def test_copies_are_cut_from_the_stream_resampled_once() -> None:
    rate, rates = 48000, (16000, 32000)
    audio = _stream(6.0, rate)
    windows = _feed(MultiRateWindower("s", rate, 2.0, 0.5, rates), audio, 4800, rate)
    plain = _feed(Windower("s", rate, 2.0, 0.5), audio, 4800, rate)
    assert [w.start_time for w in windows] == [w.start_time for w in plain]  # none waits for the resampler
    for w, p in zip(windows, plain, strict=True):
        np.testing.assert_array_equal(w.samples, p.samples)
    for out_rate in rates:
        whole = resample(audio, rate, out_rate)
        hop, size = int(0.5 * out_rate), int(2.0 * out_rate)
        edge = 100  # soxr HQ's filter reaches ~90 outputs to each side at these rates
        for k, window in enumerate(windows):
            copy = window.resampled[out_rate]
            assert copy.shape == (size,)
            np.testing.assert_allclose(copy[:-edge], whole[k * hop:k * hop + size - edge], atol=2e-6)
            alone = resample(window.samples, rate, out_rate)
            np.testing.assert_allclose(copy[-edge:], alone[-edge:], atol=2e-6)  # the end: as per window
            np.testing.assert_allclose(copy[edge:-edge], alone[edge:-edge], atol=2e-6)


def test_windows_go_out_at_once_and_start_again_after_a_gap() -> None:
    rate = 48000
    windower = MultiRateWindower("s", rate, 1.0, 0.5, (16000,))
    first = _feed(windower, _stream(3.0, rate, 1), 4800, rate)
    assert len(first) == len(_feed(Windower("s", rate, 1.0, 0.5), _stream(3.0, rate, 1), 4800, rate))
    assert windower.reset() == []  # nothing waits: a gap or a file's end loses no window
    assert all(16000 in w.resampled for w in first)
    after = windower.push(_stream(1.2, rate, 2), 0.0, gap=True)
    assert len(after) == 1 and after[0].resampled[16000].shape == (16000,)
    # the early copies' windows are not handed out twice when the stream catches up
    assert windower.push(_stream(0.1, rate, 3), 1.2) == []


def test_only_overlapping_windows_at_whole_sample_hops_are_streamed() -> None:
    assert isinstance(make_windower("s", 48000, 10.0, 10.0, (32000,)), Windower)  # no overlap: nothing to save
    assert isinstance(make_windower("s", 32000, 10.0, 5.0, (32000,)), Windower)  # already at the model's rate
    assert isinstance(make_windower("s", 48000, 10.0, 5.0, (32000,)), MultiRateWindower)
    odd = MultiRateWindower("s", 44100, 1.0, 0.33333, (16000,))
    assert odd.streamed_rates == []  # the hop is no whole number of samples: per-window resampling
    assert odd.push(_stream(2.0, 44100), 0.0)[0].resampled == {}


def test_the_model_set_takes_the_copies_and_resamples_the_rest() -> None:
    from edge_agent.model.model_set import ModelSet

    class Info:
        sample_rate, window_samples = 16000, 16000

    class Enc:
        info = Info()
        model_sha256, model_id, member = "a" * 64, "m", None

    models = ModelSet.__new__(ModelSet)
    models.encoders = [Enc()]  # type: ignore[list-item]
    samples = _stream(1.0, 48000)
    copy = np.full(16000, 0.25, np.float32)
    with_copy, without = models.prepare([(samples, 48000)], [{16000: copy}]), models.prepare([(samples, 48000)])
    np.testing.assert_array_equal(with_copy[0][0], fit_to_window(copy, 16000))
    np.testing.assert_allclose(without[0][0], fit_to_window(resample(samples, 48000, 16000), 16000))
