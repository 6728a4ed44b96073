"""BEATs (Chen et al., ICML 2023; microsoft/unilm beats/) as an exportable encoder, written for ONNX export.

One export NAME, `beats`, serves every official checkpoint: BEATs_iter3, BEATs_iter3_plus_AS2M
(self-supervised) and the AS2M fine-tuned ones (which add a 527-class `predictor` that we ignore).
An official file is a torch pickle {"cfg": BEATsConfig fields, "model": state dict}.

Architecture (the official cfg: embed_dim 512, encoder 12 x 768, 12 heads, FFN 3072, deep_norm,
post-LN, conv_pos 128 in 16 groups, 320 relative-position buckets up to distance 800, gated rel. pos.):
  Kaldi fbank [B, 998, 128] -> Conv2d 16x16/16 without bias: [B, 512, 62, 8] (998 -> 992 frames used)
  -> tokens t*8+f (time-major) -> LayerNorm(512) -> post_extract_proj 512->768
  -> x + GELU(weight-normed grouped Conv1d(k=128, pad 64) with its last output frame dropped) -> LayerNorm
  -> 12 blocks: x = LN(alpha * x + SelfAttn(x)); x = LN(alpha * x + FFN(x)), alpha = (2 * 12)^(1/4)
Self-attention adds a relative-position bias table[bucket(j - i)] (one table, layer 0's, shared by all
layers) times a per-layer, per-query gate computed from the unscaled queries:
  g = sigmoid(sum4(grep_linear(q_head)))  -> (a, b);  gate = a * (b * grep_a - 1) + 2.
`layer_i` is the output of block i (1-based), pooled from the grid [B, T=62, F=8, 768] (with several
poolings also `layer_i@<suffix>`, see export/pooling.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from export.base import BlockLayers, CheckpointError, ExportableEncoder
from export.kaldi_fbank import SAMPLE_RATE, KaldiFbank, num_frames
from export.pooling import Poolings, pool_grid, pooled_dim

FAMILY = "beats"
VARIANTS = ("beats",)
WINDOW_SAMPLES = 10 * SAMPLE_RATE
PATCH = 16
DEPTH = 12

# The architecture every official BEATs checkpoint has; a cfg that differs is not a model this code runs.
OFFICIAL_CFG: dict[str, Any] = {
    "input_patch_size": 16,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
}
# BEATsConfig's own defaults, used for fields a cfg leaves out (as BEATsConfig.update would).
BEATS_CONFIG_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_class": 527,
}
# The last two blocks: the pairing the GenRep DCASE 2025 report uses with domain-wise local density, the
# project's default normalizer. (The ICASSP 2025 paper's single best layers 4 and 5 come with test-time
# z-score normalization: `--layers layer_4,layer_5` and `normalizer: zscore-test`; see docs/encoders.md.)
DEFAULT_LAYERS = ("layer_11", "layer_12")


LAYERS = BlockLayers("BEATs", VARIANTS, DEPTH, DEFAULT_LAYERS)
available_layers = LAYERS.available
default_layers = LAYERS.default
default_exported_layers = LAYERS.exported_by_default


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[length, length] bucket of (key - query), computed in float32 like the official code (int64)."""
    position = torch.arange(length, dtype=torch.long)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    large = (exact + scaled.nan_to_num(neginf=0.0).long()).clamp_max(half - 1)  # distance 0 is "exact"
    return buckets + torch.where(distance < exact, distance, large)


class GatedRelativeAttention(nn.Module):
    """BEATs self-attention with the gated relative-position bias, on [B, L, C] tensors."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        query = self._split(self.q_proj(x))  # [B, H, L, d], unscaled
        key = self._split(self.k_proj(x))
        value = self._split(self.v_proj(x))
        # The official code scales q by d^-0.5 / 32, subtracts the row max and multiplies by 32:
        # softmax is shift-invariant, so this is the usual softmax(q k^T / sqrt(d) + bias) in fp32.
        scores = torch.matmul(query * (self.head_dim**-0.5 / 32.0), key.transpose(-1, -2))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * 32.0
        gates = torch.sigmoid(self.grep_linear(query).reshape(batch, self.heads, length, 2, 4).sum(-1))
        gate_a, gate_b = gates[..., :1], gates[..., 1:]
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, L, 1]
        weights = torch.softmax(scores + gate * position_bias, dim=-1)
        attended = torch.matmul(weights, value).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(attended)


class DeepNormBlock(nn.Module):
    """Post-LN transformer block with DeepNet residual scaling (fairseq TransformerSentenceEncoderLayer)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.self_attn = GatedRelativeAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(functional.gelu(self.fc1(x))))


