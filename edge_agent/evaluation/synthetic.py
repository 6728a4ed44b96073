"""Synthetic machine sound in the DCASE Task 2 layout, for demos and tests.

Each machine type is a harmonic hum (a fundamental and its harmonics with a slow frequency and
amplitude wobble) over coloured noise. The target domain is a shifted operating condition: another
rotation speed (fundamental), another harmonic tilt and another noise colour. Anomalies are mixed
onto a normal clip of the same condition:

- `bearing`: periodic impulses exciting a high resonance (a damaged rolling element);
- `harmonic`: an extra, inharmonic partial (a detuned or loose part);
- `rubbing`: band-limited noise bursts (contact friction).

Machine types are fixed tables, so a demo recording of "fan" matches the "fan" training clips of any
dataset seed; the seed drives only the per-clip variation. Everything is deterministic from the seed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.audio.wavio import write_wav
from edge_agent.errors import DatasetError

SAMPLE_RATE = 16_000
CLIP_SECONDS = 10.0
ANOMALY_KINDS = ("bearing", "harmonic", "rubbing")


@dataclass(frozen=True)
class Condition:
    """One operating condition (a domain) of a machine type."""

    f0: float  # fundamental, Hz
    harmonic_tilt: float  # amplitude of harmonic k is k ** -tilt
    noise_alpha: float  # noise power spectrum ~ 1 / f ** alpha
    noise_level: float  # noise RMS relative to the hum RMS


@dataclass(frozen=True)
class MachineType:
    name: str
    n_harmonics: int
    wobble_hz: float  # slow frequency modulation rate
    wobble_depth: float  # relative frequency deviation
    am_depth: float  # amplitude modulation depth at the rotation rate / 4
    source: Condition
    target: Condition

    def condition(self, domain: str) -> Condition:
        if domain not in ("source", "target"):
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        return self.source if domain == "source" else self.target


MACHINE_TYPES: dict[str, MachineType] = {
    "fan": MachineType("fan", n_harmonics=10, wobble_hz=0.3, wobble_depth=0.004, am_depth=0.10,
                       source=Condition(f0=120.0, harmonic_tilt=1.0, noise_alpha=1.0, noise_level=0.5),
                       target=Condition(f0=150.0, harmonic_tilt=0.8, noise_alpha=0.6, noise_level=0.6)),
    "pump": MachineType("pump", n_harmonics=16, wobble_hz=0.15, wobble_depth=0.002, am_depth=0.05,
                        source=Condition(f0=50.0, harmonic_tilt=0.7, noise_alpha=1.6, noise_level=0.4),
                        target=Condition(f0=60.0, harmonic_tilt=0.9, noise_alpha=1.2, noise_level=0.5)),
    "gearbox": MachineType("gearbox", n_harmonics=8, wobble_hz=0.5, wobble_depth=0.006, am_depth=0.20,
                           source=Condition(f0=210.0, harmonic_tilt=1.2, noise_alpha=0.8, noise_level=0.35),
                           target=Condition(f0=170.0, harmonic_tilt=1.0, noise_alpha=1.1, noise_level=0.45)),
}


@dataclass(frozen=True)
class AnomalySpec:
    kind: str
    level: float  # anomaly RMS relative to the normal clip's RMS


# Default anomaly RMS relative to the clip: faint, so that a pretrained mn04 separates most
# anomalies (official score ~0.85 with kNN on layer_8) but not all of them.
DEFAULT_ANOMALY_LEVEL = (0.05, 0.15)


def machine_type(name: str) -> MachineType:
    try:
        return MACHINE_TYPES[name]
    except KeyError:
        raise DatasetError(f"unknown synthetic machine type {name!r}; known: {', '.join(MACHINE_TYPES)}") from None


def _coloured_noise(rng: np.random.Generator, n: int, alpha: float, sample_rate: int) -> np.ndarray:
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum * freqs ** (-alpha / 2.0), n)
    return noise / (np.std(noise) + 1e-12)


def _slow_walk(rng: np.random.Generator, n: int, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """A smooth zero-mean random curve with unit std and no content above ~cutoff_hz."""
    knots = max(4, int(n / sample_rate * cutoff_hz * 2) + 2)
    values = rng.standard_normal(knots)
    curve = np.interp(np.linspace(0, knots - 1, n), np.arange(knots), values)
    curve -= curve.mean()
    return curve / (np.std(curve) + 1e-12)


def normal_sound(machine: MachineType, domain: str, seconds: float, rng: np.random.Generator,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Normal operation of `machine` in `domain`, unit RMS, float64."""
    cond = machine.condition(domain)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = cond.f0 * (1.0 + 0.01 * rng.standard_normal())
    wobble = machine.wobble_depth * (np.sin(2 * np.pi * machine.wobble_hz * t + rng.uniform(0, 2 * np.pi))
                                     + 0.5 * _slow_walk(rng, n, sample_rate, 0.5))
    phase = 2 * np.pi * np.cumsum(f0 * (1.0 + wobble)) / sample_rate
    hum = np.zeros(n)
    nyquist = sample_rate / 2
    for k in range(1, machine.n_harmonics + 1):
        if k * f0 * 1.05 >= nyquist:
            break
        amplitude = k ** -cond.harmonic_tilt * np.exp(0.15 * rng.standard_normal())
        hum += amplitude * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    am = 1.0 + machine.am_depth * np.sin(phase / 4.0 + rng.uniform(0, 2 * np.pi))
    hum *= am / (np.std(hum) + 1e-12)
    noise_level = cond.noise_level * rng.uniform(0.85, 1.15)
    noise = _coloured_noise(rng, n, cond.noise_alpha, sample_rate)
    signal = hum + noise_level * noise
    return signal / np.std(signal)


