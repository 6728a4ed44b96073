"""Synthetic machine sound in the DCASE Task 2 layout, for demos and tests.

The steady machine types (fan, pump, gearbox) are a harmonic hum (a fundamental and its harmonics
with a slow frequency and amplitude wobble) over coloured noise. The target domain is a shifted
operating condition: another rotation speed (fundamental), another harmonic tilt and another noise
colour. Anomalies are mixed onto a normal clip of the same condition:

- `bearing`: periodic impulses exciting a high resonance (a damaged rolling element);
- `harmonic`: an extra, inharmonic partial (a detuned or loose part);
- `rubbing`: band-limited noise bursts (contact friction).

The `valve` is transient: a duty cycle of opening and closing strokes (a short ringing thump each,
the closing one a hard seat impact), flow noise that swells after each opening and lasts while the
valve stands open, and a low room/pipe background. The target domain is another cycle pattern
(period and open share). Valve anomalies follow the cycle rather than being mixed on top of it:

- `chatter`: a chattering seat, a burst of small, fast, decaying impacts after a closing;
- `leak`: hiss (2-7 kHz) while the valve should be closed (between a closing and the next opening);
- `partial`: partial strokes, a truncated opening with weaker transients and less flow;
- `timing`: irregular cycles: the controller keeps its clock but the valve answers late, a whole cycle
  comes late or the valve sticks open (a late closing).

Machine types are fixed tables, so a demo recording of "fan" matches the "fan" training clips of any
dataset seed; the seed drives only the per-clip variation. Everything is deterministic from the seed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_agent.audio.wavio import write_wav
from edge_agent.errors import DatasetError

SAMPLE_RATE = 16_000
CLIP_SECONDS = 10.0
ANOMALY_KINDS = ("bearing", "harmonic", "rubbing")  # the steady machine types' kinds
VALVE_ANOMALY_KINDS = ("chatter", "leak", "partial", "timing")
ALL_ANOMALY_KINDS = ANOMALY_KINDS + VALVE_ANOMALY_KINDS


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

    anomaly_kinds: ClassVar[tuple[str, ...]] = ANOMALY_KINDS

    def condition(self, domain: str) -> Condition:
        if domain not in ("source", "target"):
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        return self.source if domain == "source" else self.target

    def name_attributes(self, domain: str) -> str:
        """The attribute part of a clip's DCASE file name."""
        return f"f0_{self.condition(domain).f0:g}"


@dataclass(frozen=True)
class CycleCondition:
    """One operating condition (a domain) of a valve: its duty cycle and its flow."""

    period_s: float  # opening to opening
    open_ratio: float  # share of the period the valve stands open
    noise_alpha: float  # background (room/pipe) noise power spectrum ~ 1 / f ** alpha
    flow_level: float  # flow-noise RMS at the swell after an opening, relative to the closing impact's peak
    jitter: float = 0.02  # per cycle: the relative std of the open and closed durations

    @property
    def f0(self) -> float:
        """The duty cycle's fundamental, 1 / period (Hz): the valve's counterpart of a rotation rate."""
        return 1.0 / self.period_s


@dataclass(frozen=True)
class ValveType:
    """A valve cycling open and closed: transient strokes, flow noise while open, a low background."""

    name: str
    seat_hz: float  # ring of the seat (the closing impact)
    body_hz: float  # thump of the actuator and body (both strokes)
    background_level: float  # room/pipe noise RMS relative to the closing impact's peak
    source: CycleCondition
    target: CycleCondition
    # Other machines in the hall (a hum and low-heavy noise), RMS relative to the valve's own RMS, added last:
    # anomalies are relative to the valve, the hall masks them as it does in recorded sets.
    factory_level: float = 0.0

    anomaly_kinds: ClassVar[tuple[str, ...]] = VALVE_ANOMALY_KINDS
    # A transient sound has a high crest factor (the impact peaks lie ~20-30x above the clip RMS): a lower
    # RMS than the steady machines' keeps its peaks well below full scale, mostly without the limit.
    clip_rms: ClassVar[tuple[float, float]] = (0.015, 0.025)
    demo_rms: ClassVar[float] = 0.02
    peak_limit: ClassVar[float] = 0.7

    def condition(self, domain: str) -> CycleCondition:
        if domain not in ("source", "target"):
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        return self.source if domain == "source" else self.target

    def name_attributes(self, domain: str) -> str:
        cond = self.condition(domain)
        return f"cycle_{cond.period_s:g}_open_{cond.open_ratio:g}"


