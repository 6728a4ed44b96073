"""Desired documents (docs/fleet.md): the wire format, which keys a document may set, how it ranks against
other documents, how its overlay goes onto the local config file, and what the node has applied and tried.

A document is `{"version", "config", "id"?, "target"?, "signature"?}`; `config` is an overlay with only
`model` / `models` and per-source keys under `sources` (by name, or "*" for every source). Everything else is
node-specific and belongs to the local config file.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.agent.artifacts import ArtifactRef
from edge_agent.agent.config import NAME_PATTERN, FleetConfig, ModelConfig, SourceConfig, check_fields
from edge_agent.agent.inbound import InputLimits, load_json
from edge_agent.agent.signing import SignatureError, verify
from edge_agent.errors import ConfigError
from edge_agent.fsutil import atomic_write
from edge_agent.logs import get_logger

log = get_logger(__name__)

DOCUMENT_KEYS = ("version", "id", "target", "config", "signature")
OVERLAY_KEYS = ("model", "models", "sources")
SOURCE_KEYS = ("bank", "threshold", "hysteresis", "scoring", "enroll", "learn", "feedback", "drift",
               "publish_scores", "audio_checks", "window_seconds", "hop_seconds")
MODEL_KEYS = ("path", "providers", "intra_op_threads")
ARTIFACT_KEYS = ("url", "sha256", "size", "version")
EVERY_SOURCE = "*"
MAX_VERSION = 2**53 - 1  # exact in every JSON implementation
MAX_REQUEST_ID = 128
MAX_MODELS = 8
NODE_ORIGIN = "node"


def group_origin(group: str) -> str:
    return f"group/{group}"


@dataclass(frozen=True)
class DesiredDocument:
    version: int
    config: dict[str, Any]
    origin: str  # "node" or "group/<group>": the topic it came on
    id: str | None = None
    target: str | None = None
    signature: str | None = None
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)  # key path in the document -> artifact

    def to_dict(self) -> dict[str, Any]:
        """The document as it travels (without the topic it came on)."""
        doc: dict[str, Any] = {"version": self.version, "config": self.config}
        for key in ("id", "target", "signature"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        return doc


def rank(version: int, origin: str, groups: list[str]) -> tuple[int, int, int]:
    """Higher wins: the version, then the node's own document over a group's, then the group listed first."""
    if origin == NODE_ORIGIN:
        return (version, 1, 0)
    group = origin.removeprefix("group/")
    position = groups.index(group) if group in groups else len(groups)
    return (version, 0, -position)


def parse_document(payload: bytes, origin: str, node: str, fleet: FleetConfig, limits: InputLimits) -> DesiredDocument:
    """Check a received document completely (limits, shape, signature, target, allowed keys, types, artifact
    references); raises ConfigError naming the key path at fault."""
    doc = load_json(payload, limits, "the desired document")
    if not isinstance(doc, dict):
        raise ConfigError("(top level)", "must be a JSON object {\"version\": ..., \"config\": {...}}", doc)
    for key in doc:
        if key not in DOCUMENT_KEYS:
            raise ConfigError(str(key), f"unknown key of a desired document; allowed: {', '.join(DOCUMENT_KEYS)}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ConfigError("version", f"must be an integer in [1, {MAX_VERSION}]", version)
    request_id = doc.get("id")
    if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID):
        raise ConfigError("id", f"must be a string of 1 to {MAX_REQUEST_ID} characters", request_id)
    target = doc.get("target")
    expected = f"node/{node}" if origin == NODE_ORIGIN else origin
    if target is not None and target != expected:
        raise ConfigError("target", f"is not the topic this document came on ({expected})", target)
    if fleet.trusted_keys:
        if target is None:
            raise ConfigError("target", f"is required in a signed document (here: {expected!r}), so that it cannot "
                              "be replayed onto another node or group")
        try:
            verify(doc, fleet.trusted_keys)
        except SignatureError as exc:
            raise ConfigError("signature", str(exc)) from None
    elif "signature" in doc and not isinstance(doc["signature"], str):
        raise ConfigError("signature", "must be a base64 string", doc["signature"])
    if "config" not in doc:
        raise ConfigError("config", "is required: the overlay on the node's local config")
    artifacts = check_overlay(doc["config"], fleet.max_artifact_bytes)
    return DesiredDocument(version, doc["config"], origin, request_id, target, doc.get("signature"), artifacts)


def check_overlay(overlay: object, max_artifact_bytes: int, at: str = "config") -> dict[str, ArtifactRef]:
    """Check an overlay's keys and types without a node's config (what `edge-agent fleet push` checks before
    publishing); returns its artifact references by key path."""
    if not isinstance(overlay, dict):
        raise ConfigError(at, "must be a mapping with model, models or sources", overlay)
    artifacts: dict[str, ArtifactRef] = {}
    for key in overlay:
        if key not in OVERLAY_KEYS:
            raise ConfigError(f"{at}.{key}", "is node-specific or unknown: a desired document may set only "
                              f"{', '.join(OVERLAY_KEYS)} (docs/fleet.md); set it in the node's config file")
    if "model" in overlay and "models" in overlay:
        raise ConfigError(f"{at}.models", "give either model or models, not both")
    if "model" in overlay:
        _check_model(overlay["model"], f"{at}.model", max_artifact_bytes, artifacts)
    if "models" in overlay:
        models = overlay["models"]
        if not isinstance(models, list) or not 2 <= len(models) <= MAX_MODELS:
            raise ConfigError(f"{at}.models", f"must be a list of 2 to {MAX_MODELS} models (an ensemble)", models)
        for i, model in enumerate(models):
            _check_model(model, f"{at}.models[{i}]", max_artifact_bytes, artifacts)
    if "sources" in overlay:
        sources = overlay["sources"]
        if not isinstance(sources, dict):
            raise ConfigError(f"{at}.sources", "must be a mapping from a source name (or \"*\") to its keys", sources)
        for name, entry in sources.items():
            where = f"{at}.sources.{name}"
            if name != EVERY_SOURCE and not (isinstance(name, str) and NAME_PATTERN.match(name)):
                raise ConfigError(where, f"a source name must match {NAME_PATTERN.pattern} (or be \"*\")", name)
            if not isinstance(entry, dict):
                raise ConfigError(where, "must be a mapping of per-source keys", entry)
            for key in entry:
                if key not in SOURCE_KEYS:
                    raise ConfigError(f"{where}.{key}", "is node-specific or unknown: per source a desired document "
                                      f"may set only {', '.join(SOURCE_KEYS)}; set it in the node's config file")
            plain = {k: v for k, v in entry.items() if k != "bank" or not isinstance(v, dict)}
            check_fields(SourceConfig, plain, where)
            if isinstance(entry.get("bank"), dict):
                artifacts[f"{where}.bank"] = ArtifactRef.from_dict(entry["bank"], "bank", f"{where}.bank",
                                                                   max_artifact_bytes)
    return artifacts


def _check_model(model: object, where: str, max_bytes: int, artifacts: dict[str, ArtifactRef]) -> None:
    if not isinstance(model, dict):
        raise ConfigError(where, "must be a mapping: {path: ...} or {url, sha256, size}", model)
    if "url" in model:
        if "path" in model:
            raise ConfigError(f"{where}.path", "give either path or url, not both")
        rest = {k: v for k, v in model.items() if k not in ARTIFACT_KEYS}
        check_fields(ModelConfig, rest, where)
        artifacts[where] = ArtifactRef.from_dict({k: v for k, v in model.items() if k in ARTIFACT_KEYS}, "model",
                                                 where, max_bytes)
        return
    if "path" not in model:
        raise ConfigError(f"{where}.path", "is required (or url, sha256 and size for a model to download)")
    check_fields(ModelConfig, model, where)


def apply_overlay(base: dict[str, Any], overlay: dict[str, Any], paths: dict[str, Path],
                  at: str = "config") -> tuple[dict[str, Any], list[str]]:
    """The local config document with the overlay on it (artifacts by their local `paths`), and the names of
    overlay sources that the node does not have."""
    out = copy.deepcopy(base)
    if "model" in overlay or "models" in overlay:
        out.pop("model", None)
        out.pop("models", None)
        if "model" in overlay:
            out["model"] = _model_entry(overlay["model"], paths.get(f"{at}.model"))
        else:
            out["models"] = [_model_entry(m, paths.get(f"{at}.models[{i}]")) for i, m in enumerate(overlay["models"])]
    entries: dict[str, dict[str, Any]] = overlay.get("sources", {})
    names = []
    for src in out.get("sources") or []:
        if not isinstance(src, dict):
            continue
        names.append(src.get("name"))
        for name in (EVERY_SOURCE, src.get("name")):
            entry = entries.get(name) if isinstance(name, str) else None
            if entry is None:
                continue
            for key, value in entry.items():
                if key == "bank" and isinstance(value, dict):
                    src["bank"] = str(paths[f"{at}.sources.{name}.bank"])
                elif isinstance(value, dict) and isinstance(src.get(key), dict):
                    src[key] = _merged(src[key], value)
                else:
                    src[key] = copy.deepcopy(value)
    ignored = [name for name in entries if name != EVERY_SOURCE and name not in names]
    return out, ignored


def with_overlay(base: dict[str, Any], applied: Applied | None) -> dict[str, Any]:
    """The local config document with the applied desired document's overlay on it (unchanged without one)."""
    if applied is None:
        return base
    merged, _ = apply_overlay(base, applied.document["config"], {k: Path(v) for k, v in applied.paths.items()})
    return merged


