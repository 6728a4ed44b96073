"""CED (Dinkel et al., ICASSP 2024; RicherMans/CED models/audiotransformer.py) as exportable encoders.

Variants (depth 12, MLP ratio 4, qkv bias): ced-tiny 192 ch / 3 heads, ced-mini 256 / 4,
ced-small 384 / 6, ced-base 768 / 12. Checkpoints: the original release .pt (a flat state dict,
or {"model": state dict}, with the torchaudio front-end buffers `front_end.0.*`) and the Hugging Face
safetensors (mispeech/ced-*: the same tensors under `encoder.`, BatchNorm as `encoder.init_bn.*`
instead of `init_bn.1.*`, no front-end buffers, head `outputlayer.*` unprefixed).

  MelCED [B, 64, 1001] (BatchNorm'd) -> Conv2d 16x16/16 with bias: [B, C, 4, 62] (1001 -> 992 frames)
  + time_pos_embed[..., :62] (stored for 63 = 1012 // 16 patches) + freq_pos_embed (4)
  -> tokens f*62+t (frequency-major) -> 12 pre-LN ViT blocks (LayerNorm eps 1e-6, GELU MLP)
`layer_i` is the output of block i (1-based, before the final `norm`), pooled from [B, T=62, F=4, C]
(with several poolings also `layer_i@<suffix>`, see export/pooling.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from export.base import BlockLayers, CheckpointError, ExportableEncoder
from export.checkpoints import OfficialWeights
from export.mel_ced import DEFAULT_STFT, N_MELS, SAMPLE_RATE, MelCED, htk_mel_banks, num_frames, periodic_hann
from export.mel_ced import STFT_METHODS as MEL_STFT_METHODS
from export.pooling import Poolings, pool_grid, pooled_dim

FAMILY = "ced"
# variant -> (channels, heads)
SIZES = {"ced-tiny": (192, 3), "ced-mini": (256, 4), "ced-small": (384, 6), "ced-base": (768, 12)}
VARIANTS = tuple(SIZES)
STFT_METHODS = MEL_STFT_METHODS  # the front-end's STFT formulations (export_model(..., stft=...))
DEPTH = 12
MLP_RATIO = 4
PATCH = 16
STORED_TIME_PATCHES = 1012 // PATCH  # the official target_length 1012 frames
CLASSES = 527
WINDOW_SAMPLES = 10 * SAMPLE_RATE
# Layers 7 and 10 follow the DCASE 2025 GenRep report's CED setting as given in our design brief
# (middle-to-late blocks; see docs/encoders.md for the evidence and its limits).
DEFAULT_LAYERS = ("layer_7", "layer_10")
# The original release files named in RicherMans/CED models/audiotransformer.py. No sha256 is pinned
# (none was verified here), so they are never downloaded automatically: fetch them and pass the file.
_ZENODO = "https://zenodo.org/record/8275319/files/"
OFFICIAL_WEIGHTS = {
    variant: OfficialWeights(FAMILY, variant, file_name, f"{_ZENODO}{file_name}?download=1", None)
    for variant, file_name in (
        ("ced-tiny", "audiotransformer_tiny_mAP_4814.pt"),
        ("ced-mini", "audiotransformer_mini_mAP_4896.pt"),
        ("ced-small", "audiotransformer_small_mAP_4958.pt"),
        ("ced-base", "audiotransformer_base_mAP_4999.pt"),
    )
}


LAYERS = BlockLayers("CED", VARIANTS, DEPTH, DEFAULT_LAYERS)
available_layers = LAYERS.available
default_layers = LAYERS.default
default_exported_layers = LAYERS.exported_by_default


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(query, key.transpose(-1, -2)) * (dim // self.heads) ** -0.5
        attended = torch.matmul(torch.softmax(scores, dim=-1), value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, PATCH, stride=PATCH)


class CEDEncoder(ExportableEncoder):
    """waveform [B, 160000] at 16 kHz -> pooled outputs of the requested CED blocks."""

    family = FAMILY
    sample_rate = SAMPLE_RATE
    window_samples = WINDOW_SAMPLES

    def __init__(self, variant: str, layers: Sequence[str], pooling: str | Poolings, stft: str = DEFAULT_STFT) -> None:
        super().__init__()
        LAYERS.check_variant(variant)
        self.variant = variant
        dim, heads = SIZES[variant]
        self.layer_indices = LAYERS.indices(layers)
        poolings = Poolings.of(pooling)
        self.time_patches = num_frames(WINDOW_SAMPLES) // PATCH
        self.freq_patches = N_MELS // PATCH
        self.frontend = MelCED(WINDOW_SAMPLES, stft)
        self.frontend_stft = stft
        self.patch_embed = PatchEmbed(dim)
        self.time_pos_embed = nn.Parameter(torch.zeros(1, dim, 1, self.time_patches))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, dim, self.freq_patches, 1))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(DEPTH))
        outputs = poolings.outputs([f"layer_{i}" for i in self.layer_indices])
        self.output_blocks = tuple(int(output.layer.removeprefix("layer_")) for output in outputs)
        dims = [pooled_dim(self.time_patches, self.freq_patches, dim, output.mode) for output in outputs]
        self.set_outputs(poolings, outputs, dims, DEFAULT_LAYERS)
        self.eval()

    def token_grids(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """Block outputs 1..max(layers) as grids [B, T=62, F=4, C]."""
        features = self.frontend(waveform).unsqueeze(1)  # [B, 1, 64, 1001]
        patches = self.patch_embed.proj(features)  # [B, C, 4, 62]: the trailing 9 frames are dropped
        patches = patches + self.time_pos_embed + self.freq_pos_embed
        x = patches.flatten(2).transpose(1, 2)  # frequency-major: f * 62 + t
        batch = waveform.shape[0]
        grids = []
        for block in self.blocks[: max(self.layer_indices)]:
            x = block(x)
            grids.append(x.reshape(batch, self.freq_patches, self.time_patches, -1).transpose(1, 2))
        return grids

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grids = self.token_grids(waveform)
        return tuple(pool_grid(grids[block - 1], output.mode, self.gem_p)
                     for block, output in zip(self.output_blocks, self.pooled_outputs, strict=True))


# ----------------------------------------------------------------------------- checkpoints

FRONT_END_KEYS = ("front_end.0.spectrogram.window", "front_end.0.mel_scale.fb")


def official_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """The tensors of an original-release CED state dict (classifier head and front-end buffers included)."""
    dim, _ = SIZES[variant]
    shapes: dict[str, tuple[int, ...]] = {
        "front_end.0.spectrogram.window": (512,),
        "front_end.0.mel_scale.fb": (257, N_MELS),
        "init_bn.1.weight": (N_MELS,),
        "init_bn.1.bias": (N_MELS,),
        "init_bn.1.running_mean": (N_MELS,),
        "init_bn.1.running_var": (N_MELS,),
        "init_bn.1.num_batches_tracked": (),
        "patch_embed.proj.weight": (dim, 1, PATCH, PATCH),
        "patch_embed.proj.bias": (dim,),
        "time_pos_embed": (1, dim, 1, STORED_TIME_PATCHES),
        "freq_pos_embed": (1, dim, N_MELS // PATCH, 1),
    }
    for i in range(DEPTH):
        prefix = f"blocks.{i}."
        for name, shape in (("norm1", (dim,)), ("norm2", (dim,))):
            shapes[f"{prefix}{name}.weight"] = shape
            shapes[f"{prefix}{name}.bias"] = shape
        shapes[f"{prefix}attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"{prefix}attn.qkv.bias"] = (3 * dim,)
        shapes[f"{prefix}attn.proj.weight"] = (dim, dim)
        shapes[f"{prefix}attn.proj.bias"] = (dim,)
        shapes[f"{prefix}mlp.fc1.weight"] = (MLP_RATIO * dim, dim)
        shapes[f"{prefix}mlp.fc1.bias"] = (MLP_RATIO * dim,)
        shapes[f"{prefix}mlp.fc2.weight"] = (dim, MLP_RATIO * dim)
        shapes[f"{prefix}mlp.fc2.bias"] = (dim,)
    shapes.update({
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "outputlayer.0.weight": (dim,),
        "outputlayer.0.bias": (dim,),
        "outputlayer.1.weight": (CLASSES, dim),
        "outputlayer.1.bias": (CLASSES,),
    })
    return shapes


# Keys the encoder needs; the rest (head, final norm, front-end buffers, BN counter) may be absent.
_OPTIONAL_PREFIXES = ("outputlayer.", "norm.", "front_end.", "init_bn.1.num_batches_tracked")


def hf_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face (mispeech/ced-*) key names -> original release key names."""
    converted = {}
    for key, value in state.items():
        if key.startswith("encoder.init_bn."):
            key = "init_bn.1." + key.removeprefix("encoder.init_bn.")
        elif key.startswith("encoder."):
            key = key.removeprefix("encoder.")
        converted[key] = value
    return converted


