"""Everything a config builds (encoders, banks, scorers, thresholds, sources), as one `Runtime`.

`build_runtime` builds a new runtime completely beside the running one, reusing its unchanged parts,
so that the agent can swap the reference atomically; it raises rather than half-builds. `LiveRuntime`
holds the runtime in use and the lock that orders swaps against the hot loop's decisions.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.agent.config import AgentConfig, SourceConfig
from edge_agent.agent.drift import DriftTracker
from edge_agent.agent.enroll_job import EnrollJob
from edge_agent.agent.episodes import EpisodeTracker
from edge_agent.agent.learning import LearnJob
from edge_agent.agent.payloads import AlertContext
from edge_agent.agent.sources import AudioSource, make_source
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.logs import get_logger
from edge_agent.model.encoder import Encoder
from edge_agent.model.model_set import ModelSet
from edge_agent.scoring.bank import BANK_JSON
from edge_agent.scoring.bank_set import ENSEMBLE_JSON, BankSet, load_banks
from edge_agent.scoring.calibration import DEFAULT_QUANTILE, calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import Scorer

log = get_logger(__name__)

# Above this many source refs the drift's calibration is not computed at every load (a leave-one-out search per
# ref): the drift is then judged on the fraction of windows over the threshold only.
MAX_CALIBRATION_REFS = 20_000

# Fields of a source whose change needs a new capture; any other change keeps the running capture.
CAPTURE_FIELDS = ("type", "path", "realtime", "loop", "device", "sample_rate", "channels", "channel",
                  "block_seconds", "buffer_seconds", "window_seconds", "hop_seconds", "speed",
                  "stall_seconds", "retry_initial_seconds", "retry_max_seconds", "audio_checks")


@dataclass
class SourcePipeline:
    cfg: SourceConfig
    source: AudioSource
    bank: BankSet | None  # one bank per model of the runtime's model set; None while learning the first one
    bank_id: str
    scorer: Scorer | None
    threshold: float
    # "config" | "bank" | "recalibrated" (the bank's, calibrated again: scored otherwise now) | "learning"
    threshold_origin: str
    tracker: EpisodeTracker
    context: AlertContext
    bank_path: Path  # where the bank is (sources.bank, or <state_dir>/banks/<source> when learned on site)
    drift: DriftTracker
    enroll: EnrollJob | None = None
    learn: LearnJob | None = None
    bank_stamp: tuple[int, int, int] | None = None
    bank_sha256: str = ""  # content hash of the banks (bank_id is its first 12 characters)

    @property
    def scoring(self) -> ScoringConfig:
        return self.cfg.scoring

    @property
    def learning(self) -> bool:
        """No bank yet: the source records to learn its first one."""
        return self.bank is None


@dataclass(frozen=True)
class FailedSource:
    """A source of the config that does not run: its bank (or scoring against it) failed to load."""

    cfg: SourceConfig
    error: ConfigError
    bank_stamp: tuple[int, int, int] | None  # the bank files as they were: a change is worth another try


@dataclass
class Runtime:
    cfg: AgentConfig
    models: ModelSet  # one encoder, or the members of an ensemble
    pipelines: dict[str, SourcePipeline]
    fresh_sources: list[AudioSource]  # built for this runtime, not yet started
    failed: dict[str, FailedSource] = field(default_factory=dict)


class LiveRuntime:
    """The runtime in use. Swaps and the hot loop's decisions take `lock`; reading `current` needs no lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.lock = threading.RLock()


def build_models(cfg: AgentConfig, previous: Runtime | None) -> ModelSet:
    if previous is not None and previous.cfg.model_configs == cfg.model_configs:
        return previous.models
    encoders = []
    for key, mcfg in zip(cfg.model_keys, cfg.model_configs, strict=True):
        try:
            encoders.append(Encoder(mcfg.path, providers=tuple(mcfg.providers),
                                    intra_op_threads=mcfg.intra_op_threads, allow_spinning=False))
        except EdgeAsdError as exc:
            raise ConfigError(f"{key}.path", str(exc), source=cfg.source_file) from None
    try:
        return ModelSet(encoders)
    except ConfigError as exc:
        raise exc.in_source(cfg.source_file) from None


