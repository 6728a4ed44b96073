"""The agent's YAML config: dataclasses, validation at load, errors that name the key path.

Every section is a frozen dataclass; `_build` walks the YAML tree against the dataclass type hints,
refuses unknown keys, checks types and ranges (field metadata), and raises ConfigError naming the
file, the key path (`sources[0].hop_seconds`) and the bad value. Defaults live in the dataclasses
and are documented in docs/agent.md.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from edge_agent.agent.drift import DriftConfig
from edge_agent.agent.evidence import EvidenceConfig
from edge_agent.agent.inbound import LOCAL_FILE, InputLimits, load_yaml
from edge_agent.audio.quality import AudioChecks
from edge_agent.errors import ConfigError
from edge_agent.fsutil import atomic_write
from edge_agent.scoring.config import NONNEGATIVE_SCORES, ScoringConfig

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # safe inside an MQTT topic level
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")


def _limits(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            pattern: re.Pattern[str] | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "pattern": pattern}


@dataclass(frozen=True)
class HysteresisConfig:
    # consecutive windows over threshold to open an episode
    raise_after: int = field(default=2, metadata=_limits(lo=1, hi=1000))
    # consecutive windows under threshold to close it
    clear_after: int = field(default=2, metadata=_limits(lo=1, hi=1000))
    # windows between periodic `update` events
    update_every: int = field(default=6, metadata=_limits(lo=1, hi=100000))


@dataclass(frozen=True)
class EnrollConfig:
    windows: int = field(default=10, metadata=_limits(lo=1, hi=10000))  # default N for the `enroll` command
    memmixup: bool = False  # augment the new target bank with MemMixup
    memmixup_lambda: float = field(default=0.9, metadata=_limits(lo=0.0, hi=1.0, lo_open=True))
    memmixup_k: int = field(default=5, metadata=_limits(lo=1, hi=1000))
    threshold_method: Literal["gamma", "percentile"] = "gamma"  # recalibration after enroll
    threshold_quantile: float = field(default=0.99, metadata=_limits(lo=0.0, hi=0.99999, lo_open=True))


@dataclass(frozen=True)
class LearnConfig:
    """On-site learning (`learn` command, or a source started without a bank)."""

    minutes: float = field(default=60.0, metadata=_limits(lo=0.1, hi=10080.0))  # audio to record
    domain: Literal["source", "target"] = "source"  # which domain the recording becomes
    keep_audio: bool = True  # keep the recording in the evidence store (`rebuild` with another model)
    outlier_k: int = field(default=5, metadata=_limits(lo=1, hi=100))  # neighbours of the leave-one-out test
    outlier_z: float = field(default=5.0, metadata=_limits(lo=0.0, hi=100.0, lo_open=True))  # robust z cutoff
    max_outlier_fraction: float = field(default=0.2, metadata=_limits(lo=0.0, hi=0.9))
    min_windows: int = field(default=10, metadata=_limits(lo=2, hi=100000))  # fewer kept: learning failed


@dataclass(frozen=True)
class FeedbackConfig:
    """Operator feedback (`feedback` command): a false positive's windows join the bank."""

    domain: Literal["target", "source"] = "target"
    max_refs: int = field(default=200, metadata=_limits(lo=1, hi=100000))  # refs feedback may add in all


