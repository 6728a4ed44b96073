"""The model contract shared by the exporter and the runtime: ONNX metadata_props <-> ModelInfo.

export/ writes these keys into every ONNX file; edge_agent/ reads them back and refuses a bank
built with a different model. All values are strings in ONNX; lists are comma-separated.

Output names: one pooling per export gives `layer_<i>` (and `embedding`); an export with several
poolings names the first one's outputs plainly and the others `<layer>@<suffix>` (POOLING_SUFFIXES),
e.g. `layer_12`, `layer_12@meanstd`, `layer_12@max`. `output_poolings` records each output's pooling,
`gem_p` the GeM exponent; files written before those keys existed read as `pooling` for every output.
"""

from __future__ import annotations

import math
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
# Written by exports since per-output poolings exist; absent in older files, which read as before.
OPTIONAL_KEYS = ("output_poolings", "gem_p")
POOLINGS = ("time-mean", "time-meanstd", "time-max", "gem", "time-delta", "spatial", "spectral")
# `<layer>@<suffix>`: an output pooled otherwise than the export's default (first) pooling.
POOLING_SEPARATOR = "@"
POOLING_SUFFIXES = {
    "time-mean": "mean",
    "time-meanstd": "meanstd",
    "time-max": "max",
    "gem": "gem",
    "time-delta": "delta",
    "spatial": "spatial",
    "spectral": "spectral",
}
INPUT_NAME = "waveform"


def pooled_output_name(layer: str, pooling: str, default: bool) -> str:
    """The ONNX output name of `layer` pooled with `pooling`: plain for the export's default pooling."""
    if pooling not in POOLINGS:
        raise ModelMetadataError(f"pooling {pooling!r} is not one of {POOLINGS}")
    return layer if default else f"{layer}{POOLING_SEPARATOR}{POOLING_SUFFIXES[pooling]}"


def split_output_name(name: str) -> tuple[str, str | None]:
    """`layer_12@max` -> ("layer_12", "time-max"); a plain name -> (name, None). Unknown suffixes are refused."""
    base, separator, suffix = name.partition(POOLING_SEPARATOR)
    if not separator:
        return name, None
    by_suffix = {value: key for key, value in POOLING_SUFFIXES.items()}
    if not base or suffix not in by_suffix:
        raise ModelMetadataError(
            f"output name {name!r}: expected <layer>{POOLING_SEPARATOR}<one of {', '.join(by_suffix)}>"
        )
    return base, by_suffix[suffix]


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "efficientat" | "beats" | "ced"
    variant: str  # "mn04", "beats", "ced-tiny", ...
    sample_rate: int
    window_samples: int
    layers: tuple[str, ...]  # ONNX output names in order, e.g. ("layer_4", "layer_8", "embedding")
    dims: tuple[int, ...]  # embedding dimension of each output
    default_layers: tuple[str, ...]  # the layers scoring uses when the config names none
    pooling: str = "time-mean"  # the export's default pooling: that of the plain `layer_<i>` outputs
    checkpoint_sha256: str = ""
    exporter_version: str = ""
    # the pooling of each output, in the order of layers; () = `pooling` for every output (older files)
    output_poolings: tuple[str, ...] = ()
    gem_p: float | None = None  # the GeM exponent; given exactly when an output uses gem
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.dims):
            raise ModelMetadataError(f"layers {self.layers} and dims {self.dims} differ in length")
        unknown = [name for name in self.default_layers if name not in self.layers]
        if unknown:
            raise ModelMetadataError(f"default_layers {unknown} are not among the outputs {self.layers}")
        if self.pooling not in POOLINGS:
            raise ModelMetadataError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if not self.output_poolings:
            object.__setattr__(self, "output_poolings", (self.pooling,) * len(self.layers))
        self._check_output_poolings()

    def _check_output_poolings(self) -> None:
        if len(self.output_poolings) != len(self.layers):
            raise ModelMetadataError(
                f"output_poolings {self.output_poolings} and layers {self.layers} differ in length"
            )
        for name, pooling in zip(self.layers, self.output_poolings, strict=True):
            if pooling not in POOLINGS:
                raise ModelMetadataError(f"output {name}: pooling {pooling!r} is not one of {POOLINGS}")
            _, named = split_output_name(name)
            if named is not None and named != pooling:
                raise ModelMetadataError(f"output {name} is named for {named} pooling but records {pooling}")
        uses_gem = "gem" in self.output_poolings
        if uses_gem and self.gem_p is None:
            raise ModelMetadataError("an output uses gem pooling but gem_p is not given")
        if not uses_gem and self.gem_p is not None:
            raise ModelMetadataError(f"gem_p {self.gem_p} is given but no output uses gem pooling")
        if self.gem_p is not None and not (
            isinstance(self.gem_p, (int, float)) and math.isfinite(self.gem_p) and self.gem_p > 0
        ):
            raise ModelMetadataError(f"gem_p {self.gem_p!r} is not a positive number")

    def output_pooling(self, layer: str) -> str:
        """The pooling of output `layer` (its GeM exponent is gem_p)."""
        try:
            return self.output_poolings[self.layers.index(layer)]
        except ValueError:
            raise ModelMetadataError(
                f"layer {layer!r} is not an output of {self.variant}; it has {', '.join(self.layers)}"
            ) from None

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
            "output_poolings": ",".join(self.output_poolings),
        }
        if self.gem_p is not None:
            values["gem_p"] = repr(float(self.gem_p))
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
                output_poolings=_split(props.get("output_poolings", "")),
                gem_p=float(props["gem_p"]) if props.get("gem_p", "").strip() else None,
                extra={k: v for k, v in props.items() if k not in METADATA_KEYS + OPTIONAL_KEYS},
            )
        except ValueError as exc:
            raise ModelMetadataError(f"{source}: malformed metadata: {exc}") from None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("extra")
        data["layers"] = list(self.layers)
        data["dims"] = list(self.dims)
        data["default_layers"] = list(self.default_layers)
        data["output_poolings"] = list(self.output_poolings)
        if self.gem_p is None:
            data.pop("gem_p")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelInfo:
        return cls.from_metadata({k: _join(v) for k, v in data.items()}, source="bank.json model")

    def mismatches(self, other: ModelInfo) -> list[str]:
        """Fields that make embeddings of `self` incomparable with those of `other`."""
        keys = ("family", "variant", "sample_rate", "window_samples", "pooling", "checkpoint_sha256")
        found = [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}" for k in keys
                 if getattr(self, k) != getattr(other, k)]
        # Output names carry the pooling (plain ones: `pooling`, compared above), not GeM's exponent.
        both_gem = [name for name in self.layers if name in other.layers
                    and self.output_pooling(name) == other.output_pooling(name) == "gem"]
        if both_gem and self.gem_p != other.gem_p:
            found.append(f"gem_p of {', '.join(both_gem)}: {self.gem_p!r} != {other.gem_p!r}")
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
