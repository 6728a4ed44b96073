"""One or several encoders used together: an ensemble embeds each window with every member.

Members may run at different sample rates (mn04 32 kHz, CED / BEATs 16 kHz): audio is captured at
one rate (`capture_rate`, the highest member rate, so no member loses bandwidth) and resampled to
each member's rate before its encoder runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import fit_to_window
from edge_agent.errors import ConfigError
from edge_agent.model.encoder import Encoder
from edge_agent.model_info import ensemble_id


class ModelSet:
    """The encoders of an agent or a CLI run, in the order they were given."""

    def __init__(self, encoders: Sequence[Encoder]) -> None:
        if not encoders:
            raise ConfigError("models", "needs at least one model")
        shas = [e.model_sha256 for e in encoders]
        for i, sha in enumerate(shas):
            if sha in shas[:i]:
                raise ConfigError("models", f"{encoders[i].path} is the same model as "
                                  f"{encoders[shas.index(sha)].path} (sha256 {sha[:12]}…)", str(encoders[i].path))
        self.encoders = list(encoders)
        self.members = [e.member for e in encoders]
        self.model_id = ensemble_id([e.model_id for e in encoders])
        self.capture_rate = max(e.info.sample_rate for e in encoders)

    def __len__(self) -> int:
        return len(self.encoders)

    def prepare(self, windows: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """(samples, rate) windows -> per member [B, window_samples] at that member's rate."""
        out = []
        for enc in self.encoders:
            info = enc.info
            out.append(np.stack([fit_to_window(resample(samples, rate, info.sample_rate), info.window_samples)
                                 for samples, rate in windows]))
        return out

    def embed(self, prepared: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per member windows (from prepare) -> per member {layer: [B, D]}."""
        return [enc.embed(x) for enc, x in zip(self.encoders, prepared, strict=True)]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per member for state payloads and summaries."""
        return [{"id": e.model_id, "sha256": e.model_sha256, "family": e.info.family, "variant": e.info.variant,
                 "sample_rate": e.info.sample_rate, "window_samples": e.info.window_samples,
                 "providers": list(e.providers)} for e in self.encoders]
