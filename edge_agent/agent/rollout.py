"""The node's side of a fleet rollout: the desired documents received (its own topic and its groups'), which
one to act on next, and fetching its artifacts off the control thread with progress and self-tests.

The control plane owns the trial: once every artifact of a document is in the store it builds the config
and puts it on trial like any pushed config (control.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent.artifacts import ArtifactError, ArtifactRef, ArtifactStore, FetchLimits
from edge_agent.agent.config import AgentConfig, FleetConfig
from edge_agent.agent.desired import DesiredDocument, DesiredState, rank
from edge_agent.errors import EdgeAsdError
from edge_agent.logs import get_logger
from edge_agent.model.encoder import Encoder
from edge_agent.model.model_set import ModelSet
from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank_set import load_banks

log = get_logger(__name__)

PROGRESS_STEP = 5.0  # percent between progress reports of a download


@dataclass
class Fetch:
    """A document whose artifacts are being fetched."""

    document: DesiredDocument
    cancel: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    done: bool = False


class Rollout:
    def __init__(self, cfg: AgentConfig, on_change: Callable[[], None]) -> None:
        """on_change: called (from the fetch thread) when progress or the fetch's outcome changes."""
        self.fleet: FleetConfig = cfg.fleet
        self.state = DesiredState(cfg.state_dir)
        self.store = ArtifactStore(cfg.state_dir / "artifacts")
        self.candidates: dict[str, DesiredDocument] = {}  # origin -> the newest document received from it
        self.fetch: Fetch | None = None
        self.progress: dict[str, Any] | None = None
        self._on_change = on_change
        self._ignored: set[tuple[str, int]] = set()  # (origin, version) already logged as ignored
        self._lock = threading.Lock()

    @property
    def groups(self) -> list[str]:
        return list(self.fleet.groups)

    def offer(self, doc: DesiredDocument) -> None:
        """A checked document arrived on `doc.origin`'s topic."""
        self.candidates[doc.origin] = doc

    def next_document(self) -> DesiredDocument | None:
        """The best candidate if it ranks above everything already applied or tried."""
        if not self.candidates:
            return None
        tried = self.state.tried_rank(self.groups)
        best = max(self.candidates.values(), key=lambda d: rank(d.version, d.origin, self.groups))
        for doc in self.candidates.values():
            key = (doc.origin, doc.version)
            if rank(doc.version, doc.origin, self.groups) <= tried and key not in self._ignored:
                self._ignored.add(key)
                log.info("desired_ignored", origin=doc.origin, version=doc.version, request_id=doc.id,
                         reason="not newer than the version applied or tried",
                         tried_version=tried[0])
        return best if rank(best.version, best.origin, self.groups) > tried else None

    def missing(self, doc: DesiredDocument) -> list[tuple[str, ArtifactRef]]:
        return [(key, ref) for key, ref in doc.artifacts.items() if self.store.path_of(ref) is None]

    def paths(self, doc: DesiredDocument) -> dict[str, Path]:
        found = {key: self.store.path_of(ref) for key, ref in doc.artifacts.items()}
        return {key: path for key, path in found.items() if path is not None}

    # --- fetching (a thread of its own) ------------------------------------------------------------

    def start_fetch(self, doc: DesiredDocument, running_models: ModelSet) -> None:
        fetch = Fetch(doc)
        self.fetch = fetch
        self._set_progress(doc, "downloading", None, 0.0)
        threading.Thread(target=self._fetch_all, args=(fetch, running_models), name="artifacts", daemon=True).start()

    def cancel(self) -> None:
        if self.fetch is not None:
            self.fetch.cancel.set()

    def _fetch_all(self, fetch: Fetch, running_models: ModelSet) -> None:
        doc = fetch.document
        limits = FetchLimits(max_bytes=self.fleet.max_artifact_bytes,
                             timeout_seconds=self.fleet.download_timeout_seconds,
                             min_free_bytes=self.fleet.min_free_bytes, ca_file=self.fleet.ca_file)
        started = time.monotonic()
        try:
            # Models first: a bank is checked against the models it will run with.
            order = sorted(self.missing(doc), key=lambda item: item[1].kind != "model")
            for key, ref in order:
                last = [-PROGRESS_STEP]

                def progress(phase: str, percent: float | None, key: str = key, last: list[float] = last) -> None:
                    if phase == "downloading" and percent is not None and percent - last[0] < PROGRESS_STEP \
                            and percent < 100.0:
                        return
                    if percent is not None:
                        last[0] = percent
                    self._set_progress(doc, phase, key, percent)

                test = self_test_model if ref.kind == "model" else self._bank_test(doc, running_models)
                self.store.fetch(ref, limits, progress=progress, self_test=test, cancel=fetch.cancel)
            log.info("desired_artifacts_ready", version=doc.version, origin=doc.origin,
                     seconds=round(time.monotonic() - started, 2))
        except ArtifactError as exc:
            fetch.error = str(exc)
        except Exception as exc:  # a bug must not leave the rollout waiting forever
            log.exception("desired_fetch_failed", version=doc.version, origin=doc.origin)
            fetch.error = f"internal error while fetching ({type(exc).__name__}: {exc})"
        fetch.done = True
        self._on_change()

    def _bank_test(self, doc: DesiredDocument, running_models: ModelSet) -> Callable[[Path], None]:
        def test(path: Path) -> None:
            load_banks(path, self._members(doc, running_models))
        return test

    def _members(self, doc: DesiredDocument, running_models: ModelSet) -> list[MemberModel]:
        """The models the document will run with: its own (fetched or local) or, without any, the running ones."""
        entries = doc.config.get("models") or ([doc.config["model"]] if "model" in doc.config else [])
        if not entries:
            return list(running_models.members)
        members = []
        for i, entry in enumerate(entries):
            key = "config.model" if "model" in doc.config else f"config.models[{i}]"
            ref = doc.artifacts.get(key)
            path = self.store.path_of(ref) if ref is not None else Path(entry["path"])
            if path is None:
                raise EdgeAsdError(f"{key}: the model is not in the artifact store")
            members.append(Encoder(path, providers=("cpu",)).member)
        return members

    def _set_progress(self, doc: DesiredDocument, phase: str, artifact: str | None, percent: float | None) -> None:
        with self._lock:
            self.progress = {"version": doc.version, "origin": doc.origin, "phase": phase, "artifact": artifact,
                             "percent": None if percent is None else round(percent, 1)}
        self._on_change()

    def clear_progress(self, phase: str | None = None) -> None:
        with self._lock:
            if phase is None or self.progress is None:
                self.progress = None
            else:
                self.progress = {**self.progress, "phase": phase, "artifact": None, "percent": None}


def self_test_model(path: Path) -> None:
    """The model loads and embeds a fixed test signal (a 1 kHz tone) into finite embeddings of its layers."""
    encoder = Encoder(path, providers=("cpu",))
    rate, samples = encoder.info.sample_rate, encoder.info.window_samples
    tone = (0.1 * np.sin(2 * np.pi * 1000.0 * np.arange(samples) / rate)).astype(np.float32)
    outputs = encoder.embed(tone[None, :])
    for layer, value in outputs.items():
        if value.shape[0] != 1 or not np.all(np.isfinite(value)):
            raise EdgeAsdError(f"{path}: layer {layer} gives non-finite or misshapen embeddings {list(value.shape)}")