@dataclass(frozen=True)
class SourceConfig:
    name: str = field(metadata=_limits(pattern=NAME_PATTERN))
    type: Literal["mic", "file", "folder", "stdin"] = "file"
    bank: Path | None = None  # bank directory; None: learned on site into <state_dir>/banks/<name>
    path: Path | None = None  # file or folder for file/folder sources
    realtime: bool = True  # file/folder: pace replay at the audio's own rate
    loop: bool = False  # file/folder: start over at the end
    device: str | int | None = None  # mic: sounddevice name (substring) or index; None = default
    # mic capture / stdin PCM rate
    sample_rate: int | None = field(default=None, metadata=_limits(lo=1000, hi=384000))
    channels: int = field(default=1, metadata=_limits(lo=1, hi=64))  # mic / stdin channels in the stream
    # which channel is analysed; None = the mean of all channels
    channel: int | None = field(default=None, metadata=_limits(lo=0, hi=63))
    speed: float = field(default=1.0, metadata=_limits(lo=0.01, hi=1000.0))  # realtime replay rate factor
    # capture block / file read chunk
    block_seconds: float = field(default=0.1, metadata=_limits(lo=0.005, hi=5.0))
    # mic ring buffer capacity
    buffer_seconds: float = field(default=30.0, metadata=_limits(lo=1.0, hi=600.0))
    window_seconds: float = field(default=10.0, metadata=_limits(lo=0.1, hi=60.0, lo_open=True))
    hop_seconds: float = field(default=10.0, metadata=_limits(lo=0.1, hi=60.0, lo_open=True))
    threshold: float | None = None  # overrides the bank's calibrated threshold
    hysteresis: HysteresisConfig = field(default_factory=HysteresisConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    publish_scores: bool = False  # per-window score on <prefix>/<node>/<source>/score (QoS 0)
    # broken input (NaN, silence, clipping, a lower-rate recording) is reported and never scored
    audio_checks: AudioChecks = field(default_factory=AudioChecks)
    # mic: no frames this long = device lost
    stall_seconds: float = field(default=5.0, metadata=_limits(lo=0.1, hi=3600.0))
    retry_initial_seconds: float = field(default=1.0, metadata=_limits(lo=0.01, hi=3600.0))
    retry_max_seconds: float = field(default=60.0, metadata=_limits(lo=0.01, hi=86400.0))


@dataclass(frozen=True)
class ModelConfig:
    path: Path = field()
    providers: list[str] = field(default_factory=lambda: ["auto"])
    intra_op_threads: int | None = field(default=None, metadata=_limits(lo=1, hi=256))


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip hostname verification (testing only)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = field(default=1883, metadata=_limits(lo=1, hi=65535))
    prefix: str = field(default="edge-asd", metadata=_limits(pattern=PREFIX_PATTERN))
    client_id: str | None = None  # default: edge-agent-<node>
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig | None = None
    keepalive: int = field(default=30, metadata=_limits(lo=5, hi=3600))
    reconnect_min_seconds: int = field(default=1, metadata=_limits(lo=1, hi=3600))
    reconnect_max_seconds: int = field(default=60, metadata=_limits(lo=1, hi=86400))
    spool_scores: bool = False  # also spool per-window scores while offline
    homeassistant: bool = False  # publish Home Assistant MQTT discovery configs (retained)
    discovery_prefix: str = field(default="homeassistant", metadata=_limits(pattern=PREFIX_PATTERN))


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path | None = None  # default <state_dir>/spool
    max_messages: int = field(default=10000, metadata=_limits(lo=1, hi=10_000_000))
    max_bytes: int = field(default=50_000_000, metadata=_limits(lo=1024, hi=100_000_000_000))


@dataclass(frozen=True)
class OutputConfig:
    jsonl: Path | None = None  # without mqtt: alerts appended here (default <state_dir>/alerts.jsonl)
    stdout: bool = True  # without mqtt: alerts printed as JSON lines


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9464, metadata=_limits(lo=0, hi=65535))  # 0 = any free port (tests)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


@dataclass(frozen=True)
class ControlConfig:
    """What the agent accepts over MQTT. Only the local config file sets this section: a pushed config
    must carry it unchanged (or leave it out, which keeps the running one)."""

    max_config_bytes: int = field(default=262_144, metadata=_limits(lo=1024, hi=16 << 20))
    max_command_bytes: int = field(default=16_384, metadata=_limits(lo=256, hi=1 << 20))
    max_depth: int = field(default=12, metadata=_limits(lo=4, hi=64))  # nesting of mappings and lists
    max_values: int = field(default=20_000, metadata=_limits(lo=100, hi=1_000_000))  # values in one message
    max_string: int = field(default=4096, metadata=_limits(lo=64, hi=1 << 20))  # characters in one string
    max_items: int = field(default=256, metadata=_limits(lo=8, hi=100_000))  # entries in one mapping or list
    # How long a pushed config may take to run healthy before the agent goes back to the previous one
    # (at least 2.5 windows of the slowest source).
    trial_seconds: float = field(default=60.0, metadata=_limits(lo=1.0, hi=3600.0))
    # Directories whose files a pushed config may name (resolved, symlinks followed); None: the state dir
    # and the directories holding the models and banks of the local config file.
    push_roots: list[Path] | None = None

    def limits(self, max_bytes: int) -> InputLimits:
        return InputLimits(max_bytes=max_bytes, max_depth=self.max_depth, max_nodes=self.max_values,
                           max_string=self.max_string, max_items=self.max_items, max_aliases=64)