def original_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        if key.startswith("front_end."):
            continue
        if key.startswith("init_bn.1."):
            key = "init_bn." + key.removeprefix("init_bn.1.")
        if not key.startswith("outputlayer."):
            key = "encoder." + key
        converted[key] = value
    return converted


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a CED checkpoint in original-release key names (either layout on disk)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with path.open("rb") as handle:
        head = handle.read(16)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix == ".safetensors" or not is_zip_or_pickle:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable .pt or .safetensors checkpoint ({exc})") from None
        return hf_to_original(state)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-pickle or unsafe file
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        found = ", ".join(list(payload)[:5]) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a CED state dict (top level: {found})")
    if any(k.startswith("encoder.") for k in payload):
        payload = hf_to_original(payload)
    return payload


def check_state(path: Path, variant: str, state: Mapping[str, torch.Tensor]) -> None:
    expected = official_shapes(variant)
    missing = [k for k in expected if k not in state and not k.startswith(_OPTIONAL_PREFIXES)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if wrong:
        problems.append(f"wrong shape {', '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(f"{path}: keys do not match {variant}: " + "; ".join(problems))
    _check_front_end(path, state)


def _check_front_end(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """The original .pt stores torchaudio's window and mel matrix: they must be the ones we compute."""
    ours = {FRONT_END_KEYS[0]: periodic_hann(), FRONT_END_KEYS[1]: htk_mel_banks()}
    for key, reference in ours.items():
        if key in state:
            error = float(np.abs(state[key].double().numpy() - reference).max())
            if error > 1e-5:
                raise CheckpointError(
                    f"{path}: {key} differs from the CED front-end (max abs difference {error:.3g}):"
                    " the checkpoint was trained with other STFT/mel settings"
                )


def load_checkpoint(model: CEDEncoder, path: Path) -> None:
    state = read_checkpoint(Path(path))
    check_state(Path(path), model.variant, state)
    _load_state(model, state)


def _load_state(model: CEDEncoder, state: Mapping[str, torch.Tensor]) -> None:
    model.frontend.load_batchnorm(state["init_bn.1.weight"], state["init_bn.1.bias"],
                                   state["init_bn.1.running_mean"], state["init_bn.1.running_var"])
    own = model.state_dict()
    for key in own:
        if key.startswith("frontend."):
            continue
        value = state[key]
        if key == "time_pos_embed":
            value = value[..., : model.time_patches]
        own[key] = value.float()
    model.load_state_dict(own, strict=True)


def build(variant: str, layers: Sequence[str], pooling: str | Poolings, checkpoint: Path | None,
          seed: int = 0, stft: str = DEFAULT_STFT) -> CEDEncoder:
    LAYERS.check_variant(variant)
    model = CEDEncoder(variant, layers, pooling, stft)
    if checkpoint is None:
        _load_state(model, random_state_dict(variant, np.random.default_rng(seed)))
    else:
        load_checkpoint(model, Path(checkpoint))
    return model


# ----------------------------------------------------------------------------- random checkpoints


def random_state_dict(variant: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Random tensors for every original-release key, with norms, biases, the BatchNorm statistics and
    the position tables moved well away from their default inits (which would hide wiring mistakes)."""
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes(variant).items():
        if key == FRONT_END_KEYS[0]:
            values = periodic_hann()
        elif key == FRONT_END_KEYS[1]:
            values = htk_mel_banks()
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(rng.integers(1000, 100000)), dtype=torch.long)
            continue
        elif key.endswith("running_mean"):
            values = rng.normal(-20.0, 8.0, shape)  # dB-scale features
        elif key.endswith("running_var"):
            values = rng.uniform(40.0, 200.0, shape)
        elif key.endswith("pos_embed"):
            values = rng.normal(0.0, 0.5, shape)
        elif key.endswith(".weight") and len(shape) == 1:  # LayerNorm / BatchNorm affine
            values = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".bias"):
            values = rng.normal(0.0, 0.2, shape)
        else:
            values = rng.normal(0.0, 1.0 / math.sqrt(int(np.prod(shape[1:]))), shape)
        state[key] = torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(shape)
    return state


def write_random_checkpoint(path: Path, variant: str, seed: int = 0) -> None:
    """A CED checkpoint with random weights: the original release layout (a flat state dict .pt), or the
    Hugging Face layout when `path` ends in .safetensors (with a config.json beside it)."""
    LAYERS.check_variant(variant)
    state = random_state_dict(variant, np.random.default_rng(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original_to_hf(state).items()}, str(path))
        dim, heads = SIZES[variant]
        config = {"name": variant, "embed_dim": dim, "num_heads": heads, "depth": DEPTH, "outputdim": CLASSES,
                  "target_length": 1012, "model_type": "ced", "architectures": ["CedForAudioClassification"]}
        (path.parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        torch.save(state, path)