def _resonant_impulses(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    rate = rng.uniform(6.0, 14.0)  # impacts per second (a bearing defect frequency)
    resonance = rng.uniform(2500.0, 4500.0)
    decay_s = rng.uniform(0.002, 0.005)
    length = int(decay_s * 6 * sample_rate)
    tt = np.arange(length) / sample_rate
    ring = np.exp(-tt / decay_s) * np.sin(2 * np.pi * resonance * tt)
    train = np.zeros(n)
    period = sample_rate / rate
    position = rng.uniform(0, period)
    while position < n:
        index = int(position)
        train[index] += rng.uniform(0.6, 1.0)
        position += period * (1.0 + 0.02 * rng.standard_normal())
    return np.convolve(train, ring)[:n]


def _extra_partial(rng: np.random.Generator, n: int, sample_rate: int, f0: float) -> np.ndarray:
    t = np.arange(n) / sample_rate
    frequency = f0 * (rng.integers(2, 6) + rng.uniform(0.3, 0.7))
    drift = 1.0 + 0.003 * _slow_walk(rng, n, sample_rate, 0.3)
    phase = 2 * np.pi * np.cumsum(frequency * drift) / sample_rate
    return np.sin(phase) * (1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t))


def _rubbing_bursts(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    noise = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    low = rng.uniform(700.0, 1500.0)
    band = (freqs >= low) & (freqs <= low * rng.uniform(1.8, 3.0))
    bandpassed = np.fft.irfft(noise * band, n)
    envelope = np.zeros(n)
    seconds = n / sample_rate
    for _ in range(max(1, int(rng.uniform(1.0, 3.0) * seconds))):
        start = int(rng.uniform(0, n))
        width = int(rng.uniform(0.08, 0.3) * sample_rate)
        end = min(n, start + width)
        envelope[start:end] = np.maximum(envelope[start:end], np.hanning(width)[: end - start])
    return bandpassed * envelope


def anomaly_sound(machine: MachineType, domain: str, kind: str, n: int, rng: np.random.Generator,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The anomalous component alone, unit RMS."""
    if kind == "bearing":
        sound = _resonant_impulses(rng, n, sample_rate)
    elif kind == "harmonic":
        sound = _extra_partial(rng, n, sample_rate, machine.condition(domain).f0)
    elif kind == "rubbing":
        sound = _rubbing_bursts(rng, n, sample_rate)
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; known: {', '.join(ANOMALY_KINDS)}")
    return sound / (np.std(sound) + 1e-12)


def synthesize_clip(machine: MachineType, domain: str, anomaly: AnomalySpec | None, rng: np.random.Generator,
                    seconds: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One clip as float32 with a random overall gain (RMS 0.05-0.12), never clipping."""
    signal = normal_sound(machine, domain, seconds, rng, sample_rate)
    if anomaly is not None:
        signal = signal + anomaly.level * anomaly_sound(machine, domain, anomaly.kind, signal.size, rng,
                                                        sample_rate)
    signal *= rng.uniform(0.05, 0.12) / np.std(signal)
    peak = np.max(np.abs(signal))
    if peak > 0.99:
        signal *= 0.99 / peak
    return signal.astype(np.float32)


@dataclass(frozen=True)
class SyntheticClip:
    path: Path
    machine: str
    domain: str
    split: str
    label: str
    anomaly_kind: str
    anomaly_level: float


def synthesize_dataset(root: Path | str, machines: Sequence[str] = ("fan", "pump", "gearbox"),
                       n_train_source: int = 20, n_train_target: int = 3, n_test_per_class: int = 10,
                       seed: int = 0, seconds: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE,
                       anomaly_level: tuple[float, float] = DEFAULT_ANOMALY_LEVEL,
                       anomaly_kinds: Sequence[str] = ANOMALY_KINDS) -> list[SyntheticClip]:
    """Write ROOT/<machine>/{train,test}/section_00_*.wav and ROOT/<machine>/attributes_00.csv.

    Train: n_train_source source and n_train_target target normal clips. Test: n_test_per_class
    clips for each (domain, label) pair. The CSV lists each clip's anomaly kind and level (not used
    by the evaluator, which reads labels from the file names).
    """
    root = Path(root)
    if n_train_source < 1 or n_test_per_class < 1 or n_train_target < 0:
        raise DatasetError(f"clip counts must be positive: n_train_source={n_train_source}, "
                           f"n_train_target={n_train_target}, n_test_per_class={n_test_per_class}")
    unknown_kinds = [k for k in anomaly_kinds if k not in ANOMALY_KINDS]
    if unknown_kinds or not anomaly_kinds:
        raise DatasetError(f"anomaly kinds {list(anomaly_kinds)}: choose from {', '.join(ANOMALY_KINDS)}")
    specs = [machine_type(name) for name in machines]
    written: list[SyntheticClip] = []
    for machine_index, machine in enumerate(specs):
        rng = np.random.default_rng([seed, machine_index, _stable_hash(machine.name)])
        plan: list[tuple[str, str, str]] = []
        plan += [("train", "source", "normal")] * n_train_source
        plan += [("train", "target", "normal")] * n_train_target
        for domain in ("source", "target"):
            for label in ("normal", "anomaly"):
                plan += [("test", domain, label)] * n_test_per_class
        counters: dict[str, int] = {}
        machine_clips: list[SyntheticClip] = []
        for split, domain, label in plan:
            index = counters.get(split, 0)
            counters[split] = index + 1
            anomaly = None
            if label == "anomaly":
                kind = anomaly_kinds[int(rng.integers(len(anomaly_kinds)))]
                anomaly = AnomalySpec(kind, float(rng.uniform(*anomaly_level)))
            audio = synthesize_clip(machine, domain, anomaly, rng, seconds, sample_rate)
            f0 = machine.condition(domain).f0
            name = f"section_00_{domain}_{split}_{label}_{index:04d}_f0_{f0:g}.wav"
            path = root / machine.name / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, audio, sample_rate)
            machine_clips.append(SyntheticClip(path, machine.name, domain, split, label,
                                               anomaly.kind if anomaly else "",
                                               anomaly.level if anomaly else 0.0))
        _write_attributes(root / machine.name / "attributes_00.csv", machine_clips)
        written += machine_clips
    return written


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode(), "little") % (2**31)