@dataclass(frozen=True)
class FleetConfig:
    """Fleet membership and what the node accepts from desired documents (docs/fleet.md). Only the local
    config file sets this section."""

    groups: list[str] = field(default_factory=list)  # <prefix>/group/<group>/... topics this node follows
    # base64 raw ed25519 public keys; when given, desired documents must be signed by one of them
    trusted_keys: list[str] = field(default_factory=list)
    max_artifact_bytes: int = field(default=2_000_000_000, metadata=_limits(lo=1024, hi=1 << 40))
    download_timeout_seconds: float = field(default=3600.0, metadata=_limits(lo=1.0, hi=86400.0))
    min_free_bytes: int = field(default=100_000_000, metadata=_limits(lo=0, hi=1 << 40))
    ca_file: Path | None = None  # extra CA bundle for https artifact URLs


@dataclass(frozen=True)
class AgentConfig:
    node: str = field(metadata=_limits(pattern=NAME_PATTERN))
    sources: list[SourceConfig] = field()
    model: ModelConfig | None = None  # one encoder ...
    models: list[ModelConfig] | None = None  # ... or an ensemble (exactly one of the two)
    state_dir: Path = Path("state")
    mqtt: MqttConfig | None = None
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    # windows waiting for inference before capture drops
    queue_windows: int = field(default=32, metadata=_limits(lo=1, hi=10000))
    # filled in by load, not by the YAML:
    config_hash: str = ""
    source_file: str = ""
    mqtt_password: str | None = field(default=None, repr=False)  # resolved secret, never logged

    @property
    def model_configs(self) -> list[ModelConfig]:
        """The encoders in order: [model] or models."""
        if self.models is not None:
            return list(self.models)
        assert self.model is not None  # parse_config guarantees one of the two
        return [self.model]

    @property
    def model_keys(self) -> list[str]:
        """Key path of each entry of model_configs, for error messages."""
        if self.models is not None:
            return [f"models[{i}]" for i in range(len(self.models))]
        return ["model"]

    def source(self, name: str) -> SourceConfig:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)

    @property
    def spool_dir(self) -> Path:
        return self.spool.dir if self.spool.dir is not None else self.state_dir / "spool"

    @property
    def jsonl_path(self) -> Path:
        return self.output.jsonl if self.output.jsonl is not None else self.state_dir / "alerts.jsonl"

    @property
    def client_id(self) -> str:
        if self.mqtt is not None and self.mqtt.client_id:
            return self.mqtt.client_id
        return f"edge-agent-{self.node}"


_DERIVED = {"config_hash", "source_file", "mqtt_password"}
_SECRETS = {"password"}
MAX_SOURCES = 32


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None,
                 env: typing.Mapping[str, str] | None = None, limits: InputLimits = LOCAL_FILE) -> AgentConfig:
    """Validate YAML (or JSON) text within `limits`; relative paths are resolved against base_dir (default: cwd)."""
    try:
        raw = load_yaml(text, limits)
    except ConfigError as exc:
        raise exc.in_source(source) from None
    return build_config(raw, source, base_dir, env)