def build_runtime(cfg: AgentConfig, previous: Runtime | None, isolate: bool = False) -> Runtime:
    """Build every part of `cfg`, reusing unchanged parts of `previous`; raises, never half-builds.

    isolate: a source whose bank does not load is set aside as failed while the others run (at a start, a
    reload, a retry); without it (a pushed config) any failure refuses the whole config. Either way at
    least one source must run.
    """
    models = build_models(cfg, previous)
    pipelines: dict[str, SourcePipeline] = {}
    failed: dict[str, FailedSource] = {}
    fresh: list[AudioSource] = []
    for i, src in enumerate(cfg.sources):
        at = f"sources[{i}]"
        old = previous.pipelines.get(src.name) if previous is not None else None
        path = bank_path(cfg, src)
        stamp = bank_stamp(path)
        banks: BankSet | None
        scorer: Scorer | None
        if old is not None and old.bank_path == path and old.bank_stamp == stamp and old.scoring == src.scoring \
                and old.context.model == models.model_id:
            banks, scorer, bank_sha256 = old.bank, old.scorer, old.bank_sha256
        elif src.bank is None and stamp is None:  # nothing learned yet: the source learns its first bank
            banks, scorer, bank_sha256 = None, None, ""
        else:
            try:
                try:
                    banks = load_banks(path, models.members)
                    scorer = Scorer.fit(banks.banks, src.scoring)
                except ConfigError as exc:
                    raise exc.under(at).in_source(cfg.source_file) from None
                except EdgeAsdError as exc:
                    raise ConfigError(f"{at}.bank", str(exc), source=cfg.source_file) from None
            except ConfigError as exc:
                if src.bank is None:  # a bank learned on site that no longer fits (another model): learn again
                    log.warning("learned_bank_unusable", source=src.name, path=str(path), error=exc.message)
                    banks, scorer = None, None
                elif not isolate:
                    raise
                else:
                    failed[src.name] = FailedSource(src, exc, stamp)
                    continue
            bank_sha256 = banks.content_hash() if banks is not None else ""
        try:
            threshold, origin = _threshold(src, banks, scorer, at, cfg.source_file, old) \
                if banks is not None and scorer is not None else (math.nan, "learning")
        except ConfigError as exc:
            if not isolate:
                raise
            failed[src.name] = FailedSource(src, exc, stamp)
            continue
        bank_id = bank_sha256[:12]
        context = AlertContext(node=cfg.node, source=src.name, model=models.model_id, bank=bank_id,
                               threshold=threshold)
        same_rate = old is not None and old.source.model_rate == models.capture_rate
        if old is not None and same_rate and _capture_key(old.cfg) == _capture_key(src):
            source = old.source
        else:
            source = make_source(src, models.capture_rate)
            fresh.append(source)
        # Paced sources resample their stream once per model rate (from their next windower on: a new file or
        # stream). A file replayed as fast as possible fills the window queue, where each copy would wait too.
        source.resample_to = models.rates if src.type in ("mic", "stdin") or src.realtime else ()
        tracker = old.tracker if old is not None else EpisodeTracker(context, src.hysteresis)
        if old is not None and old.bank is banks and old.threshold == threshold and old.cfg.drift == src.drift:
            drift = old.drift
        else:
            drift = make_drift(src, banks, scorer, threshold, origin)
        pipelines[src.name] = SourcePipeline(src, source, banks, bank_id, scorer, threshold, origin, tracker,
                                             context, path, drift, bank_stamp=stamp, bank_sha256=bank_sha256)
    if not pipelines:  # nothing would be monitored: that is a config that cannot start
        raise next(iter(failed.values())).error
    return Runtime(cfg, models, pipelines, fresh, failed)


def failed_sources_changed(runtime: Runtime) -> list[str]:
    """The failed sources whose bank files changed since they failed (worth another try)."""
    return [name for name, f in runtime.failed.items() if bank_stamp(bank_path(runtime.cfg, f.cfg)) != f.bank_stamp]


def bank_path(cfg: AgentConfig, src: SourceConfig) -> Path:
    """The bank of a source: `sources[].bank`, or the one learned on site under the state dir."""
    return src.bank if src.bank is not None else cfg.state_dir / "banks" / src.name


def make_drift(src: SourceConfig, banks: BankSet | None, scorer: Scorer | None, threshold: float,
               origin: str) -> DriftTracker:
    """The drift tracker of a source, against its bank's calibration (the leave-one-out scores of its refs)."""
    calibration = None
    if scorer is not None and banks is not None and banks.count_raw("source") <= MAX_CALIBRATION_REFS:
        calibration = scorer.loo_scores()
    expected = None
    if origin in ("bank", "recalibrated") and banks is not None:
        quantile = (banks.threshold or {}).get("quantile")
        if isinstance(quantile, (int, float)) and 0 < quantile < 1:
            expected = 1.0 - float(quantile)
    # While learning there is no threshold (NaN) and no score to judge: a placeholder keeps the tracker valid.
    return DriftTracker(src.drift, calibration, threshold if math.isfinite(threshold) else 0.0, expected)


def bank_stamp(directory: Path | None) -> tuple[int, int, int] | None:
    """Identity of the banks on disk: a save swaps in a new directory, so bank.json (ensemble.json for
    an ensemble) changes inode."""
    if directory is None:
        return None
    for name in (ENSEMBLE_JSON, BANK_JSON):
        try:
            st = os.stat(Path(directory) / name)
        except OSError:
            continue
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    return None


def _threshold(src: SourceConfig, banks: BankSet, scorer: Scorer, at: str, file: str,
               old: SourcePipeline | None) -> tuple[float, str]:
    """The config's threshold, else the bank's; a bank threshold calibrated on scores computed otherwise (another
    normalizer, fusion, statistics term or layers) is calibrated again, with its method and quantile, on the
    leave-one-out scores of the scoring now in force: its value would mean nothing on these scores."""
    if src.threshold is not None:
        return float(src.threshold), "config"
    stored = banks.threshold or {}
    value = stored.get("value")
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{at}.threshold", f"bank {banks.path} has no calibrated threshold; set one here",
                          source=file)
    mismatch = banks.threshold_mismatch(src.scoring, scorer.layers)
    if mismatch is None:
        return float(value), "bank"
    if old is not None and old.bank is banks and old.scorer is scorer and old.threshold_origin == "recalibrated":
        return old.threshold, "recalibrated"
    method, quantile = stored.get("method", "gamma"), stored.get("quantile", DEFAULT_QUANTILE)
    try:
        fresh = float(calibrate(scorer.loo_scores(), method, quantile)["value"])
    except EdgeAsdError as exc:
        raise ConfigError(f"{at}.threshold", f"bank {banks.path} was calibrated with another scoring ({mismatch}) "
                          f"and calibrating it again failed: {exc}; set one here", source=file) from None
    log.warning("threshold_recalibrated", source=src.name, bank=str(banks.path), stored=float(value),
                threshold=round(fresh, 6), cause=mismatch)
    return fresh, "recalibrated"


def _capture_key(src: SourceConfig) -> tuple[Any, ...]:
    return tuple(getattr(src, name) for name in CAPTURE_FIELDS)