def _write_attributes(path: Path, clips: list[SyntheticClip]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "domain", "label", "anomaly_kind", "anomaly_level"])
        for clip in clips:
            writer.writerow([f"{clip.split}/{clip.path.name}", clip.domain, clip.label, clip.anomaly_kind,
                             f"{clip.anomaly_level:.4f}"])


def write_demo_recording(path: Path | str, seconds: float = 150.0,
                         anomaly_span: tuple[float, float] | None = (60.0, 90.0), seed: int = 0,
                         machine: str = "fan", domain: str = "source", anomaly_kind: str = "bearing",
                         anomaly_level: float = 0.5, sample_rate: int = SAMPLE_RATE) -> Path:
    """One long recording of `machine` running normally, with `anomaly_kind` faded in over anomaly_span.

    The anomaly ramps in and out over 1 s at each edge; `anomaly_span=None` gives a normal-only file.
    """
    path = Path(path)
    spec = machine_type(machine)
    rng = np.random.default_rng([seed, _stable_hash(machine), 7])
    signal = normal_sound(spec, domain, seconds, rng, sample_rate)
    if anomaly_span is not None:
        start, end = anomaly_span
        if not 0 <= start < end <= seconds:
            raise DatasetError(f"anomaly_span {anomaly_span} must lie within the recording (0, {seconds})")
        envelope = np.zeros(signal.size)
        first, last = int(start * sample_rate), int(end * sample_rate)
        envelope[first:last] = 1.0
        ramp = min(sample_rate, (last - first) // 2)
        envelope[first:first + ramp] = np.linspace(0, 1, ramp)
        envelope[last - ramp:last] = np.linspace(1, 0, ramp)
        signal = signal + anomaly_level * envelope * anomaly_sound(spec, domain, anomaly_kind, signal.size,
                                                                   rng, sample_rate)
    signal *= 0.08 / np.std(signal)
    peak = np.max(np.abs(signal))
    if peak > 0.99:
        signal *= 0.99 / peak
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, signal.astype(np.float32), sample_rate)
    return path
