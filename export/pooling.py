"""GenRep pooling: keep frequency, drop time; and which pooled outputs an export has.

Every family hands its block outputs over as a grid [batch, time, freq, channels] (transformer
tokens reshaped, or a CNN map [B, C, F, T] permuted); the pooled vector is flattened as [F, C]
(index f * C + c). An export pools each requested block with one or more modes (`Poolings`): the
first mode's output keeps the plain name (`layer_12`), the others are `layer_12@<suffix>`
(edge_agent.model_info.POOLING_SUFFIXES).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from edge_agent.model_info import POOLINGS, pooled_output_name

DEFAULT_GEM_P = 3.0
# GeM clamps its input at GEM_EPS before the power: negative and zero activations count as GEM_EPS.
GEM_EPS = 1e-6
# p = 1 is the mean of the clamped input, larger p move towards the max (time-max is the limit). Up to 6,
# GEM_EPS^p = 1e-36 stays a normal float32 (not flushed to zero), so a never-positive bin gives GEM_EPS.
GEM_P_MIN, GEM_P_MAX = 1.0, 6.0


def pool_grid(grid: torch.Tensor, mode: str, gem_p: float = DEFAULT_GEM_P) -> torch.Tensor:
    """grid [B, T, F, C] -> [B, D]; every time-* mode and gem keep frequency and flatten [F, C].

    time-mean:    mean over T (the GenRep default), D = F*C
    time-meanstd: [mean over T, population std over T] concatenated, D = 2*F*C: the F*C means
                  first, then the F*C standard deviations, each flattened like time-mean;
                  std = sqrt(mean over T of (x - mean)^2), i.e. divided by T, not T - 1
    time-max:     max over T, D = F*C
    gem:          generalized mean over T, (mean over T of max(x, GEM_EPS)^p)^(1/p), D = F*C.
                  Negative (and near-zero) activations are clamped to GEM_EPS first, as the usual
                  GeM does: they contribute GEM_EPS^p, so a bin that never exceeds GEM_EPS gives GEM_EPS
    time-delta:   mean over t of |x[t+1] - x[t]|, D = F*C: how much each (freq, channel) bin moves from one
                  step to the next (the strokes and the quiet between them of a transient machine; a
                  steady machine's bins barely move). A grid of one step has not moved: zeros
    spatial:      mean over T and F, D = C
    spectral:     mean over F, flatten T*C (keeps time; for ablations only)
    """
    if mode == "time-mean":
        return grid.mean(dim=1).flatten(1)
    if mode == "time-meanstd":
        mean = grid.mean(dim=1, keepdim=True)
        centered = grid - mean
        std = torch.sqrt((centered * centered).mean(dim=1))
        return torch.cat([mean.flatten(1), std.flatten(1)], dim=1)
    if mode == "time-max":
        return grid.amax(dim=1).flatten(1)
    if mode == "gem":
        check_gem_p(gem_p)
        return grid.clamp(min=GEM_EPS).pow(gem_p).mean(dim=1).pow(1.0 / gem_p).flatten(1)
    if mode == "time-delta":
        if grid.shape[1] < 2:
            return torch.zeros_like(grid[:, 0]).flatten(1)
        return (grid[:, 1:] - grid[:, :-1]).abs().mean(dim=1).flatten(1)
    if mode == "spatial":
        return grid.mean(dim=(1, 2))
    if mode == "spectral":
        return grid.mean(dim=2).flatten(1)
    raise ValueError(f"pooling {mode!r} is not one of {POOLINGS}")


def pooled_dim(time: int, freq: int, channels: int, mode: str) -> int:
    dims = {
        "time-mean": freq * channels,
        "time-meanstd": 2 * freq * channels,
        "time-max": freq * channels,
        "gem": freq * channels,
        "time-delta": freq * channels,
        "spatial": channels,
        "spectral": time * channels,
    }
    if mode not in dims:
        raise ValueError(f"pooling {mode!r} is not one of {POOLINGS}")
    return dims[mode]


def cnn_map_to_grid(feature_map: torch.Tensor) -> torch.Tensor:
    """CNN map [B, C, F, T] -> grid [B, T, F, C]."""
    return feature_map.permute(0, 3, 2, 1)


def check_gem_p(gem_p: float) -> None:
    if isinstance(gem_p, bool) or not isinstance(gem_p, (int, float)) or not math.isfinite(gem_p) \
            or not GEM_P_MIN <= gem_p <= GEM_P_MAX:
        raise ValueError(f"gem p {gem_p!r} must be a number in [{GEM_P_MIN:g}, {GEM_P_MAX:g}]")


@dataclass(frozen=True)
class Poolings:
    """The pooling modes of one export, in order (the first is the default: plain output names), and GeM's p."""

    modes: tuple[str, ...] = ("time-mean",)
    gem_p: float = DEFAULT_GEM_P

    def __post_init__(self) -> None:
        if isinstance(self.modes, str) or not self.modes:
            raise ValueError(f"poolings must be a non-empty sequence of {POOLINGS}, got {self.modes!r}")
        object.__setattr__(self, "modes", tuple(self.modes))
        unknown = [mode for mode in self.modes if mode not in POOLINGS]
        if unknown:
            raise ValueError(f"pooling {', '.join(map(repr, unknown))} is not one of {POOLINGS}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"poolings repeat: {', '.join(self.modes)}")
        check_gem_p(self.gem_p)
        object.__setattr__(self, "gem_p", float(self.gem_p))

    @classmethod
    def of(cls, pooling: str | Poolings) -> Poolings:
        """A family's build() takes one mode name (as before) or a Poolings."""
        return pooling if isinstance(pooling, Poolings) else cls((pooling,))

    @property
    def default(self) -> str:
        return self.modes[0]

    def outputs(self, layers: Sequence[str], fixed: Mapping[str, str] | None = None) -> tuple[PooledOutput, ...]:
        """One output per (layer, mode), layer by layer in the order given, modes in their order.

        fixed: layers that have one pooling of their own whatever the modes (EfficientAT's
        `embedding`, a spatial mean): one output each, under the layer's plain name.
        """
        fixed = fixed or {}
        found: list[PooledOutput] = []
        for layer in layers:
            if layer in fixed:
                found.append(PooledOutput(layer, layer, fixed[layer]))
                continue
            for index, mode in enumerate(self.modes):
                found.append(PooledOutput(pooled_output_name(layer, mode, index == 0), layer, mode))
        return tuple(found)


@dataclass(frozen=True)
class PooledOutput:
    name: str  # the ONNX output name, e.g. "layer_12@max"
    layer: str  # the block it pools, e.g. "layer_12"
    mode: str  # its pooling, e.g. "time-max"
