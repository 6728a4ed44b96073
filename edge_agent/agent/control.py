"""The control plane, on a thread of its own: config push, SIGHUP and `reload`, the commands
(enroll, reload, status), target-bank rebuilds after an enroll, and the state document.

A new config is built completely beside the running runtime; only when every part is built is the
runtime swapped (under the runtime lock). Any error leaves the old runtime running and is answered
with the key path, message and value at fault. Nothing here publishes while holding the lock.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent.agent.config import (
    AgentConfig,
    ControlConfig,
    build_config,
    default_config_text,
    with_secrets,
)
from edge_agent.agent.desired import (
    DesiredDocument,
    apply_overlay,
    artifact_versions,
    parse_document,
    rank,
    with_overlay,
)
from edge_agent.agent.enroll_job import EnrollJob, build_target_bank
from edge_agent.agent.inbound import LOCAL_FILE, InputLimits, load_json, load_yaml
from edge_agent.agent.inference import publish_alert
from edge_agent.agent.learning import LearnJob
from edge_agent.agent.metrics import AgentMetrics
from edge_agent.agent.open_episodes import OpenEpisodes
from edge_agent.agent.operator_commands import OperatorCommands
from edge_agent.agent.outputs import Outputs
from edge_agent.agent.payloads import command_result, config_result
from edge_agent.agent.preflight import check_restart_sections
from edge_agent.agent.push import check_push
from edge_agent.agent.rollout import Rollout
from edge_agent.agent.runtime import (
    LiveRuntime,
    Runtime,
    SourcePipeline,
    build_runtime,
    failed_sources_changed,
)
from edge_agent.agent.sdnotify import SystemdNotifier
from edge_agent.agent.state import agent_state, state_signature
from edge_agent.agent.trial import HealthCheck, PendingTrial, Rollback, TrialFiles
from edge_agent.clock import iso_time
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.logs import get_logger

log = get_logger(__name__)

STATE_REFRESH_SECONDS = 60.0
# Sections that a running agent cannot change in place; they apply at the next start.
RESTART_FIELDS = ("node", "state_dir", "mqtt", "spool", "output", "metrics", "logging", "queue_windows", "evidence")
COMMANDS = ("acknowledge", "clip", "enroll", "feedback", "learn", "rebuild", "reload", "status")
TRIAL_TICK_SECONDS = 0.5  # how often a config on trial is checked
MAX_DEFERRED_PUSHES = 16
MAX_PEEK_BYTES = 1 << 20
# The arguments each command takes besides "id" (the request id, a string of at most MAX_REQUEST_ID characters).
COMMAND_ARGUMENTS = {"acknowledge": ("what",), "enroll": ("source", "windows", "cancel"), "reload": (), "status": (),
                     "clip": ("event_id", "chunk_bytes"), "feedback": ("event_id", "label", "note", "undo"),
                     "learn": ("source", "minutes", "domain", "cancel"), "rebuild": ("source",)}
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class ControlRequest:
    """One request for the control thread: `config` (payload: a pushed config), `cmd` (name, payload: JSON
    arguments), `reload` (SIGHUP), `state` (publish the state now)."""

    kind: str
    name: str = ""
    payload: bytes = b""


@dataclass(frozen=True)
class Startup:
    """How this process started: from the config file, the last-known-good copy (the file could not start),
    a pushed config on trial, or the embedded default; and a rolled-back push still to be answered."""

    origin: str  # "file" | "last_good" | "trial" | "embedded"
    trial: PendingTrial | None = None
    rollback: Rollback | None = None
    problem: str | None = None  # why the config file was not used
    changed: list[str] = field(default_factory=list)  # the sections a restart trial changed
    desired_problem: str | None = None  # why the applied desired document could not start (runs without it)


@dataclass
class _Trial:
    request_id: str | None
    text: str  # config/set: the config text that becomes the config file at commit
    cfg: AgentConfig
    previous: AgentConfig | None  # None: a trial since the start (going back means restarting)
    check: HealthCheck
    changed: list[str]
    desired: DesiredDocument | None = None  # a desired document on trial (its overlay is committed, not `text`)
    paths: dict[str, Path] = field(default_factory=dict)  # its artifacts in the store
    ignored: list[str] = field(default_factory=list)  # its source names the node does not have


class ControlPlane:
    def __init__(self, cfg: AgentConfig, config_path: Path | None, live: LiveRuntime, outputs: Outputs,
                 metrics: AgentMetrics, notifier: SystemdNotifier, requests: queue.Queue[ControlRequest | None],
                 start_sources: Callable[[Runtime], None], request_restart: Callable[[str], None],
                 episodes: OpenEpisodes, operator: OperatorCommands, startup: Startup | None = None) -> None:
        self.episodes = episodes
        self.operator = operator
        self.cfg = cfg
        self.config_path = config_path
        self.files = TrialFiles(config_path) if config_path is not None else None
        self.request_restart = request_restart
        self.startup = startup or Startup("embedded" if config_path is None else "file")
        self.trial: _Trial | None = None
        self.last_rollback: Rollback | None = None
        self._remember_good_later = False  # a start from the config file: remember it once it runs healthy
        self._deferred: list[bytes] = []  # pushes that arrived during a trial, in order
        self._restarting = False
        self.live = live
        self.outputs = outputs
        self.metrics = metrics
        self.notifier = notifier
        self.requests = requests
        self.start_sources = start_sources
        self.started_at = time.time()
        self._state_sig: str | None = None
        self._state_sent = 0.0
        self._state_lock = threading.Lock()  # the main thread refreshes the state, this thread publishes changes
        self.rollout = Rollout(cfg, on_change=lambda: self.requests.put(ControlRequest("rollout")))
        self._refused_desired: set[tuple[str, int]] = set()  # (origin, hash of payload): answered once
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the request in hand (an apply cannot be interrupted halfway) and end the thread."""
        self.requests.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        self._begin()
        while True:
            try:
                request = self.requests.get(timeout=TRIAL_TICK_SECONDS)
            except queue.Empty:
                request = ControlRequest("tick")
            if request is None:
                return
            self.handle(request)

    def _begin(self) -> None:
        """After a start: answer the push a failed trial rolled back, or put the trial this start runs on trial."""
        startup = self.startup
        if startup.desired_problem is not None:
            self.rollout.state.start_failed(startup.desired_problem)
        if startup.rollback is not None:
            self._answer_rollback(startup.rollback)
            if self.files is not None:
                self.files.rollback.unlink(missing_ok=True)
        if startup.trial is not None:
            check = HealthCheck.start(self.live.current, self.cfg.control.trial_seconds, need_broker=True,
                                      broker_connected=lambda: self.outputs.delivery().broker_connected,
                                      inference_errors=self._inference_errors)
            self.trial = _Trial(startup.trial.request_id, startup.trial.text, self.cfg, None, check, startup.changed)
            log.info("config_trial", request_id=startup.trial.request_id, config_hash=self.cfg.config_hash,
                     restarted=True, deadline_s=round(check.deadline - time.monotonic(), 1))
        elif self.files is not None and startup.origin == "file" and self.config_path is not None:
            self._remember_good_later = True
        self.publish_state(force=True)

    def handle(self, request: ControlRequest) -> None:
        """Act on one request and answer it; nothing a message carries gets past this method."""
        try:
            if request.kind == "config":
                self._config_push(request.payload)
            elif request.kind == "cmd":
                self._command(request.name, request.payload)
            elif request.kind == "reload":
                ok, error = self._reload_file()
                if not ok:
                    log.error("reload_refused", error=error)
            elif request.kind == "desired":
                self._desired(request.name, request.payload)
            elif request.kind == "rollout":
                self._rollout_progress()
            elif request.kind == "state":
                self.publish_state(force=True)
            self._tick_trial()
        except Exception as exc:  # a bug, not a bad message: answer, log the traceback, keep running
            log.exception("control_failed", kind=request.kind, name=request.name)
            detail = f"internal error ({type(exc).__name__}); the agent keeps its running config"
            if request.kind in ("config", "desired"):
                self.outputs.publish_config_result(config_result(
                    False, None, error={"path": "", "message": detail, "value": None}))
            elif request.kind == "cmd":
                self.outputs.publish_command_result(command_result(request.name, False, None, error=detail))

    # --- config --------------------------------------------------------------------------------------

    def _config_push(self, payload: bytes) -> None:
        control = self.cfg.control
        request_id: str | None = None
        try:
            request_id, raw, text = _unwrap_config(payload, control.limits(control.max_config_bytes))
            if self.trial is not None:  # one trial at a time: this push is applied when the trial is answered
                if len(self._deferred) >= MAX_DEFERRED_PUSHES:
                    raise ConfigError("(push)", f"{MAX_DEFERRED_PUSHES} pushes already wait for the config on "
                                      f"trial (request {self.trial.request_id!r}); push again when it is answered")
                self._deferred.append(payload)
                log.info("config_deferred", request_id=request_id, waiting=len(self._deferred))
                return
            if self.cfg.fleet.trusted_keys:
                raise ConfigError("(push)", "this node pins fleet.trusted_keys: it takes signed desired documents "
                                  "(config/desired) only, not config/set")
            effective = with_overlay(raw, self.rollout.state.applied)
            pushed = build_config(effective, source="config/set", base_dir=self._base_dir(), read_secrets=False)
            new_cfg = with_secrets(check_push(effective, pushed, self.cfg))
            changed = [name for name in RESTART_FIELDS if getattr(new_cfg, name) != getattr(self.cfg, name)]
            if changed:
                self._trial_by_restart(request_id, text, new_cfg, changed)
                return
            previous = self.cfg
            self.apply(new_cfg)
            check = HealthCheck.start(self.live.current, control.trial_seconds, need_broker=False,
                                      broker_connected=lambda: self.outputs.delivery().broker_connected,
                                      inference_errors=self._inference_errors)
            self.trial = _Trial(request_id, text, new_cfg, previous, check, [])
            log.info("config_trial", request_id=request_id, config_hash=new_cfg.config_hash, restarted=False,
                     deadline_s=round(check.deadline - time.monotonic(), 1))
            self.publish_state(force=True)
        except ConfigError as exc:
            log.warning("config_refused", request_id=request_id, path=exc.path, error=exc.message,
                        value=_jsonable(exc.value))
            self.outputs.publish_config_result(config_result(
                False, request_id, error={"path": exc.path, "message": exc.message, "value": _jsonable(exc.value)},
                phase="refused"))
        except EdgeAsdError as exc:
            log.warning("config_refused", request_id=request_id, path="", error=str(exc))
            self.outputs.publish_config_result(config_result(
                False, request_id, error={"path": "", "message": str(exc), "value": None}, phase="refused"))

    def _trial_by_restart(self, request_id: str | None, text: str, new_cfg: AgentConfig, changed: list[str]) -> None:
        """Sections that apply only at a start: check what can be checked, then restart into the trial."""
        if self.files is None:
            raise ConfigError(changed[0], "changes only at a restart, and an agent running on the embedded "
                              "default config has no config file to restart with")
        check_restart_sections(new_cfg, changed)
        self.files.write_trial(PendingTrial(request_id, text, new_cfg.config_hash, time.time(), list(changed)))
        log.info("config_trial_restart", request_id=request_id, config_hash=new_cfg.config_hash,
                 sections=",".join(changed))
        self._restart(f"config push {request_id or ''} changes {', '.join(changed)}".replace("  ", " "))

    def _restart(self, reason: str) -> None:
        """Ask the agent to re-execute itself; pushes still waiting are answered (they would be lost)."""
        self._restarting = True
        for payload in self._deferred:
            request_id = _request_id_of(payload)
            self.outputs.publish_config_result(config_result(
                False, request_id, phase="refused",
                error={"path": "(push)", "message": "not applied: the agent restarts for an earlier push; "
                                                    "push again when it is back", "value": None}))
        self._deferred.clear()
        self.request_restart(reason)

    def _inference_errors(self) -> float:
        return self.metrics.registry.get_sample_value("edge_agent_inference_errors_total") or 0.0

    def _retry_failed_sources(self) -> None:
        changed = failed_sources_changed(self.live.current)
        if not changed or self.trial is not None:
            return
        log.info("source_retry", sources=",".join(changed), cause="its bank files changed")
        try:
            self.apply(self.cfg, isolate=True)
        except EdgeAsdError as exc:
            log.error("source_retry_failed", error=str(exc))
            return
        for name in changed:
            failed = self.live.current.failed.get(name)
            if failed is None:
                log.info("source_recovered", source=name)
            else:
                log.error("source_failed", source=name, path=failed.error.path, error=failed.error.message)

    def _tick_trial(self) -> None:
        self._retry_failed_sources()
        self.operator.ensure_learning()
        trial = self.trial
        if trial is None:
            if self._remember_good_later and self.files is not None and self._healthy_now():
                self._remember_good_later = False
                self.files.remember_good(self.files.config.read_text(encoding="utf-8"))
        else:
            problems = trial.check.problems()
            if not problems:
                self._commit(trial)
            elif trial.check.expired:
                self._roll_back(trial, problems)
        while self.trial is None and self._deferred and not self._restarting:
            self._config_push(self._deferred.pop(0))
        self._next_desired()

    # --- desired documents (docs/fleet.md) -----------------------------------------------------------

    def _desired(self, origin: str, payload: bytes) -> None:
        """A document on the node's or one of its groups' config/desired topics (retained ones at every connect)."""
        control = self.cfg.control
        try:
            limits = control.limits(control.max_config_bytes)
            doc = parse_document(payload, origin, self.cfg.node, self.cfg.fleet, limits)
        except ConfigError as exc:
            version = _version_of(payload)
            key = (origin, hash(payload))
            if key in self._refused_desired:
                return  # the same retained document again (a reconnect): answered already
            self._refused_desired.add(key)
            log.warning("desired_refused", origin=origin, version=version, path=exc.path, error=exc.message)
            groups = self.rollout.groups
            if version is not None and rank(version, origin, groups) > self.rollout.state.tried_rank(groups):
                self.rollout.state.record_attempt(version, origin, _request_id_of(payload), "refused",
                                                  f"{exc.path}: {exc.message}")
            self.outputs.publish_config_result(config_result(
                False, _request_id_of(payload), error={"path": exc.path, "message": exc.message,
                                                       "value": _jsonable(exc.value)},
                phase="refused", version=version, origin=origin))
            self.publish_state(force=True)
            return
        rollout = self.rollout
        rollout.offer(doc)
        fetching = rollout.fetch
        if fetching is not None and rank(doc.version, origin, rollout.groups) > rank(
                fetching.document.version, fetching.document.origin, rollout.groups):
            rollout.cancel()  # superseded: fetch the newer one instead

    def _next_desired(self) -> None:
        """Act on the best document received, when nothing else is on trial or being fetched."""
        rollout = self.rollout
        if self.trial is not None or self._restarting or rollout.fetch is not None:
            return
        doc = rollout.next_document()
        if doc is None:
            return
        # A newer document supersedes the one received before it: act on this one only.
        if rollout.missing(doc):
            log.info("desired_fetching", version=doc.version, origin=doc.origin, request_id=doc.id,
                     artifacts=",".join(key for key, _ in rollout.missing(doc)))
            rollout.state.record(doc, "fetching")
            rollout.start_fetch(doc, self.live.current.models)
            self.publish_state(force=True)
            return
        self._apply_desired(doc)

    def _rollout_progress(self) -> None:
        """The fetch thread moved on: publish its progress, and act when it has finished."""
        rollout = self.rollout
        fetch = rollout.fetch
        if fetch is not None and fetch.done:
            rollout.fetch = None
            doc = fetch.document
            newer = rollout.next_document()
            if newer is not None:
                self._refuse_desired(doc, "version", f"superseded by version {newer.version} ({newer.origin}) "
                                     "before it was applied", doc.version)
            elif fetch.error is not None:
                self._refuse_desired(doc, "(artifacts)", fetch.error)
            else:
                self._apply_desired(doc)
        self.publish_state()

    def _apply_desired(self, doc: DesiredDocument) -> None:
        rollout = self.rollout
        try:
            base, _ = self._base_document()
            paths = rollout.paths(doc)
            merged, ignored = apply_overlay(base, doc.config, paths)
            source = f"desired v{doc.version} ({doc.origin})"
            built = build_config(merged, source=source, base_dir=self._base_dir(), read_secrets=False)
            new_cfg = with_secrets(check_push(merged, built, self.cfg))
            changed = [name for name in RESTART_FIELDS if getattr(new_cfg, name) != getattr(self.cfg, name)]
            if changed:  # the overlay keys cannot reach these; a changed local file can (applies at a restart)
                new_cfg = dataclasses.replace(new_cfg, **{name: getattr(self.cfg, name) for name in changed})
            previous = self.cfg
            self.apply(new_cfg)
        except ConfigError as exc:
            self._refuse_desired(doc, exc.path, exc.message, exc.value)
            return
        except EdgeAsdError as exc:
            self._refuse_desired(doc, "", str(exc))
            return
        check = HealthCheck.start(self.live.current, self.cfg.control.trial_seconds, need_broker=False,
                                  broker_connected=lambda: self.outputs.delivery().broker_connected,
                                  inference_errors=self._inference_errors)
        self.trial = _Trial(doc.id, "", new_cfg, previous, check, [], desired=doc, paths=paths, ignored=ignored)
        rollout.state.record(doc, "trial")
        rollout.clear_progress("trial")
        log.info("config_trial", request_id=doc.id, version=doc.version, origin=doc.origin,
                 config_hash=new_cfg.config_hash, ignored_sources=",".join(ignored) or "-",
                 deadline_s=round(check.deadline - time.monotonic(), 1))
        self.publish_state(force=True)

    def _refuse_desired(self, doc: DesiredDocument, path: str, message: str, value: object = None) -> None:
        log.warning("desired_refused", origin=doc.origin, version=doc.version, request_id=doc.id, path=path,
                    error=message)
        self.rollout.state.record(doc, "refused", f"{path}: {message}" if path else message)
        self.rollout.clear_progress()
        self.outputs.publish_config_result(config_result(
            False, doc.id, error={"path": path, "message": message, "value": _jsonable(value)}, phase="refused",
            version=doc.version, origin=doc.origin))
        self.publish_state(force=True)

    def _base_document(self) -> tuple[dict[str, Any], str]:
        """The local config (the file, or the embedded default) as a document, and its text."""
        if self.config_path is None:
            text = default_config_text()
        else:
            try:
                text = self.config_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError("(file)", f"cannot read the local config: {exc.strerror}",
                                  str(self.config_path)) from None
        raw = load_yaml(text, LOCAL_FILE)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("(top level)", "the local config must be a mapping", source=str(self.config_path))
        return raw, text

    def _healthy_now(self) -> bool:
        check = HealthCheck.start(self.live.current, 0.0, need_broker=False,
                                  broker_connected=lambda: None, inference_errors=lambda: 0.0)
        check.windows_at_start = {}
        return not check.problems()

    def _commit(self, trial: _Trial) -> None:
        if trial.desired is not None:
            self._commit_desired(trial, trial.desired)
            return
        persisted = False
        if self.files is not None:
            try:
                self.files.commit(trial.text)
                persisted = True
            except OSError as exc:
                log.error("config_not_persisted", path=self.files.config, error=exc)
        self.trial = None
        log.info("config_committed", request_id=trial.request_id, config_hash=trial.cfg.config_hash,
                 persisted=persisted, restarted=bool(trial.changed))
        result = config_result(True, trial.request_id, trial.cfg.config_hash, restart_required=trial.changed,
                               phase="committed")
        result["persisted"] = persisted
        self.outputs.publish_config_result(result)
        self.publish_state(force=True)

    def _commit_desired(self, trial: _Trial, doc: DesiredDocument) -> None:
        rollout = self.rollout
        self.trial = None
        persisted = True
        try:
            rollout.state.commit(doc, trial.paths, trial.cfg.config_hash)
        except OSError as exc:
            persisted = False
            log.error("desired_not_persisted", path=rollout.state.path, error=exc)
        removed = rollout.store.keep_only(rollout.state.kept_artifacts())
        rollout.clear_progress()
        log.info("config_committed", request_id=doc.id, version=doc.version, origin=doc.origin,
                 config_hash=trial.cfg.config_hash, persisted=persisted, artifacts_removed=len(removed))
        result = config_result(True, doc.id, trial.cfg.config_hash, phase="committed", version=doc.version,
                               origin=doc.origin)
        result["persisted"] = persisted
        if trial.ignored:
            result["ignored_sources"] = trial.ignored
        self.outputs.publish_config_result(result)
        self.publish_state(force=True)

    def _roll_back(self, trial: _Trial, problems: list[str]) -> None:
        reason = "; ".join(problems)
        if trial.desired is not None:
            self._roll_back_desired(trial, trial.desired, reason)
            return
        rollback = Rollback(trial.request_id, trial.cfg.config_hash, reason, time.time())
        log.error("config_rolled_back", request_id=trial.request_id, config_hash=trial.cfg.config_hash,
                  reason=reason, restart=bool(trial.changed))
        self.trial = None
        if trial.previous is None:  # on trial since this start: restart with the committed config
            assert self.files is not None
            self.files.fail_trial(rollback)
            self._restart(f"the pushed config failed its trial: {reason}")
            return
        try:
            self.apply(trial.previous)
        except EdgeAsdError as exc:
            rollback = Rollback(trial.request_id, trial.cfg.config_hash,
                                f"{reason}; and going back failed too ({exc}): restarting", time.time())
            if self.files is not None:
                self.files.fail_trial(rollback)
            self._restart(rollback.reason)
            return
        self._answer_rollback(rollback)

    def _roll_back_desired(self, trial: _Trial, doc: DesiredDocument, reason: str) -> None:
        log.error("config_rolled_back", request_id=doc.id, version=doc.version, origin=doc.origin,
                  config_hash=trial.cfg.config_hash, reason=reason)
        self.trial = None
        self.rollout.state.record(doc, "rolled_back", reason)
        self.rollout.clear_progress()
        assert trial.previous is not None  # a desired document is tried live, never by a restart
        try:
            self.apply(trial.previous)
        except EdgeAsdError as exc:
            reason = f"{reason}; and going back failed too ({exc}): restarting"
            self._restart(reason)
        self.last_rollback = Rollback(doc.id, trial.cfg.config_hash, reason, time.time())
        self.outputs.publish_config_result(config_result(
            False, doc.id, trial.cfg.config_hash, phase="rolled_back", version=doc.version, origin=doc.origin,
            error={"path": "", "message": f"rolled back: {reason}", "value": None}))
        self.publish_state(force=True)

    def _answer_rollback(self, rollback: Rollback) -> None:
        self.last_rollback = rollback
        self.outputs.publish_config_result(config_result(
            False, rollback.request_id, rollback.config_hash, phase="rolled_back",
            error={"path": "", "message": f"rolled back: {rollback.reason}", "value": None}))
        self.publish_state(force=True)

    def _reload_file(self) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "running on the embedded default config: nothing to reload"
        self.notifier.reloading()
        try:
            base, _ = self._base_document()
            new_cfg = build_config(with_overlay(base, self.rollout.state.applied), source=str(self.config_path),
                                   base_dir=self._base_dir())
            restart = self.apply(new_cfg, isolate=True)
        except EdgeAsdError as exc:
            self.notifier.ready()
            return False, str(exc)
        self.notifier.ready()
        log.info("config_reloaded", path=self.config_path, config_hash=new_cfg.config_hash,
                 restart_required=",".join(restart) or "-")
        return True, new_cfg.config_hash

    def apply(self, new_cfg: AgentConfig, isolate: bool = False) -> list[str]:
        """Build the new runtime beside the old one, then swap; raises (old keeps running) on error.
        isolate: a source whose bank does not load is set aside as failed (see build_runtime)."""
        restart = [name for name in RESTART_FIELDS if getattr(new_cfg, name) != getattr(self.cfg, name)]
        new = build_runtime(new_cfg, self.live.current, isolate=isolate)
        closed: list[tuple[SourcePipeline, dict[str, Any]]] = []
        abandoned: list[tuple[str, EnrollJob]] = []
        removed: list[tuple[str, EnrollJob]] = []
        learning_lost: list[tuple[str, LearnJob, str]] = []
        with self.live.lock:
            old = self.live.current
            kept = {id(p.source) for p in new.pipelines.values()}
            for name, pipeline in new.pipelines.items():
                pipeline.tracker.reconfigure(pipeline.context, pipeline.cfg.hysteresis)
                previous = old.pipelines.get(name)
                if previous is not None and previous.enroll is not None and previous.source is pipeline.source:
                    if previous.context.model == pipeline.context.model:
                        pipeline.enroll = previous.enroll
                    else:  # embeddings recorded so far belong to other encoders
                        abandoned.append((name, previous.enroll))
                if previous is not None and previous.learn is not None:
                    if previous.source is pipeline.source and previous.context.model == pipeline.context.model:
                        pipeline.learn = previous.learn
                    else:
                        learning_lost.append((name, previous.learn, "the models or the capture changed"))
            now = time.time()
            for name, pipeline in old.pipelines.items():
                if name not in new.pipelines:
                    closed += [(pipeline, event) for event in pipeline.tracker.close(now, reason="source_removed")]
                    if pipeline.enroll is not None:
                        removed.append((name, pipeline.enroll))
                    if pipeline.learn is not None:
                        learning_lost.append((name, pipeline.learn, "the source was removed by a new config"))
            self.live.current = new
            # Sections that need a restart keep their running values until then.
            self.cfg = dataclasses.replace(new_cfg, **{name: getattr(self.cfg, name) for name in restart})
        for pipeline, event in closed:
            self.operator.recorder.close(pipeline.cfg.name, [event], now)
            publish_alert(self.outputs, self.metrics, pipeline, event)
            self.episodes.set(pipeline.cfg.name, None)
        for name, learn, reason in learning_lost:
            self.operator.abandon_learning(name, learn, reason)
        for name, job in abandoned:
            self._abandon(name, job, "the models changed while enrolling; enroll again")
        for name, job in removed:
            self._abandon(name, job, "the source was removed by a new config while enrolling")
        for pipeline in old.pipelines.values():
            if id(pipeline.source) not in kept:
                pipeline.source.stop()
        self.start_sources(new)
        self.outputs.set_sources(new)
        self.publish_state(force=True)
        return restart

    def _base_dir(self) -> Path:
        return self.config_path.resolve().parent if self.config_path is not None else Path.cwd()

    # --- commands ------------------------------------------------------------------------------------

    def _command(self, name: str, payload: bytes) -> None:
        request_id: str | None = None
        try:
            args = _command_args(name, payload, self.cfg.control)
            request_id = args.pop("id", None)
            _check_arguments(name, args)
            if name == "status":  # answered, and the retained state re-published (a fleet-wide roll call)
                self.outputs.publish_command_result(command_result(name, True, request_id, result=self.state()))
                self.publish_state(force=True)
            elif name == "reload":
                ok, detail = self._reload_file()
                self.outputs.publish_command_result(command_result(
                    name, ok, request_id, result={"config_hash": detail} if ok else None,
                    error=None if ok else detail))
            elif name == "acknowledge":
                if args.get("what") != "drops":
                    raise ConfigError("what", "must be \"drops\" (alerts dropped: the spool was full or unwritable)",
                                      args.get("what"))
                seen = self.outputs.acknowledge_drops()
                log.info("drops_acknowledged", request_id=request_id, drops=seen)
                self.outputs.publish_command_result(command_result(name, True, request_id,
                                                                   result={"acknowledged_drops": seen}))
                self.publish_state(force=True)
            elif name == "enroll" and args.get("cancel") is not None:
                self.outputs.publish_command_result(command_result(name, True, request_id,
                                                                   result=self._cancel_enroll(args)))
            elif name == "enroll":
                self._start_enroll(args, request_id)
            elif name == "clip":
                self.operator.clip(args, request_id)
            elif name == "feedback":
                self.operator.feedback(args, request_id)
            elif name == "learn":
                self.operator.learn(args, request_id)
            elif name == "rebuild":
                self.operator.rebuild(args, request_id)
        except ConfigError as exc:
            log.warning("command_refused", command=name, request_id=request_id, path=exc.path, error=exc.message)
            self.outputs.publish_command_result(command_result(name, False, request_id, error=_command_error(exc)))

    def _source_for(self, args: dict[str, Any]) -> SourcePipeline:
        pipelines = self.live.current.pipelines
        name = args.get("source")
        if name is None and len(pipelines) == 1:
            name = next(iter(pipelines))
        if not isinstance(name, str) or name not in pipelines:
            raise ConfigError("source", f"must name one of the sources: {', '.join(pipelines)}", name)
        return pipelines[name]

    def _start_enroll(self, args: dict[str, Any], request_id: str | None) -> None:
        """Start recording; the job is answered when it ends (built, failed, cancelled or abandoned)."""
        pipeline = self._source_for(args)
        name = pipeline.cfg.name
        count = args.get("windows", pipeline.cfg.enroll.windows)
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 10000:
            raise ConfigError("windows", "must be an integer in [2, 10000]", count)
        if pipeline.bank is None:
            raise ConfigError("source", "is learning its first bank; enroll once it monitors", name)
        with self.live.lock:
            if pipeline.enroll is not None:
                raise ConfigError("source", "is already enrolling; cancel with {\"cancel\": true} first", name)
            pipeline.enroll = EnrollJob(count, request_id)
        log.info("enroll_started", source=name, windows=count, request_id=request_id)
        return None

    def _cancel_enroll(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["cancel"] is not True:
            raise ConfigError("cancel", "must be true (or left out)", args["cancel"])
        pipeline = self._source_for(args)
        name = pipeline.cfg.name
        with self.live.lock:
            job, pipeline.enroll = pipeline.enroll, None
        if job is None:
            raise ConfigError("source", "is not recording an enroll (one whose windows are all recorded is "
                              "already being built and cannot be cancelled)", name)
        self._abandon(name, job, "cancelled by a later enroll command")
        return {"source": name, "cancelled": job.request_id, "windows_recorded": job.collected}

    def _abandon(self, name: str, job: EnrollJob, reason: str) -> None:
        """Answer an enroll that ends without a new bank."""
        log.info("enroll_ended", source=name, request_id=job.request_id, reason=reason)
        self.outputs.publish_command_result(command_result("enroll", False, job.request_id,
                                                           error=f"source {name!r}: {reason}"))

    def abandon_all(self, reason: str) -> None:
        """Answer every enroll still recording (the agent is stopping)."""
        with self.live.lock:
            jobs = [(name, p.enroll) for name, p in self.live.current.pipelines.items() if p.enroll is not None]
            for name, _ in jobs:
                self.live.current.pipelines[name].enroll = None
        for name, job in jobs:
            assert job is not None
            self._abandon(name, job, reason)

    def enroll_ready(self, name: str, job: EnrollJob) -> None:
        """The hot loop collected every window of `job`: rebuild the target bank off its thread."""
        threading.Thread(target=self._finish_enroll, args=(name, job), name="enroll", daemon=True).start()

    def _finish_enroll(self, name: str, job: EnrollJob) -> None:
        try:
            result = self._rebuild_target(name, job)
        except Exception as exc:
            log.exception("enroll_failed", source=name)
            self.outputs.publish_command_result(command_result("enroll", False, job.request_id, error=str(exc)))
            return
        self.outputs.publish_command_result(command_result("enroll", True, job.request_id, result=result))
        self.requests.put(ControlRequest("state"))

    def _rebuild_target(self, name: str, job: EnrollJob) -> dict[str, Any]:
        pipeline = self.live.current.pipelines[name]
        assert pipeline.bank is not None  # an enroll needs a bank
        enrolled = build_target_bank(pipeline.bank_path, pipeline.bank, job, pipeline.scoring, pipeline.cfg.enroll)
        result = self.operator.install(name, enrolled, pipeline.bank_path)
        log.info("enrolled", source=name, target_refs=job.windows, bank=result["bank"],
                 threshold=round(result["threshold"], 4))
        return {"source": name, "bank": result["bank"], "bank_path": result["bank_path"],
                "target_windows": job.windows, "threshold": result["threshold"],
                "calibrated_threshold": result["calibrated_threshold"], "memmixup": pipeline.cfg.enroll.memmixup}

    # --- state ---------------------------------------------------------------------------------------

    def state(self, status: str = "online") -> dict[str, Any]:
        state = agent_state(self.live.current, self.cfg.node, self.started_at, self.outputs.delivery(), status)
        trial, rollback = self.trial, self.last_rollback
        state["config"] = {
            "origin": self.startup.origin,
            "trial": None if trial is None else {"request_id": trial.request_id, "config_hash": trial.cfg.config_hash,
                                                 "restarted": bool(trial.changed)},
            "last_rollback": None if rollback is None else {
                "request_id": rollback.request_id, "config_hash": rollback.config_hash, "reason": rollback.reason,
                "at": iso_time(rollback.at)},
        }
        if self.startup.problem:
            state["config"]["problem"] = self.startup.problem
        self._desired_state(state)
        pipelines = self.live.current.pipelines
        for entry in state["sources"]:
            pipeline = pipelines.get(entry["name"])
            if pipeline is not None:
                entry["learning"] = self.operator.learning_state(pipeline)
                entry["drift"] = pipeline.drift.snapshot()
        if self.operator.store is not None:
            state["evidence"] = self.operator.store.usage()
        return state

    def _desired_state(self, state: dict[str, Any]) -> None:
        """The desired-document part of the state: the version acted on last and how it went, the one
        committed, the progress of a fetch, and the version of each artifact the node runs."""
        desired, trial = self.rollout.state, self.trial
        applied, last = desired.applied, desired.last
        state["config"].update({
            "hash": self.cfg.config_hash,
            "version": last.version if last is not None else None,
            "desired_origin": last.origin if last is not None else None,
            "request_id": last.request_id if last is not None else None,
            "status": last.status if last is not None else None,
            "error": last.error if last is not None else None,
            "committed_version": int(applied.document["version"]) if applied is not None else None,
            "progress": self.rollout.progress,
        })
        if desired.problem is not None:
            state["config"]["desired_problem"] = desired.problem
        state["fleet"] = {"groups": list(self.cfg.fleet.groups)}
        versions = dict(applied.versions) if applied is not None else {}
        if trial is not None and trial.desired is not None:
            versions = artifact_versions(trial.desired, trial.paths)
        models = self.live.current.models
        for member, encoder in zip(state["model"]["members"], models.encoders, strict=True):
            member["version"] = versions.get(str(encoder.path))
        if len(models.encoders) == 1:
            state["model"]["sha256"] = models.encoders[0].model_sha256
            state["model"]["version"] = versions.get(str(models.encoders[0].path))
        for source in state["sources"]:
            source["bank"]["version"] = versions.get(source["bank"]["path"])

    def publish_state(self, force: bool = False, status: str = "online") -> None:
        with self._state_lock:
            self._publish_state(force, status)

    def _publish_state(self, force: bool, status: str) -> None:
        state = self.state(status)
        signature = state_signature(state)
        now = time.monotonic()
        if not force and signature == self._state_sig and now - self._state_sent < STATE_REFRESH_SECONDS:
            return
        if signature != self._state_sig:
            lost = [f"{s['name']} {s['health']['state']}" for s in state["sources"]
                    if s["health"]["state"] in ("lost", "failed")]
            self.notifier.status(f"{state['health']}: {len(state['sources'])} source(s)"
                                 + (f"; {', '.join(lost)}" if lost else ""))
        self._state_sig = signature
        self._state_sent = now
        self.outputs.set_state(state)


def _unwrap_config(payload: bytes, limits: InputLimits) -> tuple[str | None, dict[str, Any], str]:
    """config/set carries a whole YAML/JSON config, or {"id": ..., "config": {...} | "yaml text"}.

    Returns the request id, the parsed config and its text (what is persisted when it is accepted).
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("(message)", f"not UTF-8 text (byte {exc.start})") from None
    doc = load_yaml(text, limits, "the pushed config")
    request_id = None
    if isinstance(doc, dict) and "config" in doc and set(doc) <= {"id", "config"}:
        given = doc.get("id")
        request_id = given if isinstance(given, str) and 0 < len(given) <= MAX_REQUEST_ID else None
        inner = doc["config"]
        if isinstance(inner, str):
            text, doc = inner, load_yaml(inner, limits, "the pushed config")
        else:
            doc = inner
            text = yaml.safe_dump(inner, sort_keys=False)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("(top level)", "must be a mapping", doc)
    return request_id, doc, text


def _version_of(payload: bytes) -> int | None:
    """The version of a desired document that was refused, best effort (for the answer)."""
    try:
        doc = json.loads(payload[:MAX_PEEK_BYTES].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else None


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _command_args(name: str, payload: bytes, control: ControlConfig) -> dict[str, Any]:
    """The JSON object a command carries (empty payload: no arguments), checked against its known keys."""
    if name not in COMMAND_ARGUMENTS:
        raise ConfigError("(command)", f"unknown command; known: {', '.join(COMMANDS)}", name)
    if not payload.strip():
        return {}
    args = load_json(payload, control.limits(control.max_command_bytes), f"the {name} command")
    if not isinstance(args, dict):
        raise ConfigError("(top level)", "must be a JSON object", args)
    request_id = args.get("id")
    if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID):
        raise ConfigError("id", f"must be a string of 1 to {MAX_REQUEST_ID} characters", request_id)
    return args


def _check_arguments(name: str, args: dict[str, Any]) -> None:
    known = COMMAND_ARGUMENTS[name]
    for key in args:
        if key not in known:
            raise ConfigError(key, f"unknown argument of {name}; known: {', '.join(('id', *known))}")


def _command_error(exc: ConfigError) -> str:
    shown = f" (got {json.dumps(_jsonable(exc.value))})" if exc.value is not None else ""
    return f"{exc.path}: {exc.message}{shown}"


def _request_id_of(payload: bytes) -> str | None:
    """The id of a wrapped push, best effort (for answering a push that is not applied)."""
    try:
        doc = json.loads(payload[:MAX_PEEK_BYTES].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    given = doc.get("id") if isinstance(doc, dict) else None
    return given if isinstance(given, str) and 0 < len(given) <= MAX_REQUEST_ID else None
