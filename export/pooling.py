"""GenRep pooling: keep frequency, drop time.

Every family hands its block outputs over as a grid [batch, time, freq, channels] (transformer
tokens reshaped, or a CNN map [B, C, F, T] permuted); the pooled vector is flattened as [F, C].
"""

from __future__ import annotations

import torch

from edge_agent.model_info import POOLINGS


def pool_grid(grid: torch.Tensor, mode: str) -> torch.Tensor:
    """grid [B, T, F, C] -> [B, D].

    time-mean: mean over T, flatten F*C (the GenRep default, D = F*C)
    spatial:   mean over T and F (D = C)
    spectral:  mean over F, flatten T*C (keeps time; for ablations only)
    """
    batch = grid.shape[0]
    if mode == "time-mean":
        return grid.mean(dim=1).reshape(batch, -1)
    if mode == "spatial":
        return grid.mean(dim=(1, 2))
    if mode == "spectral":
        return grid.mean(dim=2).reshape(batch, -1)
    raise ValueError(f"pooling {mode!r} is not one of {POOLINGS}")


def pooled_dim(time: int, freq: int, channels: int, mode: str) -> int:
    return {"time-mean": freq * channels, "spatial": channels, "spectral": time * channels}[mode]


def cnn_map_to_grid(feature_map: torch.Tensor) -> torch.Tensor:
    """CNN map [B, C, F, T] -> grid [B, T, F, C]."""
    return feature_map.permute(0, 3, 2, 1)