Machine = MachineType | ValveType

FACTORY_LEVEL = 2.0
# Short knocks and clanks of the hall (per second, Poisson) under every dataset clip, as in recorded sets.
HALL_EVENTS_PER_S = 0.25

MACHINE_TYPES: dict[str, Machine] = {
    "fan": MachineType("fan", n_harmonics=10, wobble_hz=0.3, wobble_depth=0.004, am_depth=0.10,
                       source=Condition(f0=120.0, harmonic_tilt=1.0, noise_alpha=1.0, noise_level=0.5),
                       target=Condition(f0=150.0, harmonic_tilt=0.8, noise_alpha=0.6, noise_level=0.6)),
    "pump": MachineType("pump", n_harmonics=16, wobble_hz=0.15, wobble_depth=0.002, am_depth=0.05,
                        source=Condition(f0=50.0, harmonic_tilt=0.7, noise_alpha=1.6, noise_level=0.4),
                        target=Condition(f0=60.0, harmonic_tilt=0.9, noise_alpha=1.2, noise_level=0.5)),
    "gearbox": MachineType("gearbox", n_harmonics=8, wobble_hz=0.5, wobble_depth=0.006, am_depth=0.20,
                           source=Condition(f0=210.0, harmonic_tilt=1.2, noise_alpha=0.8, noise_level=0.35),
                           target=Condition(f0=170.0, harmonic_tilt=1.0, noise_alpha=1.1, noise_level=0.45)),
    # Source: ~4 regular cycles in 10 s, open a third of the time; target: faster, irregular cycling, open half of
    # the time. The factory hall is calibrated on the real DCASE 2023 valve clips in ../shared (docs/evaluation.md).
    "valve": ValveType("valve", seat_hz=2200.0, body_hz=170.0, background_level=0.012,
                       source=CycleCondition(period_s=2.4, open_ratio=0.35, noise_alpha=1.2, flow_level=0.10),
                       target=CycleCondition(period_s=1.5, open_ratio=0.55, noise_alpha=0.9, flow_level=0.08,
                                             jitter=0.25),
                       factory_level=FACTORY_LEVEL),
}


@dataclass(frozen=True)
class AnomalySpec:
    kind: str
    # The steady kinds and `leak`: the anomaly's RMS relative to the normal clip's RMS. `chatter`,
    # `partial`, `timing`: a severity on the same scale (see `_valve_severity`).
    level: float


# Default anomaly RMS relative to the clip: faint, so that a pretrained mn04 separates most
# anomalies (official score ~0.85 with kNN on layer_8) but not all of them.
DEFAULT_ANOMALY_LEVEL = (0.05, 0.15)


def machine_type(name: str) -> Machine:
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