class BEATsEncoderStack(nn.Module):
    """Positional conv, LayerNorm and the transformer blocks (the official `encoder.` sub-tree)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, depth: int, conv_pos: int, groups: int,
                 num_buckets: int, max_distance: int, tokens: int) -> None:
        super().__init__()
        self.pos_conv = nn.Conv1d(dim, dim, kernel_size=conv_pos, padding=conv_pos // 2, groups=groups)
        self.layer_norm = nn.LayerNorm(dim)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        alpha = math.pow(2.0 * depth, 0.25)
        self.layers = nn.ModuleList(DeepNormBlock(dim, heads, ffn_dim, alpha) for _ in range(depth))
        self.register_buffer("buckets", relative_position_buckets(tokens, num_buckets, max_distance))
        self.trim_last = conv_pos % 2 == 0  # SamePad: an even kernel yields one extra frame

    def forward(self, x: torch.Tensor, last_block: int) -> list[torch.Tensor]:
        positional = self.pos_conv(x.transpose(1, 2))
        if self.trim_last:
            positional = positional[:, :, :-1]
        x = self.layer_norm(x + functional.gelu(positional).transpose(1, 2))
        position_bias = self.relative_attention_bias(self.buckets).permute(2, 0, 1)  # [H, L, L]
        outputs = []
        for layer in self.layers[:last_block]:
            x = layer(x, position_bias)
            outputs.append(x)
        return outputs


class BEATsEncoder(ExportableEncoder):
    """waveform [B, 160000] at 16 kHz -> pooled outputs of the requested BEATs blocks."""

    family = FAMILY
    sample_rate = SAMPLE_RATE
    window_samples = WINDOW_SAMPLES

    def __init__(self, layers: Sequence[str], pooling: str | Poolings, variant: str = "beats") -> None:
        super().__init__()
        LAYERS.check_variant(variant)
        self.variant = variant
        self.layer_indices = LAYERS.indices(layers)
        poolings = Poolings.of(pooling)
        cfg = OFFICIAL_CFG
        dim = int(cfg["encoder_embed_dim"])
        self.frames = num_frames(WINDOW_SAMPLES) // PATCH * PATCH
        self.time_patches = self.frames // PATCH
        self.freq_patches = 128 // PATCH
        self.frontend = KaldiFbank(WINDOW_SAMPLES)
        self.patch_embedding = nn.Conv2d(1, int(cfg["embed_dim"]), PATCH, stride=PATCH, bias=False)
        self.layer_norm = nn.LayerNorm(int(cfg["embed_dim"]))
        self.post_extract_proj = nn.Linear(int(cfg["embed_dim"]), dim)
        self.encoder = BEATsEncoderStack(
            dim, int(cfg["encoder_attention_heads"]), int(cfg["encoder_ffn_embed_dim"]), DEPTH,
            int(cfg["conv_pos"]), int(cfg["conv_pos_groups"]), int(cfg["num_buckets"]),
            int(cfg["max_distance"]), self.time_patches * self.freq_patches,
        )
        outputs = poolings.outputs([f"layer_{i}" for i in self.layer_indices])
        self.output_blocks = tuple(int(output.layer.removeprefix("layer_")) for output in outputs)
        dims = [pooled_dim(self.time_patches, self.freq_patches, dim, output.mode) for output in outputs]
        self.set_outputs(poolings, outputs, dims, DEFAULT_LAYERS)
        self.eval()

    def token_grids(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """Block outputs 1..max(layers) as grids [B, T=62, F=8, 768]."""
        fbank = self.frontend(waveform)[:, : self.frames].unsqueeze(1)  # [B, 1, 992, 128]
        patches = self.patch_embedding(fbank)  # [B, 512, 62, 8]
        tokens = self.layer_norm(patches.flatten(2).transpose(1, 2))  # time-major: t * 8 + f
        tokens = self.post_extract_proj(tokens)
        outputs = self.encoder(tokens, max(self.layer_indices))
        batch = waveform.shape[0]
        return [out.reshape(batch, self.time_patches, self.freq_patches, -1) for out in outputs]

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grids = self.token_grids(waveform)
        return tuple(pool_grid(grids[block - 1], output.mode, self.gem_p)
                     for block, output in zip(self.output_blocks, self.pooled_outputs, strict=True))


# ----------------------------------------------------------------------------- checkpoints


def official_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official BEATs state dict and its shape (the relative-position table is
    stored under each layer: the official model shares layer 0's module and state_dict repeats it)."""
    embed, dim = int(cfg["embed_dim"]), int(cfg["encoder_embed_dim"])
    ffn, heads = int(cfg["encoder_ffn_embed_dim"]), int(cfg["encoder_attention_heads"])
    conv_pos, groups = int(cfg["conv_pos"]), int(cfg["conv_pos_groups"])
    patch = int(cfg["input_patch_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (embed, 1, patch, patch),
        "layer_norm.weight": (embed,),
        "layer_norm.bias": (embed,),
        "post_extract_proj.weight": (dim, embed),
        "post_extract_proj.bias": (dim,),
        "encoder.pos_conv.0.bias": (dim,),
        "encoder.pos_conv.0.weight_g": (1, 1, conv_pos),
        "encoder.pos_conv.0.weight_v": (dim, dim // groups, conv_pos),
        "encoder.layer_norm.weight": (dim,),
        "encoder.layer_norm.bias": (dim,),
    }
    for i in range(int(cfg["encoder_layers"])):
        prefix = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{prefix}self_attn.{proj}.weight"] = (dim, dim)
            shapes[f"{prefix}self_attn.{proj}.bias"] = (dim,)
        shapes[f"{prefix}self_attn.relative_attention_bias.weight"] = (int(cfg["num_buckets"]), heads)
        shapes[f"{prefix}self_attn.grep_linear.weight"] = (8, dim // heads)
        shapes[f"{prefix}self_attn.grep_linear.bias"] = (8,)
        shapes[f"{prefix}self_attn.grep_a"] = (1, heads, 1, 1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{prefix}{norm}.weight"] = (dim,)
            shapes[f"{prefix}{norm}.bias"] = (dim,)
        shapes[f"{prefix}fc1.weight"] = (ffn, dim)
        shapes[f"{prefix}fc1.bias"] = (ffn,)
        shapes[f"{prefix}fc2.weight"] = (dim, ffn)
        shapes[f"{prefix}fc2.bias"] = (dim,)
    if cfg.get("finetuned_model"):
        shapes["predictor.weight"] = (int(cfg["predictor_class"]), dim)
        shapes["predictor.bias"] = (int(cfg["predictor_class"]),)
    return shapes


def read_checkpoint(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """(cfg with BEATsConfig defaults filled in, state dict) of an official BEATs .pt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-pickle or unsafe file
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or not {"cfg", "model"} <= payload.keys():
        found = ", ".join(list(payload)[:5]) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a BEATs checkpoint: expected top-level keys 'cfg' and 'model', found {found}"
        )
    cfg_in, state = payload["cfg"], payload["model"]
    if not isinstance(cfg_in, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'cfg' and 'model' must be dicts")
    cfg = {**BEATS_CONFIG_DEFAULTS, **cfg_in}
    wrong = [f"{k}={cfg[k]!r} (expected {v!r})" for k, v in OFFICIAL_CFG.items() if cfg[k] != v]
    if wrong:
        raise CheckpointError(f"{path}: cfg is not the BEATs base architecture: {'; '.join(wrong[:5])}")
    return cfg, state


def _check_keys(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in state]
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
        raise CheckpointError(f"{path}: keys do not match BEATs: " + "; ".join(problems))


def _module_state(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Official state dict -> BEATsEncoder's parameters (weight norm folded, shared table once)."""
    converted = {k: v.float() for k, v in state.items() if not k.startswith("predictor.")
                 and "relative_attention_bias" not in k and not k.startswith("encoder.pos_conv.0.")}
    table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    for i in range(1, int(cfg["encoder_layers"])):
        other = state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"]
        if not torch.equal(other, table):
            raise CheckpointError(
                f"{path}: encoder.layers.{i}.self_attn.relative_attention_bias.weight differs from layer 0's;"
                " official BEATs shares one table across layers"
            )
    converted["encoder.relative_attention_bias.weight"] = table.float()
    direction = state["encoder.pos_conv.0.weight_v"].double()
    magnitude = state["encoder.pos_conv.0.weight_g"].double()
    norm = direction.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()  # weight_norm(dim=2): one norm per tap
    converted["encoder.pos_conv.weight"] = (magnitude * direction / norm).float()
    converted["encoder.pos_conv.bias"] = state["encoder.pos_conv.0.bias"].float()
    return converted


_NEW_WEIGHT_NORM = {
    "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
}


def load_checkpoint(model: BEATsEncoder, path: Path) -> dict[str, object]:
    """Load an official BEATs checkpoint into `model`; returns its cfg."""
    cfg, state = read_checkpoint(path)
    state = {_NEW_WEIGHT_NORM.get(k, k): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: 'model' entries are not tensors: {', '.join(bad[:5])}")
    _check_keys(Path(path), state, official_shapes(cfg))
    model.load_state_dict({**model.state_dict(), **_module_state(cfg, state, Path(path))}, strict=True)
    return cfg


def build(variant: str, layers: Sequence[str], pooling: str | Poolings, checkpoint: Path | None,
          seed: int = 0) -> BEATsEncoder:
    LAYERS.check_variant(variant)
    if checkpoint is None:
        model = BEATsEncoder(layers, pooling, variant)
        state = random_state_dict(official_config(), np.random.default_rng(seed))
        model.load_state_dict({**model.state_dict(), **_module_state(official_config(), state, Path("<random>"))})
        return model
    model = BEATsEncoder(layers, pooling, variant)
    load_checkpoint(model, Path(checkpoint))
    return model


# ----------------------------------------------------------------------------- random checkpoints


def official_config(finetuned: bool = False) -> dict[str, object]:
    cfg = {**BEATS_CONFIG_DEFAULTS, **OFFICIAL_CFG}
    cfg.update({"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_wise_gradient_decay_ratio": 0.6})
    if finetuned:
        cfg.update({"finetuned_model": True, "predictor_class": 527, "predictor_dropout": 0.0})
    return cfg


def random_state_dict(cfg: Mapping[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Random tensors for every official key, with norms, biases, gates and the position table moved
    well away from their default inits (identity norms and unit gates would hide wiring mistakes)."""
    shapes = official_shapes(cfg)
    table = rng.normal(0.0, 1.0, shapes["encoder.layers.0.self_attn.relative_attention_bias.weight"])
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("relative_attention_bias.weight"):
            values = table
        elif key.endswith("grep_a"):
            values = rng.uniform(0.3, 2.0, shape)
        elif key.endswith("weight_g"):
            values = rng.uniform(0.5, 2.0, shape)
        elif "norm" in key and key.endswith(".weight"):
            values = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".bias"):
            values = rng.normal(0.0, 0.2, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            values = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
        state[key] = torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(shape)
    return state


def write_random_checkpoint(path: Path, variant: str = "beats", seed: int = 0, kind: str = "iter3") -> None:
    """An official-layout BEATs .pt with random weights. kind: "iter3" (self-supervised, also the
    iter3+ layout) or "as2m-finetuned" (adds cfg finetuned_model=True and the 527-class predictor)."""
    LAYERS.check_variant(variant)
    if kind not in ("iter3", "as2m-finetuned"):
        raise ValueError(f"kind {kind!r} is not 'iter3' or 'as2m-finetuned'")
    cfg = official_config(finetuned=kind == "as2m-finetuned")
    state = random_state_dict(cfg, np.random.default_rng(seed))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": cfg, "model": state}, path)
