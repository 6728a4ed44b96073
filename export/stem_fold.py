"""EfficientAT's stem, block 1 and block 2's expansion folded into three convolutions: the same function, a graph
ONNX Runtime runs faster where block 1 is narrower than 16 channels (mn04, mn05: 8).

The official graph, with every BatchNorm folded into its conv (W x + b):
    s   = hardswish(stem(image))              c channels
    d   = relu(dw(s))                         block 1's depthwise conv, c channels
    out = P d + p + s                         block 1's projection and residual: features[1], c channels
    e   = relu(E out + b_e)                   block 2's expansion, e channels
Since out is linear in (d, s), E out = (E P) d + E s + E p. The fold computes [d; s + 3/8] as one 2c-channel tensor
and e from it with one 1x1 conv:
    stem'  = the stem's filters twice (2c outputs, hardswish)
    dw'    = dw on the first c channels; on the other c the identity with bias 3/8, so that relu passes
             s + 3/8 unchanged (hardswish never goes below -3/8)
    e      = relu([E P | E] [d; s + 3/8] + E p + b_e - 3/8 E 1)
Block 1's projection, its residual add and both c-channel tensors are gone. On an AVX-512 core ONNX Runtime blocks
channels by 16, and a pointwise conv reading fewer channels than a block takes a slow NCHW path (what the fold saves:
docs/benchmarks.md). Where block 1 already has 16 channels (mn10 and wider) the fold only doubles the stem's and the
expansion's work, so it is not used.

features[1] itself (layer_1) is, when asked for, one more 1x1 conv of the same tensor: out = [P | I] [d; s + 3/8] +
p - 3/8.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional

HARDSWISH_MIN = -0.375  # hardswish(x) = x relu6(x + 3) / 6 is smallest at x = -1.5
FOLD_BELOW_CHANNELS = 16  # fold where block 1 is narrower than this (ONNX Runtime's AVX-512 channel block)


def _conv(module: nn.Module, path: str) -> nn.Conv2d:
    return cast(nn.Conv2d, module.get_submodule(path))


def folded_conv(conv_norm_act: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a ConvNormAct's Conv2d with its eval-mode BatchNorm folded in."""
    conv, norm = _conv(conv_norm_act, "0"), cast(nn.BatchNorm2d, conv_norm_act.get_submodule("1"))
    assert norm.running_mean is not None and norm.running_var is not None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return (conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), (norm.bias - norm.running_mean * scale).detach()


class StemFold(nn.Module):
    """image [B, 1, 128, T] -> (features[1]'s map or None, features[2]'s map), from an official-layout MobileNetAudio
    whose weights are loaded (the fold copies them: load weights first)."""

    stem_weight: torch.Tensor
    stem_bias: torch.Tensor
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor
    expand_weight: torch.Tensor
    expand_bias: torch.Tensor
    block_1_weight: torch.Tensor | None
    block_1_bias: torch.Tensor | None

    def __init__(self, features: nn.Sequential, keep_block_1: bool) -> None:
        super().__init__()
        stem_w, stem_b = folded_conv(features.get_submodule("0"))
        dw_w, dw_b = folded_conv(features.get_submodule("1.block.0"))
        proj_w, proj_b = folded_conv(features.get_submodule("1.block.1"))
        exp_w, exp_b = folded_conv(features.get_submodule("2.block.0"))
        channels = stem_w.shape[0]
        identity = torch.zeros(channels, 1, *dw_w.shape[2:])
        identity[:, 0, dw_w.shape[2] // 2, dw_w.shape[3] // 2] = 1.0
        proj, expand = proj_w[:, :, 0, 0], exp_w[:, :, 0, 0]
        shift = torch.full((channels,), -HARDSWISH_MIN)
        self.register_buffer("stem_weight", torch.cat([stem_w, stem_w]))
        self.register_buffer("stem_bias", torch.cat([stem_b, stem_b]))
        self.register_buffer("dw_weight", torch.cat([dw_w, identity]))
        self.register_buffer("dw_bias", torch.cat([dw_b, shift]))
        self.register_buffer("expand_weight", torch.cat([expand @ proj, expand], dim=1)[:, :, None, None])
        self.register_buffer("expand_bias", expand @ proj_b + exp_b + HARDSWISH_MIN * expand.sum(dim=1))
        self.register_buffer("block_1_weight", torch.cat([proj, torch.eye(channels)], dim=1)[:, :, None, None]
                             if keep_block_1 else None)
        self.register_buffer("block_1_bias", proj_b + HARDSWISH_MIN if keep_block_1 else None)
        stem_conv = _conv(features, "0.0")
        self.stride, self.padding = stem_conv.stride, stem_conv.padding
        self.dw_padding = _conv(features, "1.block.0.0").padding
        # block 2 after its expansion: the depthwise conv (stride 2) and the projection, the official modules
        self.block_2_rest = nn.Sequential(*list(cast(nn.Sequential, features.get_submodule("2.block")))[1:])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        stem = functional.hardswish(functional.conv2d(image, self.stem_weight, self.stem_bias, self.stride,
                                                      self.padding))
        both = torch.relu(functional.conv2d(stem, self.dw_weight, self.dw_bias, padding=self.dw_padding,
                                            groups=self.dw_weight.shape[0]))  # [d; s + 3/8]
        expanded = torch.relu(functional.conv2d(both, self.expand_weight, self.expand_bias))
        block_1 = None
        if self.block_1_weight is not None:
            block_1 = functional.conv2d(both, self.block_1_weight, self.block_1_bias)
        return block_1, self.block_2_rest(expanded)


def foldable(features: nn.Sequential) -> bool:
    """The fold applies where block 1 is narrower than FOLD_BELOW_CHANNELS and has the official shape (a residual
    depthwise + projection block, no expansion, no squeeze-excitation) and block 2 starts with a ReLU expansion."""
    depthwise, expansion = _conv(features, "1.block.0.0"), _conv(features, "2.block.0.0")
    return (bool(getattr(features.get_submodule("1"), "residual", False))
            and len(cast(nn.Sequential, features.get_submodule("1.block"))) == 2
            and depthwise.groups == depthwise.in_channels < FOLD_BELOW_CHANNELS
            and isinstance(features.get_submodule("0.2"), nn.Hardswish)
            and len(cast(nn.Sequential, features.get_submodule("2.block.0"))) == 3
            and expansion.kernel_size == (1, 1) and isinstance(features.get_submodule("2.block.0.2"), nn.ReLU))
