"""One isotropic backbone with two independent choices, for the controlled experiment (`patchbench ablate`).

    stem:   patch (a strided p x p conv: the linear patch embedding) | conv (a convolutional tokenizer,
            CCT-style: log2(p) x [3x3 conv -> ReLU -> 3x3/2 max pool], Hassani et al. 2021, reaching
            the same (img_size / p)^2 token grid)
    tokens: + learned position embedding (every cell, so that attention can tell positions apart)
    blocks: depth x MetaFormer block [x + mixer(LN(x)); x + MLP(LN(x))] (Yu et al., CVPR 2022), MLP
            dim -> mlp_ratio * dim -> dim with GELU, LayerNorm over channels (eps 1e-6)
    mixer:  conv (depthwise k x k, ConvMixer's spatial mixing) | attention (multi-head self-attention,
            ViT's; heads of dim // num_heads channels) | mlp (a token-mixing MLP across the tokens, MLP-Mixer's, hidden 0.5 * dim) |
            pool (average pooling minus identity, PoolFormer's) | identity (no token mixing: the control)
    head:   LN -> mean over tokens -> Linear(dim, num_classes)

Everything but the two choices is the same for every cell, so a difference between cells is the
mixer's or the stem's. Each mixer's block equals its reference on shared weights (tests/test_isotropic.py):
timm's VisionTransformer block (attention), MlpMixer's MixerBlock (mlp), MetaFormer's block with
PoolFormer's Pooling (pool), with an identity mixer (identity) and with ConvMixer's depthwise conv (conv).
Registered as `iso_<mixer>_<stem>`; `dim` is the width that matched budgets change.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
from torch import nn

from patchbench.models import register_model
from patchbench.models.layers import DropPath, Width, check_img_size, drop_path_rates
from patchbench.models.vit import MLP, Attention

Mixer = Literal["conv", "attention", "mlp", "pool", "identity"]
Stem = Literal["patch", "conv"]
MIXERS, STEMS = typing.get_args(Mixer), typing.get_args(Stem)


class ConvMixing(nn.Module):
    """Depthwise k x k convolution over the token grid (ConvMixer's spatial mixing), on (B, N, C) tokens."""

    def __init__(self, dim: int, grid: int, kernel_size: int):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self.conv(_grid(x, self.grid)))


class PoolMixing(nn.Module):
    """PoolFormer's token mixer: 3x3 average pooling (padding not counted) minus the input."""

    def __init__(self, grid: int, pool_size: int = 3):
        super().__init__()
        self.grid = grid
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = _grid(x, self.grid)
        return _tokens(self.pool(g) - g)


class TokenMLP(nn.Module):
    """MLP-Mixer's token mixing: an MLP across the N tokens, the same for every channel."""

    def __init__(self, num_tokens: int, hidden: int):
        super().__init__()
        self.mlp = MLP(num_tokens, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)  # (B, C, N) -> mixed over N -> (B, N, C)


class NoMixing(nn.Module):
    """The control: the mixer's residual branch is the normalised input itself (MetaFormer's identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, grid, grid) feature map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class MetaBlock(nn.Module):
    """x + mixer(LN(x)), then x + MLP(LN(x)); both branches dropped per sample with `drop_path`."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def conv_tokenizer(in_chans: int, dim: int, patch_size: int, hidden: int) -> nn.Sequential:
    """CCT's tokenizer: log2(patch_size) stages of 3x3 conv -> ReLU -> 3x3/2 max pool (each halves the
    side), `hidden` channels in between and `dim` out, so the token grid is the patch stem's."""
    stages = int(math.log2(patch_size))
    if 2 ** stages != patch_size:
        raise ValueError(f"the conv stem needs a power-of-two patch_size, got {patch_size}")
    layers, c = [], in_chans
    for i in range(stages):
        out = dim if i == stages - 1 else hidden
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                   nn.MaxPool2d(3, stride=2, padding=1)]
        c = out
    return nn.Sequential(*layers)


class Isotropic(nn.Module):
    """The isotropic backbone of the ablation: `mixer` x `stem`, everything else shared (module docstring)."""

    def __init__(
        self,
        *,
        mixer: Mixer,
        stem: Stem,
        dim: int = 128,
        depth: int = 8,
        patch_size: int = 8,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        num_heads: int = 4,
        token_mlp_ratio: float = 0.5,
        stem_hidden: int = 32,
        drop_path: float = 0.0,
        img_size: int = 64,
        in_chans: int = 3,
        num_classes: int = 10,
    ):
        super().__init__()
        if mixer not in MIXERS or stem not in STEMS:
            raise ValueError(f"mixer must be one of {MIXERS} and stem one of {STEMS}, got {mixer!r}, {stem!r}")
        if dim < 1 or depth < 0 or patch_size < 1 or num_classes < 1:
            raise ValueError(f"Isotropic needs positive dim, patch_size and num_classes and depth >= 0, got "
                             f"dim={dim}, depth={depth}, patch_size={patch_size}, num_classes={num_classes}")
        if mixer == "attention" and not 1 <= num_heads <= dim:
            raise ValueError(f"attention needs 1 <= num_heads <= dim, got num_heads={num_heads}, dim={dim}")
        self.default_img_size = check_img_size(img_size, patch_size, f"Isotropic with patch_size={patch_size}")
        if img_size % patch_size:
            raise ValueError(f"Isotropic img_size must be a multiple of patch_size={patch_size}, got {img_size}")
        self.patch_size, self.mixer_kind, self.stem_kind = patch_size, mixer, stem
        grid = img_size // patch_size
        self.stem = (nn.Conv2d(in_chans, dim, patch_size, stride=patch_size) if stem == "patch"
                     else conv_tokenizer(in_chans, dim, patch_size, stem_hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

        def make_mixer() -> nn.Module:
            if mixer == "conv":
                return ConvMixing(dim, grid, kernel_size)
            if mixer == "attention":
                return Attention(dim, num_heads)
            if mixer == "mlp":
                return TokenMLP(grid * grid, int(token_mlp_ratio * dim))
            if mixer == "pool":
                return PoolMixing(grid)
            return NoMixing()

        self.blocks = nn.Sequential(*[MetaBlock(dim, make_mixer(), int(mlp_ratio * dim), rate)
                                      for rate in drop_path_rates(drop_path, depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.grid = grid

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def width(self) -> Width:  # every cell alike: `dim` in steps of 1 (heads are dim // num_heads wide)
        return Width("dim", self.head.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, dim, grid, grid)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            raise ValueError(f"Isotropic was built for {self.default_img_size}px images ({self.grid}x{self.grid} "
                             f"tokens), got a {x.shape[-2]}x{x.shape[-1]} token grid; create it with that img_size")
        x = _tokens(x) + self.pos_embed  # (B, N, dim)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))  # average over the tokens


def _register(mixer: str, stem: str) -> None:
    def build(**kw) -> Isotropic:
        return Isotropic(**kw)

    build.__name__ = f"iso_{mixer}_{stem}"
    build.__doc__ = f"The isotropic backbone with the {mixer} token mixer and the {stem} stem (see Isotropic)."
    register_model(build, mixer=mixer, stem=stem)


for _mixer in MIXERS:
    for _stem in STEMS:
        _register(_mixer, _stem)