def normal_sound(machine: Machine, domain: str, seconds: float, rng: np.random.Generator,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Normal operation of `machine` in `domain`, unit RMS, float64."""
    if isinstance(machine, ValveType):
        return valve_sound(machine, domain, seconds, rng, sample_rate)
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


def anomaly_sound(machine: Machine, domain: str, kind: str, n: int, rng: np.random.Generator,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The anomalous component alone, unit RMS (steady machine types; a valve's anomalies change its cycle,
    see `valve_sound`)."""
    if isinstance(machine, ValveType):
        raise DatasetError(f"{machine.name}: valve anomalies are not an added sound; use valve_sound(..., anomaly)")
    if kind == "bearing":
        sound = _resonant_impulses(rng, n, sample_rate)
    elif kind == "harmonic":
        sound = _extra_partial(rng, n, sample_rate, machine.condition(domain).f0)
    elif kind == "rubbing":
        sound = _rubbing_bursts(rng, n, sample_rate)
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; known: {', '.join(ANOMALY_KINDS)}")
    return sound / (np.std(sound) + 1e-12)


# --- valve: a transient machine ------------------------------------------------------------------------


@dataclass
class _Cycle:
    """One open/close cycle of a valve; times in seconds from the start of the sound (may lie outside it)."""

    open_t: float
    close_t: float
    open_amp: float  # the opening stroke's peak, relative to a nominal closing impact
    close_amp: float
    flow: float = 1.0  # flow-noise gain while open
    bounces: int = 0  # chatter: small impacts after the closing
    bounce_amp: float = 0.0  # the first bounce's peak relative to the closing impact


def _valve_severity(kind: str, level: float) -> float:
    """A valve anomaly's strength from its level (dataset default 0.05-0.15, demo 0.5)."""
    if kind == "chatter":  # the first bounce's peak relative to the closing impact
        return min(0.8, 0.15 + 2.5 * level)
    if kind == "partial":  # the share of the stroke that is missing
        return min(0.85, 0.35 + 2.0 * level)
    if kind == "timing":  # the largest delay of a stroke, as a share of the period
        return min(0.6, 0.1 + 2.0 * level)
    return level  # leak: hiss RMS relative to the normal sound's RMS


def _valve_cycles(cond: CycleCondition, seconds: float, rng: np.random.Generator) -> tuple[list[_Cycle], float]:
    """The clip's cycles (per clip: the period +-3 %, the open share +-5 %; per cycle: durations +-jitter, stroke
    peaks +-8 %) and its period; the first cycle starts at a random phase before the clip."""
    period = cond.period_s * (1.0 + 0.03 * rng.standard_normal())
    ratio = float(np.clip(cond.open_ratio * (1.0 + 0.05 * rng.standard_normal()), 0.1, 0.9))
    cycles: list[_Cycle] = []
    t = -rng.uniform(0.0, period)
    while t < seconds:
        open_s = ratio * period * max(0.2, 1.0 + cond.jitter * rng.standard_normal())
        closed_s = (1.0 - ratio) * period * max(0.2, 1.0 + cond.jitter * rng.standard_normal())
        cycles.append(_Cycle(t, t + open_s, 0.5 * float(np.exp(0.08 * rng.standard_normal())),
                             float(np.exp(0.08 * rng.standard_normal()))))
        t += open_s + closed_s
    return cycles, period


def _affected(cycles: list[_Cycle], weights: np.ndarray, probability: float, seconds: float,
              rng: np.random.Generator, margin_s: float = 0.3) -> np.ndarray:
    """The cycles an anomaly touches: each with `probability` where its weight is positive, and at least one
    that shows: it lies inside the sound, its closing `margin_s` or more before the end, and so does the cycle
    before it where there is one (something to compare it with)."""
    active = weights > 0
    picked = (rng.random(len(cycles)) < probability) & active
    inside = np.array([c.open_t >= 0 and c.close_t < seconds - margin_s for c in cycles]) & active
    shows = inside & np.r_[False, inside[:-1]]
    candidates = shows if shows.any() else inside
    if candidates.any() and not (picked & candidates).any():
        picked[rng.choice(np.flatnonzero(candidates))] = True
    return picked


def _change_cycles(cycles: list[_Cycle], kind: str, severity: float, weights: np.ndarray, period: float,
                   seconds: float, rng: np.random.Generator) -> None:
    """Apply a cycle anomaly (chatter, partial, timing) in place; `weights` scale it per cycle (0: untouched)."""
    if kind == "timing":  # the controller keeps its clock, the valve answers late: a cycle comes late or sticks open
        picked = _affected(cycles, weights, 0.4, seconds, rng, margin_s=0.3 + severity * period)
        for index, (cycle, pick, weight) in enumerate(zip(cycles, picked, weights, strict=True)):
            if pick:
                next_open = cycles[index + 1].open_t if index + 1 < len(cycles) else np.inf
                delta = min(weight * severity * period * rng.uniform(0.3, 1.0), 0.6 * (next_open - cycle.close_t))
                if rng.random() < 0.5:
                    cycle.open_t += delta
                cycle.close_t += delta
    elif kind == "partial":  # the valve opens only part way: weak strokes, a short opening, little flow
        for cycle, pick, weight in zip(cycles, _affected(cycles, weights, 0.35, seconds, rng), weights, strict=True):
            if pick:
                missing = weight * severity
                cycle.open_amp *= 1.0 - 0.7 * missing
                cycle.close_amp *= 1.0 - 0.8 * missing
                cycle.close_t = cycle.open_t + (cycle.close_t - cycle.open_t) * (1.0 - 0.6 * missing)
                cycle.flow *= 1.0 - 0.6 * missing
    elif kind == "chatter":  # the plug bounces on its seat after closing
        for cycle, pick, weight in zip(cycles, _affected(cycles, weights, 0.8, seconds, rng), weights, strict=True):
            if pick:
                cycle.bounces = int(rng.integers(3, 8))
                cycle.bounce_amp = weight * severity


def _ring(t: np.ndarray, hz: float, decay_s: float, phase: float = 0.0) -> np.ndarray:
    return np.exp(-t / decay_s) * np.sin(2 * np.pi * hz * t + phase)


def _stroke_kernels(valve: ValveType, rng: np.random.Generator,
                    sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per clip: the closing impact (seat ring, its second mode, body thump), the opening thump and a
    chatter tick, each with unit peak."""
    seat = valve.seat_hz * (1.0 + 0.03 * rng.standard_normal())
    body = valve.body_hz * (1.0 + 0.05 * rng.standard_normal())
    t = np.arange(int(0.2 * sample_rate)) / sample_rate
    closing = (0.8 * _ring(t, seat, 0.012) + 0.35 * _ring(t, 2.76 * seat, 0.005, rng.uniform(0, 2 * np.pi))
               + 0.6 * _ring(t, body, 0.03))
    opening = 0.8 * _ring(t, 0.9 * body, 0.04) + 0.3 * _ring(t, 0.8 * seat, 0.006, rng.uniform(0, 2 * np.pi))
    tt = t[: int(0.04 * sample_rate)]
    tick = _ring(tt, 1.05 * seat, 0.006) + 0.4 * _ring(tt, 2.76 * seat, 0.003)
    return closing / np.max(np.abs(closing)), opening / np.max(np.abs(opening)), tick / np.max(np.abs(tick))


def _add_at(signal: np.ndarray, start: int, values: np.ndarray) -> None:
    lo, hi = max(0, start), min(signal.size, start + values.size)
    if lo < hi:
        signal[lo:hi] += values[lo - start:hi - start]


def _shaped_noise(rng: np.random.Generator, n: int, sample_rate: int,
                  shape_of_hz: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Gaussian noise with amplitude spectrum shape_of_hz(frequency), unit RMS."""
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    noise = np.fft.irfft(spectrum * shape_of_hz(np.fft.rfftfreq(n, 1.0 / sample_rate)), n)
    return noise / (np.std(noise) + 1e-12)


def _flow_noise(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Broadband flow noise: above ~300 Hz, power ~ 1 / f ** 1.2."""
    return _shaped_noise(rng, n, sample_rate,
                         lambda f: np.maximum(f, 1.0) ** -0.6 * (1.0 - np.exp(-((f / 300.0) ** 2))))


def _leak_hiss(rng: np.random.Generator, n: int, sample_rate: int, cycles: list[_Cycle]) -> np.ndarray:
    """Hiss of a leaking seat (a band around 4 kHz, 2-7 kHz), only while the valve is closed; unit RMS."""
    hiss = _shaped_noise(rng, n, sample_rate,
                         lambda f: np.exp(-0.5 * (np.log(np.maximum(f, 1.0) / 4000.0) / 0.4) ** 2))
    closed = np.ones(n)
    for cycle in cycles:
        lo, hi = max(0, round(cycle.open_t * sample_rate)), min(n, round(cycle.close_t * sample_rate))
        if lo < hi:
            closed[lo:hi] = 0.0
    ramp = max(1, int(0.01 * sample_rate))
    closed = np.convolve(closed, np.ones(ramp) / ramp, mode="same")
    hiss *= closed
    return hiss / (np.std(hiss) + 1e-12)


def _render_valve(valve: ValveType, cond: CycleCondition, cycles: list[_Cycle], n: int, rng: np.random.Generator,
                  sample_rate: int) -> np.ndarray:
    closing, opening, tick = _stroke_kernels(valve, rng, sample_rate)
    click_env = np.exp(-np.arange(int(0.012 * sample_rate)) / (0.0015 * sample_rate))
    strokes = np.zeros(n)
    flow_env = np.zeros(n)
    for cycle in cycles:
        for time, kernel, amp, click in ((cycle.open_t, opening, cycle.open_amp, 0.15),
                                         (cycle.close_t, closing, cycle.close_amp, 0.35)):
            start = round(time * sample_rate)
            _add_at(strokes, start, amp * kernel)
            _add_at(strokes, start, amp * click * click_env * rng.standard_normal(click_env.size))
        time, gap = cycle.close_t, rng.uniform(0.015, 0.03) if cycle.bounces else 0.0
        for bounce in range(cycle.bounces):
            time += gap
            gap *= rng.uniform(0.7, 0.9)
            peak = cycle.close_amp * cycle.bounce_amp * 0.8 ** bounce * rng.uniform(0.7, 1.0)
            _add_at(strokes, round(time * sample_rate), peak * tick)
        # Flow: fades in within ~15 ms of the opening, swells and settles to ~half, throttles before closing.
        start, stop = round(cycle.open_t * sample_rate), round(cycle.close_t * sample_rate)
        tau = np.arange(stop - start) / sample_rate
        env = cycle.flow * (1.0 - np.exp(-tau / 0.015)) * (0.45 + 0.55 * np.exp(-tau / 0.25))
        release = min(env.size, int(0.04 * sample_rate))
        env[env.size - release:] *= np.linspace(1.0, 0.1, release)
        lo, hi = max(0, start), min(n, stop)
        if lo < hi:
            flow_env[lo:hi] = np.maximum(flow_env[lo:hi], env[lo - start:hi - start])
    flow = cond.flow_level * flow_env * _flow_noise(rng, n, sample_rate)
    background = (valve.background_level * rng.uniform(0.85, 1.15)
                  * _coloured_noise(rng, n, cond.noise_alpha, sample_rate))
    return strokes + flow + background


def valve_sound(valve: ValveType, domain: str, seconds: float, rng: np.random.Generator,
                sample_rate: int = SAMPLE_RATE, anomaly: AnomalySpec | None = None,
                envelope: np.ndarray | None = None) -> np.ndarray:
    """A valve cycling in `domain`, unit RMS, float64: normal, or with `anomaly` where `envelope` (one weight
    in 0..1 per sample; None: everywhere) is positive. A cycle anomaly touches cycles that open there."""
    cond = valve.condition(domain)
    n = round(seconds * sample_rate)
    cycles, period = _valve_cycles(cond, seconds, rng)
    if anomaly is not None:
        if anomaly.kind not in VALVE_ANOMALY_KINDS:
            raise DatasetError(f"anomaly kind {anomaly.kind!r} does not apply to {valve.name}; "
                               f"known: {', '.join(VALVE_ANOMALY_KINDS)}")
        if anomaly.kind != "leak":
            if envelope is None:
                weights = np.ones(len(cycles))
            else:
                weights = np.array([envelope[min(n - 1, max(0, round(c.open_t * sample_rate)))] for c in cycles])
            _change_cycles(cycles, anomaly.kind, _valve_severity(anomaly.kind, anomaly.level), weights, period,
                           seconds, rng)
    signal = _render_valve(valve, cond, cycles, n, rng, sample_rate)
    if anomaly is not None and anomaly.kind == "leak":
        hiss = _leak_hiss(rng, n, sample_rate, cycles)
        if envelope is not None:
            hiss = hiss * envelope
        signal = signal + anomaly.level * np.std(signal) * hiss
    if valve.factory_level > 0:
        signal = signal / np.std(signal) + valve.factory_level * _factory_hall(rng, n, sample_rate)
    return signal / np.std(signal)


def _factory_hall(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Other machines in the hall: pink noise (power ~ 1 / f) with a slow swell and a hum (a ~100 Hz
    fundamental and a few harmonics, per clip); unit RMS."""
    noise = _coloured_noise(rng, n, 1.0, sample_rate) * (1.0 + 0.15 * _slow_walk(rng, n, sample_rate, 0.5))
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(90.0, 110.0)
    hum = sum(k ** -1.0 * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 6))
    hum = hum / (np.std(hum) + 1e-12)
    hall = noise + 0.5 * hum
    return hall / (np.std(hall) + 1e-12)


def _hall_events(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Knocks and clanks elsewhere in the hall, to add to a unit-RMS clip: at HALL_EVENTS_PER_S (Poisson),
    each a decaying ring (300 Hz-4 kHz) with a noisy attack, 15-60 ms long, its first 20 ms at 1-2x the clip's
    RMS: such a frame stands 3-7 dB above the median, as the loudest frames of the real DCASE clips in ../shared
    do (fan, gearbox, bearing, slider: 2.7-6.9 dB)."""
    events = np.zeros(n)
    for _ in range(rng.poisson(HALL_EVENTS_PER_S * n / sample_rate)):
        decay = rng.uniform(0.015, 0.06)
        t = np.arange(int(4 * decay * sample_rate)) / sample_rate
        ring = _ring(t, float(np.exp(rng.uniform(np.log(300.0), np.log(4000.0)))), decay, rng.uniform(0, 2 * np.pi))
        knock = ring + 0.5 * np.exp(-t / (0.2 * decay)) * rng.standard_normal(t.size)
        head = knock[: int(0.02 * sample_rate)]
        knock *= rng.uniform(1.0, 2.0) / (np.sqrt(np.mean(head**2)) + 1e-12)
        _add_at(events, int(rng.integers(0, n)), knock)
    return events


def _limit_peak(signal: np.ndarray, limit: float) -> np.ndarray:
    peak = np.max(np.abs(signal))
    return signal * (limit / peak) if peak > limit else signal


# --- clips, datasets, demo recordings ------------------------------------------------------------------


def synthesize_clip(machine: Machine, domain: str, anomaly: AnomalySpec | None, rng: np.random.Generator,
                    seconds: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One clip as float32 with a random overall gain (RMS 0.05-0.12; a valve: 0.015-0.025, peaks at most
    0.7), never clipping."""
    if isinstance(machine, ValveType):
        signal = valve_sound(machine, domain, seconds, rng, sample_rate, anomaly)
        signal = signal + _hall_events(rng, signal.size, sample_rate)
        signal *= rng.uniform(*machine.clip_rms) / np.std(signal)
        return _limit_peak(signal, machine.peak_limit).astype(np.float32)
    signal = normal_sound(machine, domain, seconds, rng, sample_rate)
    if anomaly is not None:
        signal = signal + anomaly.level * anomaly_sound(machine, domain, anomaly.kind, signal.size, rng,
                                                        sample_rate)
    signal = signal + _hall_events(rng, signal.size, sample_rate)
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
                       anomaly_kinds: Sequence[str] | None = None) -> list[SyntheticClip]:
    """Write ROOT/<machine>/{train,test}/section_00_*.wav and ROOT/<machine>/attributes_00.csv.

    Train: n_train_source source and n_train_target target normal clips. Test: n_test_per_class
    clips for each (domain, label) pair. The CSV lists each clip's anomaly kind and level (not used
    by the evaluator, which reads labels from the file names). `anomaly_kinds`: None gives each
    machine all of its own kinds; otherwise each machine draws from those of the listed kinds that
    apply to it (at least one must).
    """
    root = Path(root)
    if n_train_source < 1 or n_test_per_class < 1 or n_train_target < 0:
        raise DatasetError(f"clip counts must be positive: n_train_source={n_train_source}, "
                           f"n_train_target={n_train_target}, n_test_per_class={n_test_per_class}")
    if anomaly_kinds is not None:
        unknown_kinds = [k for k in anomaly_kinds if k not in ALL_ANOMALY_KINDS]
        if unknown_kinds or not anomaly_kinds:
            raise DatasetError(f"anomaly kinds {list(anomaly_kinds)}: choose from {', '.join(ALL_ANOMALY_KINDS)}")
    specs = [machine_type(name) for name in machines]
    kinds_of: dict[str, tuple[str, ...]] = {}
    for machine in specs:
        own = machine.anomaly_kinds
        kinds_of[machine.name] = own if anomaly_kinds is None else tuple(k for k in anomaly_kinds if k in own)
        if not kinds_of[machine.name]:
            raise DatasetError(f"anomaly kinds {list(anomaly_kinds or ())}: none applies to {machine.name} "
                               f"({', '.join(own)})")
    written: list[SyntheticClip] = []
    for machine_index, machine in enumerate(specs):
        machine_kinds = kinds_of[machine.name]
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
                kind = machine_kinds[int(rng.integers(len(machine_kinds)))]
                anomaly = AnomalySpec(kind, float(rng.uniform(*anomaly_level)))
            audio = synthesize_clip(machine, domain, anomaly, rng, seconds, sample_rate)
            name = f"section_00_{domain}_{split}_{label}_{index:04d}_{machine.name_attributes(domain)}.wav"
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
                         machine: str = "fan", domain: str = "source", anomaly_kind: str | None = None,
                         anomaly_level: float = 0.5, sample_rate: int = SAMPLE_RATE) -> Path:
    """One long recording of `machine` running normally, with `anomaly_kind` faded in over anomaly_span.

    The anomaly ramps in and out over 1 s at each edge (a valve's cycle anomalies touch the cycles that
    open in the span, scaled by the ramp); `anomaly_span=None` gives a normal-only file. `anomaly_kind`
    None: the machine's first kind (`bearing`; a valve: `chatter`).
    """
    path = Path(path)
    spec = machine_type(machine)
    kind = spec.anomaly_kinds[0] if anomaly_kind is None else anomaly_kind
    rng = np.random.default_rng([seed, _stable_hash(machine), 7])
    n = round(seconds * sample_rate)
    if not isinstance(spec, ValveType):
        signal = normal_sound(spec, domain, seconds, rng, sample_rate)
    envelope = None
    if anomaly_span is not None:
        start, end = anomaly_span
        if not 0 <= start < end <= seconds:
            raise DatasetError(f"anomaly_span {anomaly_span} must lie within the recording (0, {seconds})")
        if kind not in spec.anomaly_kinds:
            raise DatasetError(f"anomaly kind {kind!r} does not apply to {spec.name}; "
                               f"known: {', '.join(spec.anomaly_kinds)}")
        envelope = np.zeros(n)
        first, last = int(start * sample_rate), int(end * sample_rate)
        envelope[first:last] = 1.0
        ramp = min(sample_rate, (last - first) // 2)
        envelope[first:first + ramp] = np.linspace(0, 1, ramp)
        envelope[last - ramp:last] = np.linspace(1, 0, ramp)
    if isinstance(spec, ValveType):
        anomaly = AnomalySpec(kind, anomaly_level) if envelope is not None else None
        signal = valve_sound(spec, domain, seconds, rng, sample_rate, anomaly, envelope)
        signal = _limit_peak(signal * (spec.demo_rms / np.std(signal)), spec.peak_limit)
    else:
        if envelope is not None:
            signal = signal + anomaly_level * envelope * anomaly_sound(spec, domain, kind, signal.size, rng,
                                                                       sample_rate)
        signal = _limit_peak(signal * (0.08 / np.std(signal)), 0.99)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, signal.astype(np.float32), sample_rate)
    return path