def _model_entry(model: dict[str, Any], path: Path | None) -> dict[str, Any]:
    if "url" not in model:
        return copy.deepcopy(model)
    assert path is not None, "an artifact model needs its local path"
    return {"path": str(path), **{k: v for k, v in model.items() if k not in ARTIFACT_KEYS}}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Applied:
    """A document that ran healthy: its overlay applies on top of the local file at every start."""

    document: dict[str, Any]
    origin: str
    paths: dict[str, str]  # artifact key path -> local path
    artifacts: list[str]  # their sha256
    config_hash: str
    at: float
    versions: dict[str, str | None] = field(default_factory=dict)  # local path -> the artifact's version


@dataclass
class Attempt:
    """The last document the node acted on (it ranks above every earlier one)."""

    version: int
    origin: str
    request_id: str | None
    status: str  # trial | committed | rolled_back | refused
    error: str | None
    at: float


class DesiredState:
    """What the node has applied and tried, in `<state_dir>/fleet/desired.json` (written atomically)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "fleet" / "desired.json"
        self.applied: Applied | None = None
        self.previous: Applied | None = None  # the one before: its artifacts are kept for a rollback
        self.last: Attempt | None = None
        self.problem: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.problem = f"{self.path}: unreadable ({exc}); starting without a desired document"
            log.error("desired_state_unreadable", path=self.path, error=exc)
            return
        try:
            self.applied = Applied(**data["applied"]) if data.get("applied") else None
            self.previous = Applied(**data["previous"]) if data.get("previous") else None
            self.last = Attempt(**data["last"]) if data.get("last") else None
        except (TypeError, KeyError) as exc:
            self.problem = f"{self.path}: not a desired state ({exc}); starting without a desired document"
            log.error("desired_state_unreadable", path=self.path, error=exc)
            self.applied = self.previous = self.last = None

    def save(self) -> None:
        data = {"applied": _asdict(self.applied), "previous": _asdict(self.previous), "last": _asdict(self.last)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=1).encode("utf-8"), mode=0o600)

    def tried_rank(self, groups: list[str]) -> tuple[int, int, int]:
        if self.last is not None:
            return rank(self.last.version, self.last.origin, groups)
        if self.applied is not None:
            return rank(int(self.applied.document["version"]), self.applied.origin, groups)
        return (0, 0, 0)

    def record(self, doc: DesiredDocument, status: str, error: str | None = None) -> None:
        self.record_attempt(doc.version, doc.origin, doc.id, status, error)

    def record_attempt(self, version: int, origin: str, request_id: str | None, status: str,
                       error: str | None = None) -> None:
        self.last = Attempt(version, origin, request_id, status, error, time.time())
        try:
            self.save()
        except OSError as exc:  # reported in the state; the node keeps running
            log.error("desired_state_not_saved", path=self.path, error=exc)

    def start_failed(self, problem: str) -> None:
        """The applied document could not start (this start runs the local config alone): it is no longer
        applied, and the next version is needed to change that."""
        if self.applied is None:
            return
        version, origin = int(self.applied.document["version"]), self.applied.origin
        request_id = self.applied.document.get("id")
        self.previous, self.applied = self.applied, None
        self.record_attempt(version, origin, request_id, "rolled_back", problem)

    def commit(self, doc: DesiredDocument, paths: dict[str, Path], config_hash: str) -> None:
        self.previous = self.applied
        self.applied = Applied(doc.to_dict(), doc.origin, {k: str(v) for k, v in paths.items()},
                               sorted({ref.sha256 for ref in doc.artifacts.values()}), config_hash, time.time(),
                               artifact_versions(doc, paths))
        self.record(doc, "committed")

    def kept_artifacts(self) -> set[str]:
        """sha256 of every artifact of the applied and the previous document."""
        return {sha for applied in (self.applied, self.previous) if applied is not None for sha in applied.artifacts}


def artifact_versions(doc: DesiredDocument, paths: dict[str, Path]) -> dict[str, str | None]:
    """Local path -> version of each artifact of `doc`, for the state."""
    return {str(paths[key]): ref.version for key, ref in doc.artifacts.items() if key in paths}


def _asdict(value: Applied | Attempt | None) -> dict[str, Any] | None:
    return None if value is None else dict(value.__dict__)
