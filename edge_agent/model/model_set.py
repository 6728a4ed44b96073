"""One or several encoders used together: an ensemble embeds each window with every member.

Members may run at different sample rates (mn04 32 kHz, CED / BEATs 16 kHz): audio is captured at
one rate (`capture_rate`, the highest member rate, so no member loses bandwidth) and resampled to
each member's rate before its encoder runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

    @property
    def rates(self) -> tuple[int, ...]:
        """The members' sample rates (a live source resamples its stream once to each)."""
        return tuple(sorted({e.info.sample_rate for e in self.encoders}))

    def prepare(self, windows: Sequence[tuple[np.ndarray, int]],
                resampled: Sequence[Mapping[int, np.ndarray]] | None = None) -> list[np.ndarray]:
        """(samples, rate) windows -> per member [B, window_samples] at that member's rate. `resampled`: per
        window, copies already at some rates (cut from a stream resampled once); others are resampled here."""
        out = []
        for enc in self.encoders:
            info = enc.info
            rows = []
            for i, (samples, rate) in enumerate(windows):
                ready = resampled[i].get(info.sample_rate) if resampled is not None else None
                x = ready if ready is not None else resample(samples, rate, info.sample_rate)
                rows.append(fit_to_window(x, info.window_samples))
            out.append(np.stack(rows))
        return out

    def embed(self, prepared: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per member windows (from prepare) -> per member {layer: [B, D]}."""
        return [enc.embed(x) for enc, x in zip(self.encoders, prepared, strict=True)]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per member for state payloads and summaries."""
        return [{"id": e.model_id, "sha256": e.model_sha256, "family": e.info.family, "variant": e.info.variant,
                 "sample_rate": e.info.sample_rate, "window_samples": e.info.window_samples,
                 "providers": list(e.providers)} for e in self.encoders]
