"""What every exportable encoder module looks like to the exporter."""

from __future__ import annotations

import torch
from torch import nn


class CheckpointError(Exception):
    """A checkpoint file is missing, of the wrong family/size, or its keys do not match the model."""


class ExportableEncoder(nn.Module):
    """waveform [batch, window_samples] float32 at sample_rate -> one pooled embedding per output.

    Subclasses set the attributes below and implement forward(waveform) -> tuple of [batch, D_i]
    tensors in the order of output_names. The front-end is part of forward, so it lands in the graph.
    """

    family: str
    variant: str
    sample_rate: int
    window_samples: int
    output_names: tuple[str, ...]
    dims: tuple[int, ...]
    default_layers: tuple[str, ...]
    pooling: str

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError
