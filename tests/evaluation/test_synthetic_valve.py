"""The synthetic valve: a transient machine (strokes in a duty cycle), its domains and its anomaly kinds,
each seen by a plain numpy measurement of the clip."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.quality import AudioChecks, window_fault
from edge_agent.audio.wavio import read_wav, read_wav_info
from edge_agent.errors import DatasetError
from edge_agent.evaluation import synthetic
from edge_agent.evaluation.dcase import scan_dataset
from edge_agent.evaluation.synthetic import (
    MACHINE_TYPES,
    SAMPLE_RATE,
    VALVE_ANOMALY_KINDS,
    AnomalySpec,
    ValveType,
    synthesize_clip,
    synthesize_dataset,
    write_demo_recording,
)

VALVE = MACHINE_TYPES["valve"]
# The structure of the valve's own sound is measured without the factory hall and with a regular target cycle;
# the hall and the target's irregular cycling have their own tests below.
BARE = dataclasses.replace(VALVE, factory_level=0.0, target=dataclasses.replace(VALVE.target, jitter=0.02))
SEEDS = range(6)


@pytest.fixture(autouse=True)
def _no_hall_knocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hall's knocks (every dataset clip has them) would pass for strokes in these measurements; they have
    their own test in test_synthetic.py."""
    monkeypatch.setattr(synthetic, "HALL_EVENTS_PER_S", 0.0)


LEVEL = 0.1  # the middle of the dataset's default anomaly level range


@functools.cache
def _clip(domain: str, seed: int, kind: str | None = None, level: float = LEVEL) -> np.ndarray:
    anomaly = AnomalySpec(kind, level) if kind else None
    audio = synthesize_clip(BARE, domain, anomaly, np.random.default_rng([seed, 1234]))
    audio.flags.writeable = False  # shared between tests
    return audio


def _band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    spectrum = np.fft.rfft(x.astype(np.float64))
    freqs = np.fft.rfftfreq(x.size, 1.0 / SAMPLE_RATE)
    return np.fft.irfft(spectrum * ((freqs >= lo) & (freqs <= hi)), x.size)