def build_config(raw: object, source: str = "<config>", base_dir: Path | None = None,
                 env: typing.Mapping[str, str] | None = None, read_secrets: bool = True) -> AgentConfig:
    """Validate an already parsed config document (see parse_config). read_secrets=False leaves the MQTT
    password unresolved (`with_secrets` reads it), so a pushed config's paths can be checked first."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "must be a mapping", raw, source=source)
    raw = dict(raw)
    raw.setdefault("node", _default_node())
    ctx = _Ctx(source=source, base_dir=base_dir if base_dir is not None else Path.cwd())
    cfg = _build(AgentConfig, raw, "", ctx)
    if not cfg.state_dir.is_absolute():  # the default, like every path, is relative to the config file
        cfg = dataclasses.replace(cfg, state_dir=ctx.base_dir / cfg.state_dir)
    _check_semantics(cfg, ctx)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cfg = dataclasses.replace(cfg, config_hash=digest, source_file=source)
    return with_secrets(cfg, env) if read_secrets else cfg


def with_secrets(cfg: AgentConfig, env: typing.Mapping[str, str] | None = None) -> AgentConfig:
    """The config with its MQTT password read (from the config, password_file or password_env)."""
    ctx = _Ctx(source=cfg.source_file, base_dir=Path.cwd())
    return dataclasses.replace(cfg, mqtt_password=_resolve_password(cfg, ctx, os.environ if env is None else env))


def load_config(path: Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read: {exc.strerror}", str(path), source=str(path)) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


DEFAULT_CONFIG_NAME = "demo.yaml"


def default_config_text() -> str:
    return resources.files("edge_agent.agent").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")


def load_default_config() -> AgentConfig:
    """The embedded demo config; its relative paths are relative to the working directory."""
    source = f"<embedded {DEFAULT_CONFIG_NAME}>"
    return parse_config(default_config_text(), source=source, base_dir=Path.cwd())


def write_config_atomic(path: Path, text: str) -> None:
    """Replace the config file so that a crash leaves either the old or the new file, never half."""
    atomic_write(path, text.encode("utf-8"))


# --- validation machinery -------------------------------------------------------------------------


@dataclass
class _Ctx:
    source: str
    base_dir: Path

    def error(self, path: str, message: str, value: object = None) -> ConfigError:
        return ConfigError(path or "(top level)", message, value, source=self.source)


def _default_node() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "node"
    return host[:64]


def _build(cls: type, raw: object, path: str, ctx: _Ctx) -> Any:
    if not isinstance(raw, dict):
        raise ctx.error(path, f"must be a mapping of {cls.__name__} keys", raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _DERIVED}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        key = unknown[0]
        raise ctx.error(_join(path, str(key)), f"unknown key; allowed: {', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        key_path = _join(path, name)
        if name not in raw:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ctx.error(key_path, "is required")
            continue
        try:
            value = _convert(hints[name], raw[name], key_path, ctx)
            _check_range(fld.metadata, value, key_path, ctx)
        except ConfigError as exc:
            if name in _SECRETS:  # the message says what is wrong; the value is never repeated
                raise ConfigError(exc.path, exc.message, None, exc.source) from None
            raise
        values[name] = value
    return cls(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(hint: Any, value: object, path: str, ctx: _Ctx) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ctx.error(path, "must not be empty", value)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, ctx)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ctx.error(path, f"must be {_describe(hint)}", value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ctx.error(path, f"must be one of {', '.join(map(str, choices))}", value)
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ctx.error(path, "must be a list", value)
        return [_convert(item, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if hint is ScoringConfig:  # validates itself, with the error paths of its own section
        try:
            return ScoringConfig.from_dict(value, path=path)
        except ConfigError as exc:
            raise exc.in_source(ctx.source) from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path, ctx)
    if hint is bool:
        if not isinstance(value, bool):
            raise ctx.error(path, "must be true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(path, "must be an integer", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(path, "must be a number", value)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ctx.error(path, "must be a finite number", value)
        return number
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ctx.error(path, "must be a non-empty string", value)
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ctx.error(path, "must be a path", value)
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else ctx.base_dir / p
    raise TypeError(f"config hint {hint!r} at {path} is not supported")


def _describe(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(names)


def _check_range(meta: typing.Mapping[str, Any], value: Any, path: str, ctx: _Ctx) -> None:
    if value is None or isinstance(value, bool):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)):
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            raise ctx.error(path, f"must be {'>' if meta.get('lo_open') else '>='} {lo}", value)
        if hi is not None and value > hi:
            raise ctx.error(path, f"must be <= {hi}", value)
    pattern = meta.get("pattern")
    if pattern is not None and isinstance(value, str) and not pattern.match(value):
        raise ctx.error(path, f"must match {pattern.pattern}", value)


MAX_GROUPS = 16
RESERVED_NODE_NAMES = ("group",)  # <prefix>/group/... carries group documents


def _check_semantics(cfg: AgentConfig, ctx: _Ctx) -> None:
    if cfg.node in RESERVED_NODE_NAMES:
        raise ctx.error("node", "is reserved for group topics (<prefix>/group/...); choose another name", cfg.node)
    _check_fleet(cfg.fleet, ctx)
    if not cfg.sources:
        raise ctx.error("sources", "needs at least one source", [])
    if len(cfg.sources) > MAX_SOURCES:
        raise ctx.error("sources", f"at most {MAX_SOURCES} sources (one agent, one or two microphones is typical)",
                        len(cfg.sources))
    seen: set[str] = set()
    for i, src in enumerate(cfg.sources):
        at = f"sources[{i}]"
        if src.name in seen:
            raise ctx.error(f"{at}.name", "is used by another source", src.name)
        seen.add(src.name)
        if src.hop_seconds > src.window_seconds:
            raise ctx.error(f"{at}.hop_seconds", f"must be <= window_seconds ({src.window_seconds})",
                            src.hop_seconds)
        if src.type in ("file", "folder"):
            if src.path is None:
                raise ctx.error(f"{at}.path", f"is required for a {src.type} source")
            if src.type == "file" and not src.path.is_file():
                raise ctx.error(f"{at}.path", "is not a file", str(src.path))
            if src.type == "folder" and not src.path.is_dir():
                raise ctx.error(f"{at}.path", "is not a directory", str(src.path))
        elif src.path is not None:
            raise ctx.error(f"{at}.path", f"is only for file and folder sources, not {src.type}",
                            str(src.path))
        if src.type == "stdin" and src.sample_rate is None:
            raise ctx.error(f"{at}.sample_rate", "is required for a stdin source (raw PCM has no header)")
        if src.type in ("mic", "stdin") and src.channel is not None and src.channel >= src.channels:
            raise ctx.error(f"{at}.channel", f"must be < channels ({src.channels})", src.channel)
        if src.retry_max_seconds < src.retry_initial_seconds:
            raise ctx.error(f"{at}.retry_max_seconds", "must be >= retry_initial_seconds",
                            src.retry_max_seconds)
        if src.threshold is not None and src.threshold <= 0 and src.scoring.normalizer in NONNEGATIVE_SCORES:
            raise ctx.error(f"{at}.threshold", f"{src.scoring.normalizer} scores are >= 0, so a threshold <= 0 "
                            "would alert on every window", src.threshold)
    if sum(s.type == "stdin" for s in cfg.sources) > 1:
        raise ctx.error("sources", "only one source can read stdin")
    if (cfg.model is None) == (cfg.models is None):
        raise ctx.error("model" if cfg.model is None else "models",
                        "give either `model` (one encoder) or `models` (an ensemble), not both"
                        if cfg.model is not None else "is required (or `models` for an ensemble)")
    if cfg.models is not None and len(cfg.models) < 2:
        raise ctx.error("models", "an ensemble needs at least two models (use `model` for one)", len(cfg.models))
    paths: dict[Path, str] = {}
    for key, model in zip(cfg.model_keys, cfg.model_configs, strict=True):
        if not model.providers:
            raise ctx.error(f"{key}.providers", "needs at least one provider", [])
        if model.path in paths:
            raise ctx.error(f"{key}.path", f"is the same file as {paths[model.path]}.path", str(model.path))
        paths[model.path] = key
    if cfg.mqtt is not None:
        given = [k for k in ("password", "password_file", "password_env") if getattr(cfg.mqtt, k)]
        if len(given) > 1:
            raise ctx.error(f"mqtt.{given[1]}", f"conflicts with mqtt.{given[0]}; give one")
        if cfg.mqtt.reconnect_max_seconds < cfg.mqtt.reconnect_min_seconds:
            raise ctx.error("mqtt.reconnect_max_seconds", "must be >= reconnect_min_seconds",
                            cfg.mqtt.reconnect_max_seconds)
        tls = cfg.mqtt.tls
        if tls is not None:
            for key in ("ca_file", "cert_file", "key_file"):
                p = getattr(tls, key)
                if p is not None and not p.is_file():
                    raise ctx.error(f"mqtt.tls.{key}", "is not a readable file", str(p))
            if (tls.cert_file is None) != (tls.key_file is None):
                raise ctx.error("mqtt.tls.key_file", "cert_file and key_file go together")


def _check_fleet(fleet: FleetConfig, ctx: _Ctx) -> None:
    if len(fleet.groups) > MAX_GROUPS:
        raise ctx.error("fleet.groups", f"at most {MAX_GROUPS} groups", len(fleet.groups))
    for i, group in enumerate(fleet.groups):
        if not NAME_PATTERN.match(group):
            raise ctx.error(f"fleet.groups[{i}]", f"must match {NAME_PATTERN.pattern}", group)
        if group in fleet.groups[:i]:
            raise ctx.error(f"fleet.groups[{i}]", "is listed twice", group)
    for i, key in enumerate(fleet.trusted_keys):
        try:
            raw = base64.b64decode(key, validate=True)
        except (ValueError, TypeError):
            raw = b""
        if len(raw) != 32:
            raise ctx.error(f"fleet.trusted_keys[{i}]", "must be a base64 raw ed25519 public key (32 bytes), as "
                            "`edge-agent fleet keygen` prints it", key)
    if fleet.ca_file is not None and not fleet.ca_file.is_file():
        raise ctx.error("fleet.ca_file", "is not a readable file", str(fleet.ca_file))


def build_mqtt(raw: object, source: str, base_dir: Path, env: typing.Mapping[str, str] | None = None
               ) -> tuple[MqttConfig, str | None]:
    """An `mqtt` section on its own (for clients of the same broker, such as `edge-agent fleet`): the section
    validated like the agent's, and its password resolved."""
    ctx = _Ctx(source=source, base_dir=base_dir)
    mqtt = _build(MqttConfig, raw, "mqtt", ctx)
    holder = AgentConfig(node="client", sources=[], mqtt=mqtt, source_file=source)
    given = [k for k in ("password", "password_file", "password_env") if getattr(mqtt, k)]
    if len(given) > 1:
        raise ctx.error(f"mqtt.{given[1]}", f"conflicts with mqtt.{given[0]}; give one")
    if mqtt.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(mqtt.tls, key)
            if p is not None and not p.is_file():
                raise ctx.error(f"mqtt.tls.{key}", "is not a readable file", str(p))
    return mqtt, _resolve_password(holder, ctx, os.environ if env is None else env)


