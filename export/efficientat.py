"""EfficientAT MobileNetV3 audio taggers ("MN", Schmid et al. 2023), mn04 .. mn40, with their mel front-end.

The network is MobileNetV3-Large (Howard et al. 2019, table 1) on a 1-channel log-mel image [1, 128, T]
with channel squeeze-excitation, BatchNorm eps 1e-3, and widths scaled by the variant's multiplier
(rounded to multiples of 8). Parameter names follow the official checkpoints (models/mn in
fschmid56/EfficientAT) so those files load strictly.

Block numbering (`layer_<i>` = the pooled output of `features[i]`, time-mean by default; with several
poolings also `layer_<i>@<suffix>`, see export/pooling.py):
  features[0]       stem conv 3x3 stride 2 (not exported)
  features[1..15]   the 15 inverted-residual blocks; stride 2 at blocks 2, 4, 7 and 13
  features[16]      the final 1x1 conv to 6x the last block's channels
`embedding` = features[16] averaged over frequency and time: the official pre-classifier vector
(the second value the official model returns), whatever the layer pooling (recorded as `spatial`).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_agent.fsutil import replacing
from export.base import CheckpointError, ExportableEncoder
from export.checkpoints import OfficialWeights
from export.mel_efficientat import DEFAULT_STFT, N_MELS, SAMPLE_RATE, MelEfficientAT, num_frames
from export.mel_efficientat import STFT_METHODS as MEL_STFT_METHODS
from export.pooling import Poolings, cnn_map_to_grid, pool_grid, pooled_dim
from export.stem_fold import StemFold, foldable

FAMILY = "efficientat"
WIDTHS = {"mn04": 0.4, "mn05": 0.5, "mn10": 1.0, "mn20": 2.0, "mn30": 3.0, "mn40": 4.0}
VARIANTS = tuple(WIDTHS)
STFT_METHODS = MEL_STFT_METHODS  # the front-end's STFT formulations (export_model(..., stft=...))
STEMS = ("folded", "official")  # how features[0..2] are computed (export_model(..., stem=...), export/stem_fold.py)
WINDOW_SECONDS = 10
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
NUM_CLASSES = 527  # AudioSet
HIDDEN_UNITS = 1280  # classifier hidden layer before width scaling
BN_EPS = 1e-3
NUM_BLOCKS = 15
FINAL_CONV = NUM_BLOCKS + 1
EMBEDDING = "embedding"
EMBEDDING_POOLING = "spatial"  # features[16]'s map averaged over frequency and time

_RELEASE = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
_FILE_NAMES = {
    "mn04": "mn04_as_mAP_432.pt",
    "mn05": "mn05_as_mAP_443.pt",
    "mn10": "mn10_as_mAP_471.pt",
    "mn20": "mn20_as_mAP_478.pt",
    "mn30": "mn30_as_mAP_482.pt",
    "mn40": "mn40_as_mAP_484.pt",
}
# Only hashes read off a verified copy are pinned; the others are found locally or refused.
_SHA256 = {"mn04": "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"}
OFFICIAL_WEIGHTS = {
    variant: OfficialWeights(FAMILY, variant, name, _RELEASE + name, _SHA256.get(variant))
    for variant, name in _FILE_NAMES.items()
}

# The scoring defaults: blocks 11 and 12, the last of the stride-16 stages (docs/encoders.md), and block 6
# as a third member, chosen on development data only (bench/quality_study.py, docs/evaluation.md).
_DEFAULT_LAYERS = ("layer_6", "layer_11", "layer_12")


@dataclass(frozen=True)
class BlockSpec:
    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    squeeze_excite: bool
    hardswish: bool
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


# MobileNetV3-Large at width 1.0: in, kernel, expanded, out, SE, hardswish, stride.
_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)


def round_channels(channels: float, divisor: int = 8) -> int:
    """The TF-slim MobileNet rule: nearest multiple of 8, never below 8 nor more than 10% under."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def block_specs(variant: str) -> tuple[BlockSpec, ...]:
    width = _width(variant)
    return tuple(
        BlockSpec(round_channels(i * width), k, round_channels(e * width), round_channels(o * width), se, hs, s)
        for i, k, e, o, se, hs, s in _LARGE
    )


def _width(variant: str) -> float:
    if variant not in WIDTHS:
        raise ValueError(f"unknown EfficientAT variant {variant!r}; known: {', '.join(VARIANTS)}")
    return WIDTHS[variant]


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation; keys `.0` conv and `.1` norm."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = None
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class ChannelSqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = round_channels(channels // 4)
        self.fc1 = nn.Linear(channels, squeezed)
        self.fc2 = nn.Linear(squeezed, channels)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3))
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(scale))))
        # one Reshape with a constant shape in the graph, where scale[:, :, None, None] gives two Unsqueezes
        return x * scale.reshape(-1, self.channels, 1, 1)


