"""The model contract shared by the exporter and the runtime: ONNX metadata_props <-> ModelInfo.

export/ writes these keys into every ONNX file; edge_agent/ reads them back and refuses a bank
built with a different model. All values are strings in ONNX; lists are comma-separated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from edge_agent.errors import ModelMetadataError, ModelMismatchError

METADATA_KEYS = (
    "family",
    "variant",
    "sample_rate",
    "window_samples",
    "layers",
    "dims",
    "default_layers",
    "pooling",
    "checkpoint_sha256",
    "exporter_version",
)
POOLINGS = ("time-mean", "spatial", "spectral")
INPUT_NAME = "waveform"


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "efficientat" | "beats" | "ced"
    variant: str  # "mn04", "beats", "ced-tiny", ...
    sample_rate: int
    window_samples: int
    layers: tuple[str, ...]  # ONNX output names in order, e.g. ("layer_4", "layer_8", "embedding")
    dims: tuple[int, ...]  # embedding dimension of each output
    default_layers: tuple[str, ...]  # the layers scoring uses when the config names none
    pooling: str = "time-mean"
    checkpoint_sha256: str = ""
    exporter_version: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.dims):
            raise ModelMetadataError(f"layers {self.layers} and dims {self.dims} differ in length")
        unknown = [name for name in self.default_layers if name not in self.layers]
        if unknown:
            raise ModelMetadataError(f"default_layers {unknown} are not among the outputs {self.layers}")
        if self.pooling not in POOLINGS:
            raise ModelMetadataError(f"pooling {self.pooling!r} is not one of {POOLINGS}")

    def dim(self, layer: str) -> int:
        try:
            return self.dims[self.layers.index(layer)]
        except ValueError:
            raise ModelMetadataError(
                f"layer {layer!r} is not an output of {self.variant}; it has {', '.join(self.layers)}"
            ) from None

    def to_metadata(self) -> dict[str, str]:
        values = {
            "family": self.family,
            "variant": self.variant,
            "sample_rate": str(self.sample_rate),
            "window_samples": str(self.window_samples),
            "layers": ",".join(self.layers),
            "dims": ",".join(str(d) for d in self.dims),
            "default_layers": ",".join(self.default_layers),
            "pooling": self.pooling,
            "checkpoint_sha256": self.checkpoint_sha256,
            "exporter_version": self.exporter_version,
        }
        return {**self.extra, **values}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> ModelInfo:
        missing = [key for key in METADATA_KEYS if key not in props]
        if missing:
            raise ModelMetadataError(
                f"{source}: metadata lacks {', '.join(missing)}; was it written by edge-export?"
            )
        try:
            return cls(
                family=props["family"],
                variant=props["variant"],
                sample_rate=int(props["sample_rate"]),
                window_samples=int(props["window_samples"]),
                layers=_split(props["layers"]),
                dims=tuple(int(d) for d in _split(props["dims"])),
                default_layers=_split(props["default_layers"]),
                pooling=props["pooling"],
                checkpoint_sha256=props["checkpoint_sha256"],
                exporter_version=props["exporter_version"],
                extra={k: v for k, v in props.items() if k not in METADATA_KEYS},
            )
        except ValueError as exc:
            raise ModelMetadataError(f"{source}: malformed metadata: {exc}") from None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("extra")
        data["layers"] = list(self.layers)
        data["dims"] = list(self.dims)
        data["default_layers"] = list(self.default_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelInfo:
        return cls.from_metadata({k: _join(v) for k, v in data.items()}, source="bank.json model")

    def mismatches(self, other: ModelInfo) -> list[str]:
        """Fields that make embeddings of `self` incomparable with those of `other`."""
        keys = ("family", "variant", "sample_rate", "window_samples", "pooling", "checkpoint_sha256")
        found = [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}" for k in keys
                 if getattr(self, k) != getattr(other, k)]
        return found

    def require_compatible(self, other: ModelInfo, what: str) -> None:
        problems = self.mismatches(other)
        if problems:
            raise ModelMismatchError(f"{what} was built with another model: " + "; ".join(problems))


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _join(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class MemberModel:
    """What identifies one encoder of a model set: banks record it and are checked against it on load."""

    info: ModelInfo
    model_sha256: str
    model_id: str  # "<variant>-<sha12>"


def ensemble_id(model_ids: Sequence[str]) -> str:
    """The id alerts and state carry: the model id itself for one model, joined by '+' for several."""
    return "+".join(model_ids)