def check_fields(cls: type, raw: object, path: str, source: str = "<document>") -> None:
    """Validate the keys given in `raw` against `cls` (types, ranges, unknown keys) without requiring the
    others: for partial documents such as a desired overlay's per-source entries."""
    ctx = _Ctx(source=source, base_dir=Path.cwd())
    if not isinstance(raw, dict):
        raise ctx.error(path, f"must be a mapping of {cls.__name__} keys", raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _DERIVED}
    for key, value in raw.items():
        if key not in fields:
            raise ctx.error(_join(path, str(key)), f"unknown key; allowed: {', '.join(sorted(fields))}")
        converted = _convert(hints[key], value, _join(path, key), ctx)
        _check_range(fields[key].metadata, converted, _join(path, key), ctx)


def _resolve_password(cfg: AgentConfig, ctx: _Ctx, env: typing.Mapping[str, str]) -> str | None:
    mqtt = cfg.mqtt
    if mqtt is None:
        return None
    if mqtt.password_file is not None:
        try:
            return mqtt.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ctx.error("mqtt.password_file", f"cannot read: {exc.strerror}",
                            str(mqtt.password_file)) from None
    if mqtt.password_env is not None:
        if mqtt.password_env not in env:
            raise ctx.error("mqtt.password_env", "names an environment variable that is not set",
                            mqtt.password_env)
        return env[mqtt.password_env]
    return mqtt.password
