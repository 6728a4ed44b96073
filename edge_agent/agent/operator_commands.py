"""The operator loop's commands: `clip` (an episode's evidence audio, in chunks), `feedback` (a false positive
joins the bank; undo), `learn` (record the machine on site and build its bank) and `rebuild` (the bank again
from the kept learning audio, with the models running now).

Bank changes run on a worker thread, one at a time, and swap the source's banks atomically under the runtime
lock; each command is answered on `cmd/result` when it is done (or refused at once, naming the argument).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent.config import AgentConfig
from edge_agent.agent.evidence import ClipInfo, ClipWriter, EvidenceStore
from edge_agent.agent.learning import LearnJob, build_learned_banks
from edge_agent.agent.outputs import Outputs
from edge_agent.agent.payloads import SCHEMA_VERSION, command_result
from edge_agent.agent.recorder import EvidenceRecorder
from edge_agent.agent.runtime import LiveRuntime, SourcePipeline, bank_stamp, make_drift
from edge_agent.audio.windowing import sliding_windows
from edge_agent.clock import compact_stamp
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.logs import get_logger
from edge_agent.scoring.bank_edit import Calibration, edit_banks
from edge_agent.scoring.enrollment import Enrolled

log = get_logger(__name__)

LABELS = ("false_positive", "true_positive")
FEEDBACK_PREFIX = "feedback:"
CHUNK_DEFAULT = 64 * 1024
CHUNK_MIN, CHUNK_MAX = 4 * 1024, 256 * 1024
MAX_NOTE = 1000
MAX_LEARN_MINUTES = 10080.0
REBUILD_BATCH = 8


def feedback_prefix(event_id: str) -> str:
    return f"{FEEDBACK_PREFIX}{event_id}:"


class OperatorCommands:
    def __init__(self, cfg: Callable[[], AgentConfig], live: LiveRuntime, outputs: Outputs,
                 store: EvidenceStore | None, recorder: EvidenceRecorder, state_changed: Callable[[], None]) -> None:
        self._cfg = cfg
        self.recorder = recorder
        self.live = live
        self.outputs = outputs
        self.store = store
        self.state_changed = state_changed
        self._bank_lock = threading.Lock()  # one bank change at a time
        self._transfer: threading.Thread | None = None
        self.last_learn: dict[str, dict[str, Any]] = {}  # source -> how its last learning ended

    # --- helpers ---

    def _store(self) -> EvidenceStore:
        if self.store is None:
            raise ConfigError("(command)", "evidence is disabled on this node (evidence.enabled: false)")
        return self.store

    def _pipeline(self, name: object) -> SourcePipeline:
        pipelines = self.live.current.pipelines
        if name is None and len(pipelines) == 1:
            name = next(iter(pipelines))
        if not isinstance(name, str) or name not in pipelines:
            raise ConfigError("source", f"must name one of the sources: {', '.join(pipelines)}", name)
        return pipelines[name]

    def _answer(self, command: str, ok: bool, request_id: str | None, result: dict[str, Any] | None = None,
                error: str | None = None) -> None:
        self.outputs.publish_command_result(command_result(command, ok, request_id, result=result, error=error))

    def _in_background(self, command: str, request_id: str | None, work: Callable[[], dict[str, Any]]) -> None:
        def run() -> None:
            try:
                with self._bank_lock:
                    result = work()
            except (EdgeAsdError, ValueError, OSError) as exc:
                log.warning("command_failed", command=command, request_id=request_id, error=str(exc))
                self._answer(command, False, request_id, error=str(exc))
            except Exception as exc:
                log.exception("command_failed", command=command, request_id=request_id)
                self._answer(command, False, request_id, error=f"internal error ({type(exc).__name__})")
            else:
                self._answer(command, True, request_id, result=result)
            self.state_changed()
        threading.Thread(target=run, name=command, daemon=True).start()

    def install(self, name: str, enrolled: Enrolled, bank_path: Path) -> dict[str, Any]:
        """Swap the new banks of source `name` in; the threshold is the new calibration unless the config sets one."""
        calibrated = float(enrolled.threshold["value"])
        bank_sha256 = enrolled.banks.content_hash()
        bank_id = bank_sha256[:12]
        with self.live.lock:
            current = self.live.current.pipelines.get(name)
            if current is None:
                raise EdgeAsdError(f"source {name!r} was removed meanwhile")
            previous = current.threshold
            value = calibrated if current.cfg.threshold is None else float(current.cfg.threshold)
            origin = "bank" if current.cfg.threshold is None else "config"
            context = dataclasses.replace(current.context, bank=bank_id, threshold=value)
            current.tracker.reconfigure(context, current.cfg.hysteresis)
            new = dataclasses.replace(current, bank=enrolled.banks, scorer=enrolled.scorer, bank_id=bank_id,
                                      bank_sha256=bank_sha256, threshold=value, threshold_origin=origin,
                                      context=context, bank_stamp=bank_stamp(bank_path),
                                      drift=make_drift(current.cfg, enrolled.banks, enrolled.scorer, value, origin))
            runtime = self.live.current
            self.live.current = dataclasses.replace(runtime, pipelines={**runtime.pipelines, name: new})
        return {"source": name, "bank": bank_id, "bank_sha256": bank_sha256, "bank_path": str(bank_path),
                "threshold": value, "previous_threshold": None if math.isnan(previous) else previous,
                "calibrated_threshold": calibrated,
                "counts": {"source": enrolled.banks.count_raw("source"), "target": enrolled.banks.count_raw("target")}}

    def _writable_bank(self, pipeline: SourcePipeline) -> Path:
        path = pipeline.bank_path
        artifacts = (self._cfg().state_dir / "artifacts").resolve()
        if path.resolve().is_relative_to(artifacts):
            raise ConfigError("source", "its bank is a fleet artifact (content-addressed, shared with rollback): "
                              "feedback and learning change node-local banks only; push the bank as a local path",
                              pipeline.cfg.name)
        return path

    # --- clip ---

    def _finished_clip(self, args: dict[str, Any], why: str = "") -> tuple[EvidenceStore, str, ClipInfo]:
        """The store, the `event_id` argument and its finished clip; ConfigError naming the argument otherwise."""
        store = self._store()
        event_id = args.get("event_id")
        if not isinstance(event_id, str):
            raise ConfigError("event_id", "must be the event_id of an alert (a string)", event_id)
        try:
            info = store.get(event_id)
        except ValueError as exc:
            raise ConfigError("event_id", str(exc), event_id) from None
        if info is None:
            raise ConfigError("event_id", "no finished evidence clip with this id on this node (still recording, "
                              f"evicted by the quota, or never recorded){why}", event_id)
        return store, event_id, info

    def clip(self, args: dict[str, Any], request_id: str | None) -> None:
        store, event_id, info = self._finished_clip(args)
        chunk = args.get("chunk_bytes", CHUNK_DEFAULT)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not CHUNK_MIN <= chunk <= CHUNK_MAX:
            raise ConfigError("chunk_bytes", f"must be an integer in [{CHUNK_MIN}, {CHUNK_MAX}]", chunk)
        if self._transfer is not None and self._transfer.is_alive():
            raise ConfigError("(command)", "a clip transfer is running; ask again when it is done")
        size = info.audio_bytes
        count = max(1, -(-size // chunk))
        described = {"event_id": event_id, "source": info.source, "bytes": size, "sha256": info.sha256,
                     "format": "flac", "duration": info.duration, "sample_rate": info.meta.get("sample_rate"),
                     "chunks": count, "chunk_bytes": chunk, "label": info.label, "start": info.meta.get("start"),
                     "end": info.meta.get("end")}
        self._answer("clip", True, request_id, result=described)

        def send() -> None:
            offset = 0
            try:
                for index in range(count):
                    data = store.read_chunk(event_id, offset, min(chunk, size - offset))
                    self.outputs.publish_clip_chunk({
                        "schema_version": SCHEMA_VERSION, "request_id": request_id, "event_id": event_id,
                        "index": index, "count": count, "offset": offset, "bytes": size, "sha256": info.sha256,
                        "data": base64.b64encode(data).decode("ascii")})
                    offset += len(data)
                log.info("clip_sent", event_id=event_id, bytes=size, chunks=count, request_id=request_id)
            except (OSError, ValueError) as exc:  # evicted or unreadable meanwhile: the consumer sees a short transfer
                log.warning("clip_send_failed", event_id=event_id, error=str(exc), sent_bytes=offset)
                self.outputs.publish_clip_chunk({
                    "schema_version": SCHEMA_VERSION, "request_id": request_id, "event_id": event_id,
                    "index": -1, "count": count, "offset": offset, "bytes": size, "sha256": info.sha256,
                    "error": str(exc)})
        self._transfer = threading.Thread(target=send, name="clip", daemon=True)
        self._transfer.start()

    # --- feedback ---

    def feedback(self, args: dict[str, Any], request_id: str | None) -> None:
        store, event_id, info = self._finished_clip(args, ": feedback needs the episode's windows")
        undo = args.get("undo", False)
        if not isinstance(undo, bool):
            raise ConfigError("undo", "must be true or false", undo)
        note = args.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise ConfigError("note", f"must be a string of at most {MAX_NOTE} characters", note)
        label = args.get("label")
        if undo:
            if label is not None:
                raise ConfigError("label", "is not given with undo", label)
        elif label not in LABELS:
            raise ConfigError("label", f"must be one of {', '.join(LABELS)}", label)
        if info.meta.get("context", {}).get("kind") == "learning":
            raise ConfigError("event_id", "is a learning recording, not an alert episode", event_id)
        pipeline = self._pipeline(info.source)
        if undo:
            self._in_background("feedback", request_id, lambda: self._undo(pipeline.cfg.name, event_id))
        elif label == "true_positive":
            if info.label == "false_positive":
                raise ConfigError("label", "this event is labelled false_positive; undo that first", label)
            store.label(event_id, "true_positive", note)
            log.info("feedback", event_id=event_id, label=label, source=pipeline.cfg.name)
            self._answer("feedback", True, request_id, result={"event_id": event_id, "label": label,
                                                               "source": pipeline.cfg.name, "refs_added": 0})
        else:
            self._in_background("feedback", request_id,
                                lambda: self._false_positive(pipeline.cfg.name, event_id, note))

    def _false_positive(self, name: str, event_id: str, note: str | None) -> dict[str, Any]:
        started = time.monotonic()
        store = self._store()
        pipeline = self._pipeline(name)
        if pipeline.bank is None:
            raise ConfigError("source", "is learning its first bank; give feedback once it monitors", name)
        prefix = feedback_prefix(event_id)
        names = pipeline.bank.names
        if any(n.startswith(prefix) for domain in names.values() for n in domain):
            raise ConfigError("event_id", "its windows are in the bank already; undo first to give it again", event_id)
        clip = store.windows(event_id)
        info = store.get(event_id)
        model = (info.meta.get("context") or {}).get("model") if info is not None else None
        if model != pipeline.context.model:
            raise ConfigError("event_id", f"its windows were embedded by model {model}, the source now runs "
                              f"{pipeline.context.model}: they cannot join this bank", event_id)
        rows = np.flatnonzero(np.asarray(clip.in_episode, dtype=bool))
        if rows.size == 0:
            rows = np.arange(len(clip.start))
        if rows.size == 0:
            raise ConfigError("event_id", "its clip kept no window embeddings", event_id)
        fcfg = pipeline.cfg.feedback
        given = sum(n.startswith(FEEDBACK_PREFIX) for domain in names.values() for n in domain)
        if given + rows.size > fcfg.max_refs:
            raise ConfigError("event_id", f"would add {rows.size} refs to the {given} feedback already added; "
                              f"feedback.max_refs is {fcfg.max_refs} (undo older feedback first)", event_id)
        path = self._writable_bank(pipeline)
        add = [{layer: np.asarray(arr)[rows] for layer, arr in member.items()} for member in clip.members]
        enrolled = edit_banks(path, pipeline.bank, pipeline.scoring, _calibration(pipeline), add_domain=fcfg.domain,
                              add=add, add_names=[f"{prefix}{i:04d}" for i in range(rows.size)])
        result = self.install(name, enrolled, path)
        store.label(event_id, "false_positive", note, extra={"refs_added": int(rows.size), "domain": fcfg.domain,
                                                            "bank": result["bank"]})
        seconds = time.monotonic() - started
        log.info("feedback", event_id=event_id, label="false_positive", source=name, refs_added=int(rows.size),
                 domain=fcfg.domain, bank=result["bank"], threshold=round(result["threshold"], 4),
                 seconds=round(seconds, 3))
        return {"event_id": event_id, "label": "false_positive", "refs_added": int(rows.size),
                "domain": fcfg.domain, "seconds": round(seconds, 3), **result}

    def _undo(self, name: str, event_id: str) -> dict[str, Any]:
        store = self._store()
        pipeline = self._pipeline(name)
        prefix = feedback_prefix(event_id)
        info = store.get(event_id)
        removed = 0 if pipeline.bank is None else sum(
            n.startswith(prefix) for domain in pipeline.bank.names.values() for n in domain)
        if removed == 0 and (info is None or info.label is None):
            raise ConfigError("event_id", "has no feedback to undo", event_id)
        result: dict[str, Any] = {"event_id": event_id, "undone": info.label if info is not None else None,
                                  "refs_removed": removed}
        if removed and pipeline.bank is not None:
            path = self._writable_bank(pipeline)
            enrolled = edit_banks(path, pipeline.bank, pipeline.scoring, _calibration(pipeline),
                                  remove=lambda n: n.startswith(prefix))
            result.update(self.install(name, enrolled, path))
        store.label(event_id, None)
        log.info("feedback_undone", event_id=event_id, source=name, refs_removed=removed)
        return result

    # --- learn / rebuild ---

    def learn(self, args: dict[str, Any], request_id: str | None) -> None:
        pipeline = self._pipeline(args.get("source"))
        if args.get("cancel") is not None:
            if args["cancel"] is not True:
                raise ConfigError("cancel", "must be true (or left out)", args["cancel"])
            with self.live.lock:
                job, pipeline.learn = pipeline.learn, None
            if job is None:
                raise ConfigError("source", "is not learning", pipeline.cfg.name)
            if job.writer is not None:
                job.writer.abort("cancelled")
            self._answer("learn", False, job.request_id, error=f"source {pipeline.cfg.name!r}: cancelled")
            self._answer("learn", True, request_id, result={"source": pipeline.cfg.name, "cancelled": job.request_id,
                                                            "windows_recorded": job.windows})
            self.state_changed()
            return
        lcfg = pipeline.cfg.learn
        minutes = args.get("minutes", lcfg.minutes)
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) \
                or not 0.1 <= minutes <= MAX_LEARN_MINUTES:
            raise ConfigError("minutes", f"must be a number in [0.1, {MAX_LEARN_MINUTES:g}]", minutes)
        domain = args.get("domain", lcfg.domain)
        if domain not in ("source", "target"):
            raise ConfigError("domain", "must be source or target", domain)
        if domain == "target" and pipeline.bank is None:
            raise ConfigError("domain", "the source has no bank yet: learn its source domain first", domain)
        self._writable_bank(pipeline)
        self.start_learning(pipeline, float(minutes), str(domain), request_id)

    def start_learning(self, pipeline: SourcePipeline, minutes: float, domain: str, request_id: str | None) -> None:
        """Start recording (also at a start, for a source without a bank); answered when the bank is built."""
        name = pipeline.cfg.name
        cfg = pipeline.cfg
        pace = cfg.speed if cfg.type in ("file", "folder") and cfg.realtime else 1.0
        job = LearnJob(name, domain, minutes * 60.0, cfg.hop_seconds, pace, request_id,
                       sum(dict(pipeline.source.health.faults).values()))
        if cfg.learn.keep_audio and self.store is not None:
            store, model_id = self.store, self.live.current.models.model_id
            clip_id = f"learn-{compact_stamp()}-{secrets.token_hex(4)}"

            def open_audio(rate: int) -> ClipWriter | None:  # at the first window: the rate is the source's
                try:
                    return store.open_clip(clip_id, name, rate, {
                        "kind": "learning", "domain": domain, "model": model_id,
                        "window_seconds": cfg.window_seconds, "hop_seconds": cfg.hop_seconds},
                        max_seconds=minutes * 60.0 + cfg.window_seconds)
                except (OSError, ValueError) as exc:
                    log.warning("learning_audio_not_kept", source=name, error=str(exc))
                    return None
            job.open_audio = open_audio
            job.clip_id = clip_id
        with self.live.lock:
            current = self.live.current.pipelines.get(name)
            if current is None:
                raise ConfigError("source", "was removed meanwhile", name)
            if current.learn is not None:
                raise ConfigError("source", "is already learning; cancel with {\"cancel\": true} first", name)
            current.learn = job
        log.info("learning_started", source=name, minutes=minutes, domain=domain, request_id=request_id,
                 keep_audio=job.open_audio is not None)
        self.state_changed()

    def abandon_learning(self, name: str, job: LearnJob, reason: str) -> None:
        """A learning that a new config ended: its recording is kept, its command answered."""
        if job.writer is not None:
            job.writer.finish(None, "abandoned")
        log.info("learning_ended", source=name, request_id=job.request_id, reason=reason, windows=job.windows)
        self._answer("learn", False, job.request_id, error=f"source {name!r}: {reason} while learning")

    def ensure_learning(self) -> None:
        """Every source without a bank learns one (at a start, after a failed learning, after a new config)."""
        for pipeline in list(self.live.current.pipelines.values()):
            if pipeline.bank is None and pipeline.learn is None and not self._bank_lock.locked():
                with contextlib.suppress(ConfigError):  # started by another thread meanwhile
                    self.start_learning(pipeline, pipeline.cfg.learn.minutes, "source", None)

    def learn_ready(self, name: str, job: LearnJob) -> None:
        """The hot loop recorded the whole period: build the bank off its thread."""
        self._in_background("learn", job.request_id, lambda: self._build_learned(name, job))

    def _build_learned(self, name: str, job: LearnJob) -> dict[str, Any]:
        started = time.monotonic()
        clip = None
        if job.writer is not None:
            ref = job.writer.finish(None, "learned")
            clip = ref.as_dict() if ref is not None else None
        pipeline = self._pipeline(name)
        path = pipeline.bank_path
        models = self.live.current.models
        try:
            learned = build_learned_banks(path, models.members, pipeline.bank, job, pipeline.scoring,
                                          pipeline.cfg.learn, _calibration(pipeline))
        except (EdgeAsdError, ValueError) as exc:
            self.last_learn[name] = {"ok": False, "error": str(exc), "windows": job.windows, "at": time.time()}
            raise
        result = self.install(name, learned.enrolled, path)
        seconds = time.monotonic() - started
        summary = {"domain": job.domain, "windows": learned.windows, "kept": learned.kept,
                   "outliers": learned.outliers.excluded(), "faults": job.faults,
                   "outlier_cutoff": _finite(learned.outliers.cutoff), "build_seconds": round(seconds, 3),
                   "clip": clip}
        self.last_learn[name] = {"ok": True, **summary, "bank": result["bank"], "at": time.time()}
        log.info("learned", source=name, domain=job.domain, windows=learned.windows, kept=learned.kept,
                 outliers=learned.outliers.excluded(), faults=job.faults, bank=result["bank"],
                 threshold=round(result["threshold"], 4), seconds=round(seconds, 3))
        return {**summary, **result}

    def rebuild(self, args: dict[str, Any], request_id: str | None) -> None:
        store = self._store()
        pipeline = self._pipeline(args.get("source"))
        name = pipeline.cfg.name
        recordings = [c for c in store.list() if c.source == name
                      and (c.meta.get("context") or {}).get("kind") == "learning"]
        if not recordings:
            raise ConfigError("source", "has no kept learning audio (learn.keep_audio, or evicted by the quota)",
                              name)
        self._writable_bank(pipeline)
        self._in_background("rebuild", request_id, lambda: self._rebuild(name, recordings[-1].event_id))

    def _rebuild(self, name: str, clip_id: str) -> dict[str, Any]:
        import soundfile  # type: ignore[import-untyped]  # only here and in the evidence store

        store = self._store()
        info = store.get(clip_id)
        if info is None:
            raise EdgeAsdError(f"the learning recording {clip_id} was evicted meanwhile")
        pipeline = self._pipeline(name)
        context = info.meta.get("context") or {}
        window_s = float(context.get("window_seconds", pipeline.cfg.window_seconds))
        hop_s = float(context.get("hop_seconds", pipeline.cfg.hop_seconds))
        audio, rate = soundfile.read(str(info.audio_path), dtype="float32", always_2d=False)
        models = self.live.current.models
        window, hop = round(window_s * rate), round(hop_s * rate)
        job = LearnJob(name, str(context.get("domain", "source")), math.inf, hop_s, 1.0, None, 0)
        starts, batch = [], []
        for start, samples in sliding_windows(np.asarray(audio, dtype=np.float32), window, hop):
            batch.append((samples, int(rate)))
            starts.append(start / rate)
            if len(batch) == REBUILD_BATCH:
                self._embed_into(job, models, batch, starts)
                batch, starts = [], []
        if batch:
            self._embed_into(job, models, batch, starts)
        result = self._build_learned(name, job)
        return {**result, "from_clip": clip_id, "audio_seconds": round(len(audio) / rate, 1)}

    @staticmethod
    def _embed_into(job: LearnJob, models: Any, batch: list[tuple[np.ndarray, int]], starts: list[float]) -> None:
        embs = models.embed(models.prepare(batch))
        for j, start in enumerate(starts):
            job.collect(start, [{layer: values[j] for layer, values in emb.items()} for emb in embs])

    def learning_state(self, pipeline: SourcePipeline) -> dict[str, Any] | None:
        job = pipeline.learn
        if job is not None:
            return {"active": True, **job.progress()}
        last = self.last_learn.get(pipeline.cfg.name)
        return {"active": False, "last": last} if last is not None else None


def _calibration(pipeline: SourcePipeline) -> Calibration:
    enroll = pipeline.cfg.enroll
    return Calibration(enroll.threshold_method, enroll.threshold_quantile)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