class SqueezeExciteGroup(nn.Module):
    """Holds the SE layer under `conc_se_layers.0`, the official key path.

    The official block can run several SE layers (over channels, frequency, time) and merge them with
    a max; the released AudioSet models use channel SE alone, where that max is the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conc_se_layers = nn.ModuleList([ChannelSqueezeExcite(channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


class InvertedResidual(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        act = nn.Hardswish if spec.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if spec.expanded != spec.in_channels:
            layers.append(ConvNormAct(spec.in_channels, spec.expanded, 1, act=act))
        layers.append(
            ConvNormAct(spec.expanded, spec.expanded, spec.kernel, spec.stride, groups=spec.expanded, act=act)
        )
        if spec.squeeze_excite:
            layers.append(SqueezeExciteGroup(spec.expanded))
        layers.append(ConvNormAct(spec.expanded, spec.out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetAudio(nn.Module):
    """log-mel [B, 1, 128, T] -> feature maps of features[0..16]; classifier gives AudioSet logits."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        specs = block_specs(variant)
        last_in = specs[-1].out_channels
        self.final_channels = 6 * last_in
        layers: list[nn.Module] = [ConvNormAct(1, specs[0].in_channels, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(spec) for spec in specs]
        layers.append(ConvNormAct(last_in, self.final_channels, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = round_channels(HIDDEN_UNITS * _width(variant))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(self.final_channels, hidden),
            nn.Hardswish(),
            nn.Dropout(0.2),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def feature_maps(self, image: torch.Tensor, deepest: int) -> list[torch.Tensor]:
        """Outputs of features[0..deepest]; later blocks are not run."""
        maps = []
        x = image
        for index in range(deepest + 1):
            x = self.features[index](x)
            maps.append(x)
        return maps

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def map_shapes(variant: str, frames: int = num_frames(WINDOW_SAMPLES)) -> list[tuple[int, int, int]]:
    """(channels, freq, time) of features[0..16] for a log-mel image of `frames` frames."""
    specs = block_specs(variant)
    freq, time = _conv_out(N_MELS, 3, 2), _conv_out(frames, 3, 2)
    shapes = [(specs[0].in_channels, freq, time)]
    for spec in specs:
        freq, time = _conv_out(freq, spec.kernel, spec.stride), _conv_out(time, spec.kernel, spec.stride)
        shapes.append((spec.out_channels, freq, time))
    shapes.append((6 * specs[-1].out_channels, freq, time))
    return shapes


def available_layers(variant: str) -> tuple[str, ...]:
    _width(variant)
    return (*(f"layer_{i}" for i in range(1, FINAL_CONV + 1)), EMBEDDING)


def default_layers(variant: str) -> tuple[str, ...]:
    _width(variant)
    return _DEFAULT_LAYERS


def default_exported_layers(variant: str) -> tuple[str, ...]:
    return available_layers(variant)


def output_dim(variant: str, layer: str, pooling: str) -> int:
    channels, freq, time = map_shapes(variant)[_layer_index(variant, layer)]
    return pooled_dim(time, freq, channels, EMBEDDING_POOLING if layer == EMBEDDING else pooling)


def _layer_index(variant: str, layer: str) -> int:
    if layer not in available_layers(variant):
        raise ValueError(f"{variant} has no output {layer!r}; it has {', '.join(available_layers(variant))}")
    return FINAL_CONV if layer == EMBEDDING else int(layer.removeprefix("layer_"))


class EfficientATEncoder(ExportableEncoder):
    def __init__(self, variant: str, layers: Sequence[str], pooling: str | Poolings, stft: str = DEFAULT_STFT) -> None:
        super().__init__()
        poolings = Poolings.of(pooling)
        if not layers:
            raise ValueError("no layers requested")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {list(layers)}")
        self.family = FAMILY
        self.variant = variant
        self.sample_rate = SAMPLE_RATE
        self.window_samples = WINDOW_SAMPLES
        outputs = poolings.outputs(layers, fixed={EMBEDDING: EMBEDDING_POOLING})
        self.indices = tuple(_layer_index(variant, output.layer) for output in outputs)
        # Without the family defaults among the outputs, scoring falls back to every default-pooled output.
        self.set_outputs(poolings, outputs, [output_dim(variant, o.layer, o.mode) for o in outputs], _DEFAULT_LAYERS)
        self.frontend = MelEfficientAT(stft)
        self.frontend_stft = stft
        self.net = MobileNetAudio(variant)
        self.stem_fold: StemFold | None = None

    def stem_fold_refusal(self) -> str | None:
        """Why the stem fold does not apply here, or None where it does."""
        if not foldable(self.net.features):
            channels = self.net.features.get_submodule("1.block.0.0").in_channels
            return (f"{self.variant}: block 1 has {channels} channels; the stem fold is for blocks narrower than 16 "
                    "(mn04, mn05)")
        if max(self.indices) < 2:
            return "the stem fold computes block 2: no output here needs it"
        return None

    def fold_stem(self) -> None:
        """Compute features[0..2] as export/stem_fold.py folds them, from the weights loaded now (a later load
        does not reach the fold). ValueError where it does not apply (`stem_fold_refusal`)."""
        refusal = self.stem_fold_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        self.stem_fold = StemFold(self.net.features, keep_block_1=1 in self.indices)

    @property
    def stem(self) -> str:
        """How features[0..2] are computed: "folded" (export/stem_fold.py) or "official"."""
        return "official" if self.stem_fold is None else "folded"

    def feature_maps(self, image: torch.Tensor, deepest: int) -> list[torch.Tensor | None]:
        """features[0..deepest]'s maps as the exported graph computes them: with the stem fold, features[0] is
        None and features[1] too unless an output needs it."""
        if self.stem_fold is None:
            return list(self.net.feature_maps(image, deepest))
        block_1, x = self.stem_fold(image)
        maps: list[torch.Tensor | None] = [None, block_1, x]
        for index in range(3, deepest + 1):
            x = self.net.features[index](x)
            maps.append(x)
        return maps

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = self.frontend(waveform).unsqueeze(1)
        maps = self.feature_maps(image, max(self.indices))
        outputs = []
        for output, index in zip(self.pooled_outputs, self.indices, strict=True):
            feature_map = maps[index]
            assert feature_map is not None  # every output's block is computed (fold_stem keeps block 1 if asked)
            if output.layer == EMBEDDING:
                outputs.append(feature_map.mean(dim=(2, 3)))
            else:
                outputs.append(pool_grid(cnn_map_to_grid(feature_map), output.mode, self.gem_p))
        return tuple(outputs)

    def logits(self, waveform: torch.Tensor) -> torch.Tensor:
        """AudioSet logits of the official classifier head (sanity checks only; not exported)."""
        return self.net.logits(self.frontend(waveform).unsqueeze(1))


def build(
    variant: str, layers: Sequence[str], pooling: str | Poolings, checkpoint: Path | None, seed: int = 0,
    stft: str = DEFAULT_STFT, stem: str | None = None,
) -> EfficientATEncoder:
    """stem: "folded" (export/stem_fold.py), "official", or None: folded where that is faster (block 1 narrower
    than 16 channels: mn04, mn05) and some output needs block 2."""
    if stem not in (None, *STEMS):
        raise ValueError(f"stem {stem!r} is not one of {STEMS}")
    encoder = EfficientATEncoder(variant, layers, pooling, stft)
    state = random_state_dict(variant, seed) if checkpoint is None else read_state_dict(checkpoint)
    load_strict(encoder.net, state, checkpoint if checkpoint is not None else Path(f"<random {variant}>"))
    if stem == "folded" or (stem is None and encoder.stem_fold_refusal() is None):
        encoder.fold_stem()
    return encoder.eval()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat name -> tensor mapping; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
        # torch.save writes a zip archive; its directory sits at the end, so truncation shows here too
        raise CheckpointError(f"{path}: not a torch checkpoint (no complete zip archive: truncated or another format)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or code-carrying files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({reason})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state_dict of tensors")
    return dict(loaded)


def _is_legacy_torch_file(path: Path) -> bool:
    """Files from torch < 1.6 are a bare pickle stream (protocol marker 0x80)."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    expected = net.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"{source}: does not match EfficientAT {type(net).__name__} "
            f"({sum(1 for _ in expected)} keys expected): " + "; ".join(problems)
        )
    net.load_state_dict(dict(state), strict=True)


def random_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, with norms, biases and running stats away from identity."""
    generator = torch.Generator().manual_seed(seed)
    net = MobileNetAudio(variant)
    state: dict[str, torch.Tensor] = {}
    for name, value in net.state_dict().items():
        state[name] = _random_like(name, value, generator)
    return state


def _random_like(name: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = value.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    if name.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=value.dtype)
    if name.endswith("running_mean"):
        return 0.3 * torch.randn(shape, generator=generator)
    if name.endswith("running_var"):
        return uniform(0.5, 2.0)
    if value.dim() == 1 and name.endswith(".weight"):  # BatchNorm scale
        return uniform(0.6, 1.4)
    if name.endswith(".bias"):
        return 0.2 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)


def write_random_checkpoint(path: Path, variant: str, seed: int = 0) -> None:
    """torch.save a random state_dict in the official key layout (written via temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(variant, seed)
    # Saved through a file object: torch names the archive inside after a path's file name, and the
    # temporary name is random, which would make the file (and its sha256) differ run to run.
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
