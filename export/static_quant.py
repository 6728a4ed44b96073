"""Static int8 (QDQ) quantization of an exported encoder, calibrated on synthetic normal machine sound.

Dynamic quantization covers only MatMul/Gemm, so a convolutional encoder (mn04) stays float. Static QDQ
quantizes the convolutions too: activation ranges come from a calibration pass (MinMax) over windows of
normal clips from the synthetic generator (fan, pump, gearbox, valve; source and target domains), brought
to the model's rate and window like the agent's own input (`resample`, `fit_to_window`). Weights are
quantized per output channel. Nodes listed in `exclude` (the log-mel front-end by default) stay float.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import fit_to_window
from edge_agent.evaluation.synthetic import CLIP_SECONDS, SAMPLE_RATE, machine_type, synthesize_clip
from edge_agent.model_info import INPUT_NAME

CALIBRATION_MACHINES = ("fan", "pump", "gearbox", "valve")
CALIBRATION_WINDOWS = 16  # spread over the machines and both domains
CALIBRATION_SEED = 20_231  # not a seed the bench/test sets use
CALIBRATION_BATCH = 2


def calibration_windows(window_samples: int, sample_rate: int, count: int = CALIBRATION_WINDOWS,
                        seed: int = CALIBRATION_SEED,
                        machines: Sequence[str] = CALIBRATION_MACHINES) -> np.ndarray:
    """[count, window_samples] float32: synthetic normal clips at the model rate, one window each."""
    if count < 1:
        raise ValueError(f"calibration needs at least one window, got {count}")
    rng = np.random.default_rng(seed)
    specs = [machine_type(name) for name in machines]
    out = []
    for i in range(count):
        machine = specs[i % len(specs)]
        domain = "target" if (i // len(specs)) % 2 else "source"
        audio = synthesize_clip(machine, domain, None, rng, CLIP_SECONDS, SAMPLE_RATE)
        out.append(fit_to_window(resample(audio, SAMPLE_RATE, sample_rate), window_samples))
    return np.stack(out).astype(np.float32)


class WindowReader(CalibrationDataReader):
    """Feeds the calibration windows to the quantizer in small batches."""

    def __init__(self, windows: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = [windows[i:i + batch] for i in range(0, len(windows), batch)]
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def quantize_static_qdq(source: Path, dest: Path, windows: np.ndarray, exclude: Sequence[str] = (),
                        per_channel: bool = True) -> None:
    """Write dest: source with QDQ int8 weights (per channel) and activations, `exclude` nodes left float."""
    quantize_static(
        str(source),
        str(dest),
        WindowReader(windows),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=list(exclude),
    )
