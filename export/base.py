"""What every exportable encoder module looks like to the exporter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from export.pooling import PooledOutput, Poolings


class CheckpointError(Exception):
    """A checkpoint file is missing, of the wrong family/size, or its keys do not match the model."""


class ExportableEncoder(nn.Module):
    """waveform [batch, window_samples] float32 at sample_rate -> one pooled embedding per output.

    Subclasses set the attributes below (set_outputs sets those about outputs) and implement
    forward(waveform) -> tuple of [batch, D_i] tensors in the order of output_names. The front-end
    is part of forward, so it lands in the graph.
    """

    family: str
    variant: str
    sample_rate: int
    window_samples: int
    output_names: tuple[str, ...]
    output_poolings: tuple[str, ...]  # the pooling of each output
    dims: tuple[int, ...]
    default_layers: tuple[str, ...]
    pooling: str  # the default (first) pooling: that of the plain-named outputs
    gem_p: float

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    def set_outputs(self, poolings: Poolings, outputs: Sequence[PooledOutput], dims: Sequence[int],
                    family_defaults: Sequence[str]) -> None:
        """Output names, poolings and dims; default_layers = the family defaults among the outputs, or
        else every output of the default pooling (scoring then uses them all)."""
        self.pooling = poolings.default
        self.gem_p = poolings.gem_p
        self.pooled_outputs = tuple(outputs)
        self.output_names = tuple(output.name for output in outputs)
        self.output_poolings = tuple(output.mode for output in outputs)
        self.dims = tuple(dims)
        chosen = tuple(name for name in family_defaults if name in self.output_names)
        self.default_layers = chosen or tuple(output.name for output in outputs if output.name == output.layer)


@dataclass(frozen=True)
class BlockLayers:
    """The outputs of a family whose variants all have `depth` blocks, exported as layer_1 .. layer_<depth>."""

    family: str  # as messages name it: "BEATs", "CED"
    variants: tuple[str, ...]
    depth: int
    defaults: tuple[str, ...]  # the scoring defaults, documented with evidence in the family module

    def check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(f"unknown {self.family} variant {variant!r}; known: {', '.join(self.variants)}")

    def available(self, variant: str) -> tuple[str, ...]:
        self.check_variant(variant)
        return tuple(f"layer_{i}" for i in range(1, self.depth + 1))

    def default(self, variant: str) -> tuple[str, ...]:
        self.check_variant(variant)
        return self.defaults

    def exported_by_default(self, variant: str) -> tuple[str, ...]:
        """All blocks, so layers can be chosen on development data; `--layers` trims the graph for a device."""
        return self.available(variant)

    def indices(self, layers: Sequence[str]) -> tuple[int, ...]:
        """layer_i names -> block numbers i (1-based), refusing unknown or repeated names."""
        if not layers:
            raise ValueError("no layers requested")
        indices = []
        for name in layers:
            number = name.removeprefix("layer_")
            if not name.startswith("layer_") or not number.isdigit() or not 1 <= int(number) <= self.depth:
                raise ValueError(f"{self.family} has outputs layer_1 .. layer_{self.depth}; got {name!r}")
            indices.append(int(number))
        if len(set(indices)) != len(indices):
            raise ValueError(f"layers repeat: {list(layers)}")
        return tuple(indices)