def _frame_rms(x: np.ndarray, frame: int) -> np.ndarray:
    frames = x[: x.size // frame * frame].reshape(-1, frame).astype(np.float64)
    return np.sqrt(np.mean(frames**2, axis=1))


FRAME = 160  # 10 ms
Segments = list[tuple[float, float]]
Measure = Callable[[np.ndarray, Segments], float]


def _open_segments(x: np.ndarray) -> Segments:
    """(start, end) in seconds of each stretch of flow noise (the valve open) that lies wholly inside the clip:
    10 ms RMS of the 300-1500 Hz band (flow, not the strokes' rings), smoothed over 50 ms, above the geometric
    mean of its 10th and 90th percentiles."""
    env = _frame_rms(_band(x, 300.0, 1500.0), FRAME)
    env = np.convolve(env, np.ones(5) / 5, mode="same")
    threshold = np.sqrt(np.percentile(env, 10) * np.percentile(env, 90))
    above = np.r_[False, env > threshold, False].astype(int)
    edges = np.flatnonzero(np.diff(above))
    segments = [(start * FRAME / SAMPLE_RATE, end * FRAME / SAMPLE_RATE) for start, end in edges.reshape(-1, 2)]
    return [(a, b) for a, b in segments if a > 0.05 and b < x.size / SAMPLE_RATE - 0.05 and b - a > 0.1]


def _closing_peaks(x: np.ndarray, segments: Segments) -> np.ndarray:
    """The closing impact of each segment: the largest 5 ms RMS of the 1.5-7 kHz band near the segment's end."""
    env = _frame_rms(_band(x, 1500.0, 7000.0), 80)
    per_second = SAMPLE_RATE / 80
    return np.array([env[int((end - 0.05) * per_second):int((end + 0.08) * per_second)].max()
                     for _, end in segments])


def _onsets_after_closings(x: np.ndarray, segments: Segments) -> float:
    """Impacts per closing: rises of the 1.5-7 kHz energy in 2 ms frames by 4x or more within 4 ms, above
    a floor at 0.3 % of the loudest frame, counted from 50 ms before to 300 ms after each closing."""
    energy = _frame_rms(_band(x, 1500.0, 7000.0), 32) ** 2
    rises = (energy[2:] > 4 * energy[:-2]) & (energy[2:] > 0.003 * energy.max())
    starts = np.flatnonzero(rises[1:] & ~rises[:-1]) + 3  # the frame where a rise begins
    times = starts * 32 / SAMPLE_RATE
    counts = [np.sum((times > end - 0.05) & (times < end + 0.3)) for _, end in segments]
    return float(np.mean(counts))


def _cycle_period(x: np.ndarray) -> float:
    """The lag (0.8-4 s) of the largest autocorrelation of the 10 ms RMS envelope."""
    env = _frame_rms(x, FRAME)
    env = env - env.mean()
    correlation = np.correlate(env, env, mode="full")[env.size - 1:]
    lags = np.arange(correlation.size) * FRAME / SAMPLE_RATE
    window = (lags >= 0.8) & (lags <= 4.0)
    return float(lags[window][np.argmax(correlation[window])])


def _closed(n: int, segments: Segments) -> np.ndarray:
    """Samples between two openings where the valve stands closed, 200 ms clear of the closing's ring."""
    closed = np.zeros(n, dtype=bool)
    for (_, end), (start, _) in itertools.pairwise(segments):
        closed[int((end + 0.2) * SAMPLE_RATE):int((start - 0.1) * SAMPLE_RATE)] = True
    return closed


def _closed_hiss(x: np.ndarray, segments: Segments) -> float:
    """2.5-7 kHz RMS while the valve is closed, relative to the clip's RMS."""
    high = _band(x, 2500.0, 7000.0)
    return float(np.sqrt(np.mean(high[_closed(x.size, segments)] ** 2)) / np.std(x))


def _closing_strength(x: np.ndarray, segments: Segments) -> np.ndarray:
    """Each closing's energy: the 1.5-7 kHz band over 35 ms from its loudest 5 ms frame near the segment's end."""
    env = _frame_rms(_band(x, 1500.0, 7000.0), 80)
    per_second = SAMPLE_RATE / 80
    out = []
    for _, end in segments:
        lo = int((end - 0.05) * per_second)
        peak = lo + int(np.argmax(env[lo:int((end + 0.1) * per_second)]))
        out.append(np.sqrt(np.sum(env[peak - 1:peak + 6] ** 2)))
    return np.array(out)


def _interval_deviation(_: np.ndarray, segments: Segments) -> float:
    """The largest relative deviation from the median of the opening-to-opening and closing-to-closing intervals."""
    deviations = []
    for times in (np.array([a for a, _ in segments]), np.array([b for _, b in segments])):
        intervals = np.diff(times)
        deviations.append(np.max(np.abs(intervals / np.median(intervals) - 1.0)))
    return float(max(deviations))


def _weakest_closing(x: np.ndarray, segments: Segments) -> float:
    strength = _closing_strength(x, segments)
    return float(strength.min() / strength.max())


def _shortest_opening(_: np.ndarray, segments: Segments) -> float:
    durations = np.array([b - a for a, b in segments])
    return float(durations.min() / durations.max())


def _measure(domain: str, kind: str | None, measure: Measure) -> np.ndarray:
    values = []
    for seed in SEEDS:
        audio = _clip(domain, seed, kind)
        values.append(measure(audio, _open_segments(audio)))
    return np.array(values)


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# --- the machine type and the dataset --------------------------------------------------------------------


def test_valve_is_a_machine_type_with_its_own_anomaly_kinds() -> None:
    assert isinstance(VALVE, ValveType)
    assert VALVE.anomaly_kinds == VALVE_ANOMALY_KINDS == ("chatter", "leak", "partial", "timing")
    assert MACHINE_TYPES["fan"].anomaly_kinds == ("bearing", "harmonic", "rubbing")
    assert VALVE.target.period_s < VALVE.source.period_s and VALVE.target.open_ratio > VALVE.source.open_ratio


def test_same_seed_same_clip_other_seed_other_clip(tmp_path: Path) -> None:
    for kind in (None, *VALVE_ANOMALY_KINDS):
        anomaly = AnomalySpec(kind, LEVEL) if kind else None
        first, again, other = (synthesize_clip(VALVE, "source", anomaly, np.random.default_rng(seed))
                               for seed in (3, 3, 4))
        assert np.array_equal(first, again) and not np.array_equal(first, other)
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        synthesize_dataset(tmp_path / name, machines=("valve",), n_train_source=2, n_train_target=1,
                           n_test_per_class=2, seed=seed, seconds=4.0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_dataset_layout_next_to_a_steady_machine(tmp_path: Path) -> None:
    clips = synthesize_dataset(tmp_path, machines=("fan", "valve"), n_train_source=3, n_train_target=1,
                               n_test_per_class=4, seed=2, seconds=4.0)
    assert len(clips) == 2 * (3 + 1 + 4 * 4)
    dataset = scan_dataset(tmp_path)
    valve, fan = dataset.machines["valve"], dataset.machines["fan"]
    assert [len(v) for v in valve.train_by_domain().values()] == [3, 1]
    assert read_wav_info(valve.test[0].path) == read_wav_info(fan.test[0].path) == (SAMPLE_RATE, 1, 16, 4 * SAMPLE_RATE)
    names = sorted(p.name for p in (tmp_path / "valve" / "train").iterdir())
    assert names[0] == "section_00_source_train_normal_0000_cycle_2.4_open_0.35.wav"
    assert names[-1] == "section_00_target_train_normal_0003_cycle_1.5_open_0.55.wav"  # numbered per split
    kinds = {m: {c.anomaly_kind for c in clips if c.machine == m and c.label == "anomaly"} for m in ("fan", "valve")}
    assert kinds["valve"] <= set(VALVE_ANOMALY_KINDS) and kinds["fan"] <= {"bearing", "harmonic", "rubbing"}
    # Listed kinds: each machine draws from the ones that apply to it; a machine with none is an error.
    mixed = synthesize_dataset(tmp_path / "mixed", machines=("fan", "valve"), n_train_source=1, n_train_target=0,
                               n_test_per_class=3, seed=2, seconds=2.0, anomaly_kinds=("bearing", "leak"))
    assert {(c.machine, c.anomaly_kind) for c in mixed if c.label == "anomaly"} == {("fan", "bearing"),
                                                                                    ("valve", "leak")}
    with pytest.raises(DatasetError, match="none applies to valve"):
        synthesize_dataset(tmp_path / "x", machines=("valve",), anomaly_kinds=("bearing",))
    with pytest.raises(DatasetError, match="choose from"):
        synthesize_dataset(tmp_path / "x", machines=("valve",), anomaly_kinds=("squeak",))


@pytest.mark.parametrize("domain", ["source", "target"])
def test_every_window_passes_the_broken_audio_checks(domain: str) -> None:
    checks = AudioChecks()
    for kind in (None, *VALVE_ANOMALY_KINDS):
        for seed in range(3):
            audio = _clip(domain, seed, kind, level=0.15)
            assert audio.dtype == np.float32 and audio.shape == (10 * SAMPLE_RATE,)
            assert 0.012 < float(np.std(audio)) < 0.03 and float(np.max(np.abs(audio))) <= 0.7
            for start in range(0, audio.size, SAMPLE_RATE):
                fault = window_fault(audio[start:start + SAMPLE_RATE], SAMPLE_RATE, checks)
                assert fault is None, f"{domain}/{kind}/seed {seed} at {start // SAMPLE_RATE} s: {fault}"


# --- the normal sound and its domains --------------------------------------------------------------------


def _burstiness(audio: np.ndarray) -> float:
    """95th over 50th percentile of the 20 ms frame RMS: ~1 for a steady sound."""
    rms = _frame_rms(audio, 320)
    return float(np.percentile(rms, 95) / np.percentile(rms, 50))


def test_normal_valve_is_transient() -> None:
    fan = [_burstiness(synthesize_clip(MACHINE_TYPES["fan"], "source", None, np.random.default_rng(s))) for s in SEEDS]
    source = [_burstiness(_clip("source", s)) for s in SEEDS]
    target = [_burstiness(_clip("target", s)) for s in SEEDS]
    assert max(fan) < 1.5
    assert min(source) > 3 * max(fan)  # mostly closed: strokes and flow over a quiet background
    assert min(target) > 1.8 * max(fan)  # open more than half of the time
    # The strokes are short: the largest 5 ms frames stand far above the clip's RMS.
    crest = [float(_frame_rms(_clip("source", s), 80).max() / np.std(_clip("source", s))) for s in SEEDS]
    assert min(crest) > 6


def test_target_domain_is_another_cycle_pattern() -> None:
    for domain, period, share in (("source", 2.4, 0.35), ("target", 1.5, 0.55)):
        for seed in SEEDS:
            audio = _clip(domain, seed)
            measured = _cycle_period(audio)
            segments = _open_segments(audio)
            open_share = np.median([b - a for a, b in segments]) / measured
            assert abs(measured / period - 1) < 0.12, f"{domain} seed {seed}: period {measured:.2f} s"
            assert abs(open_share - share) < 0.08, f"{domain} seed {seed}: open {open_share:.2f} of the cycle"
            assert _interval_deviation(audio, segments) < 0.08  # a regular cycle


def _peak_over_median_db(audio: np.ndarray) -> float:
    """The loudest 20 ms frame over the median frame, in dB: how far the strokes stand out of the hall."""
    rms = _frame_rms(audio, 320)
    return float(20 * np.log10(rms.max() / np.median(rms)))


def test_factory_hall_masks_the_strokes_as_in_the_real_valve_clips() -> None:
    # The four real DCASE 2023 valve clips in ../shared measure 4.3, 8.4, 8.9 and 9.1 dB; the bare valve ~17-28.
    hall = [_peak_over_median_db(synthesize_clip(VALVE, d, None, np.random.default_rng(s)))
            for d in ("source", "target") for s in SEEDS]
    bare = [_peak_over_median_db(_clip(d, s)) for d in ("source", "target") for s in SEEDS]
    assert 5.0 < np.median(hall) < 13.0 and max(hall) < 16.0, hall
    assert min(bare) > max(hall), (bare, hall)


def test_target_domain_cycles_irregularly() -> None:
    # As the real valve's target pattern: the intervals between strokes vary from cycle to cycle.
    bare_valve = dataclasses.replace(VALVE, factory_level=0.0)  # the hall would hide the flow the measure needs
    deviation = {d: [_interval_deviation(a, _open_segments(a))
                     for a in (synthesize_clip(bare_valve, d, None, np.random.default_rng([s, 1234])) for s in SEEDS)]
                 for d in ("source", "target")}
    assert max(deviation["source"]) < 0.08 and np.median(deviation["target"]) > 0.2, deviation


# --- anomalies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["source", "target"])
def test_leak_hisses_between_strokes(domain: str) -> None:
    normal, leak = _measure(domain, None, _closed_hiss), _measure(domain, "leak", _closed_hiss)
    assert leak.min() > 1.5 * normal.max(), (normal, leak)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_chatter_adds_impacts_at_closing(domain: str) -> None:
    normal = _measure(domain, None, _onsets_after_closings)
    chatter = _measure(domain, "chatter", _onsets_after_closings)
    assert normal.max() < 1.5 and chatter.min() > 2.0, (normal, chatter)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_timing_makes_the_cycle_irregular(domain: str) -> None:
    normal, timing = _measure(domain, None, _interval_deviation), _measure(domain, "timing", _interval_deviation)
    assert normal.max() < 0.08 and timing.min() > normal.max() and np.median(timing) > 2 * normal.max(), (
        normal, timing)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_partial_stroke_is_weaker_and_shorter(domain: str) -> None:
    for measure in (_weakest_closing, _shortest_opening):
        normal, partial = _measure(domain, None, measure), _measure(domain, "partial", measure)
        # Each cycle strokes partially with some probability: a clip where every one does looks regular.
        assert np.median(partial) < 0.9 * normal.min() and np.sum(partial < normal.min()) >= len(SEEDS) - 1, (
            measure.__name__, normal, partial)


def test_anomalies_are_not_simply_louder() -> None:
    # Every clip gets its gain from the same range (per RMS): loudness alone tells nothing.
    normal = np.array([np.std(_clip("source", s)) for s in SEEDS])
    for kind in VALVE_ANOMALY_KINDS:
        anomalous = np.array([np.std(_clip("source", s, kind)) for s in SEEDS])
        assert abs(np.median(anomalous) / np.median(normal) - 1) < 0.25, kind


# --- the demo recording -----------------------------------------------------------------------------------


def test_demo_recording_with_a_leak_and_with_the_default_kind(tmp_path: Path) -> None:
    path = write_demo_recording(tmp_path / "leak.wav", seconds=30.0, anomaly_span=(10.0, 20.0), seed=1,
                                machine="valve", anomaly_kind="leak")
    audio, rate = read_wav(path)
    assert rate == SAMPLE_RATE and audio.shape == (30 * SAMPLE_RATE,) and np.max(np.abs(audio)) <= 0.7
    segments = _open_segments(audio)
    hiss = _band(audio, 2500.0, 7000.0)
    closed = _closed(audio.size, segments)
    t = np.arange(audio.size) / rate
    inside, outside = closed & (t > 11) & (t < 19), closed & ((t < 9) | (t > 21))
    # The factory hall (pink, mostly below the hiss's band) sits under the demo's leak as under the dataset's.
    assert np.sqrt(np.mean(hiss[inside] ** 2)) > 1.4 * np.sqrt(np.mean(hiss[outside] ** 2))

    default = write_demo_recording(tmp_path / "chatter.wav", seconds=30.0, anomaly_span=(10.0, 20.0), seed=1,
                                   machine="valve")  # the valve's first kind: chatter
    audio, _ = read_wav(default)
    segments = _open_segments(audio)
    within = [s for s in segments if 11 < s[1] < 19]
    without = [s for s in segments if s[1] < 9 or s[1] > 21]
    assert _onsets_after_closings(audio, within) > 2 and _onsets_after_closings(audio, without) < 1.5
    with pytest.raises(DatasetError, match="does not apply to valve"):
        write_demo_recording(tmp_path / "x.wav", seconds=10.0, anomaly_span=(2.0, 5.0), machine="valve",
                             anomaly_kind="bearing")


def test_cli_synth_with_a_valve_demo(tmp_path: Path) -> None:
    from edge_agent.cli import main

    assert main(["synth", str(tmp_path / "ds"), "--machines", "valve", "--train-source", "1", "--train-target", "0",
                 "--test-per-class", "1", "--demo", str(tmp_path / "demo.wav"), "--demo-seconds", "20"]) == 0
    assert len(list((tmp_path / "ds" / "valve" / "test").iterdir())) == 4
    audio, _ = read_wav(tmp_path / "demo.wav")
    assert audio.shape == (20 * SAMPLE_RATE,)
