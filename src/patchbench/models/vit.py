"""Vision Transformer: Dosovitskiy et al., "An Image is Worth 16x16 Words" (arXiv:2010.11929).

    patch_embed: Conv2d(in_chans, dim, kernel=stride=patch_size), flattened to (B, N, dim)
    tokens:      [cls token; patches] + learned position embedding -> dropout
    blocks:      depth x pre-norm [x + Attention(LN(x)); x + MLP(LN(x))]
    head:        LN -> cls token -> Linear(dim, num_classes)

Deviation from the paper: the classifier is a single linear layer (the paper's fine-tuning head), and
`dropout` is one rate for the embedding, the attention output and the MLP (no attention-probability
dropout).

Image size: the position embedding has one entry per patch of an `img_size` x `img_size` image, so a
ViT runs only at the size it was built for. Other sizes raise ValueError in `forward`, naming the
`img_size=` to build it with; we do not interpolate position embeddings silently. With
`dynamic_img_size=True` (what training at other sizes than the evaluation size needs: progressive
resizing, train-test resolution) any square multiple of the patch size is accepted, the position
embedding resampled bicubically to its grid as timm's `resample_abs_pos_embed` does; at the built
size nothing changes. `drop_path` is stochastic depth on both residual branches of every block,
rising linearly over the blocks (timm's schedule).

`notebook_vit` is the study notebook's ViT, flaws included (see `NotebookViT`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.models import register_model
from patchbench.models.layers import DropPath, Width, drop_path_rates, kaiming_init_


def _num_patches(img_size: int, patch_size: int, model: str) -> int:
    """Patches per image side; ValueError unless img_size is a positive multiple of patch_size."""
    if patch_size < 1:
        raise ValueError(f"{model} patch_size must be >= 1, got {patch_size}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < patch_size \
            or img_size % patch_size:
        raise ValueError(f"{model} img_size must be a positive multiple of patch_size={patch_size}, "
                         f"got {img_size!r}")
    return img_size // patch_size


def _check_input(x: torch.Tensor, img_size: int, model: str) -> None:
    if x.shape[-2:] != (img_size, img_size):
        h, w = x.shape[-2:]
        raise ValueError(f"{model} was built for {img_size}x{img_size} images, got {h}x{w}; "
                         f"create it with img_size={h}" if h == w else
                         f"{model} takes square {img_size}x{img_size} images, got {h}x{w}")


class Attention(nn.Module):
    """Multi-head self-attention with one packed q/k/v projection (as timm and the paper).

    Heads are dim // num_heads wide; when num_heads does not divide dim, q/k/v and the output
    projection work in num_heads * (dim // num_heads) channels (the isotropic backbone's budgets size
    dim in steps of 1); when it divides, this is exactly timm's Attention."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if not 1 <= num_heads <= dim:
            raise ValueError(f"attention needs 1 <= num_heads <= dim, got num_heads={num_heads}, dim={dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # torch's CPU flash attention is slower in bf16 than in fp32 (docs/PERFORMANCE.md): under bf16 autocast the attention itself runs in fp32 (autocast, which would
            # cast it back to bf16, is paused for it), the projections in bf16
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block, each branch dropped per sample with probability `drop_path`."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def vit_width(model) -> Width:
    """A ViT's width knob: `dim` in steps of the head count, the MLP in proportion; then `mlp_dim` alone
    (a step of the head count moves a small ViT's size by ~10%)."""
    dim, heads = model.head.in_features, model.blocks[0].attn.num_heads
    return Width("dim", dim, step=heads, scaled={"mlp_dim": model.blocks[0].mlp.fc1.out_features / dim},
                 fine="mlp_dim")


class ViT(nn.Module):
    """ViT with a cls token and a learned position embedding, built for `img_size` x `img_size` inputs.

    The MLP width is `mlp_dim` when given, else `int(dim * mlp_ratio)`.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        patch_size: int = 16,
        img_size: int = 224,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        dynamic_img_size: bool = False,
        in_chans: int = 3,
        num_classes: int = 10,
    ):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"ViT dim={dim} must be a positive multiple of num_heads={num_heads}")
        mlp_dim = int(dim * mlp_ratio) if mlp_dim is None else mlp_dim
        if depth < 0 or mlp_dim < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(f"ViT needs depth >= 0 and positive mlp_dim, in_chans, num_classes; got "
                             f"depth={depth}, mlp_dim={mlp_dim}, in_chans={in_chans}, num_classes={num_classes}")
        grid = _num_patches(img_size, patch_size, "ViT")
        self.default_img_size = img_size
        self.patch_size = patch_size  # recorded in summary.json for the report's patch-grid figure
        self.dynamic_img_size = dynamic_img_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))  # +1: the cls token
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_dim, dropout, rate)
                                      for rate in drop_path_rates(drop_path, depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the paper's reference code and timm: small normal position embeddings and linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not be weight-decayed (besides the usual ndim <= 1 ones)."""
        return {"cls_token", "pos_embed"}

    def pos_embed_for(self, grid: int) -> torch.Tensor:
        """The position embedding for a grid x grid image: as learned, or resampled bicubically (timm's
        resample_abs_pos_embed: cls entry kept, the patch grid interpolated in float32, antialiased)."""
        built = self.default_img_size // self.patch_size
        if grid == built:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patches.shape[-1]
        patches = patches.float().reshape(1, built, built, dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(self.pos_embed.dtype)
        return torch.cat([cls, patches], dim=1)

    width = vit_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size and x.shape[-1] == x.shape[-2] and x.shape[-1] % self.patch_size == 0:
            grid = x.shape[-1] // self.patch_size
        else:
            _check_input(x, self.default_img_size, "ViT")
            grid = self.default_img_size // self.patch_size
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed_for(grid))  # (B, N + 1, dim)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # classify from the cls token


@register_model(dim=128, depth=6, num_heads=8, mlp_dim=256, patch_size=16, img_size=160)
def vit_tiny_6l8h(**kw) -> ViT:
    """~0.9M-parameter ViT for 160px images: patch 16 (10x10 = 100 tokens), dim 128, 6 layers, 8 heads.

    Depth, heads, width and MLP (128 -> 256) are the study's ViT; the patch size is 16 rather than the
    notebook's 4 so that 160px images give a short sequence.
    """
    return ViT(**kw)


class NotebookViT(nn.Module):
    """The study notebook's ViT, exactly: 811,146 parameters at 10 classes, 32px images, patch 4.

    Patches are flattened (4*4*3 = 48 values, order (p1 p2 c)) and projected by Linear(48, 128); a cls
    token and a position embedding (1, 65, 128) drawn from N(0, 1) are learned; dropout 0.2 after the
    embedding; 6 pre-norm blocks of LayerNorm -> nn.MultiheadAttention(128, 8 heads) -> residual,
    LayerNorm -> MLP 128 -> 256 -> 128 (GELU, dropout 0.2 after each linear) -> residual; LayerNorm ->
    Linear(128, 10) on the cls token. Init: the notebook's kaiming-normal on conv/linear weights.

    Flaws kept on purpose: the position embedding is fixed at 65 tokens, so only 32px inputs work
    (others raise ValueError); N(0, 1) position embeddings are large next to the patch tokens; the
    kaiming (ReLU-gain) init of attention output and MLP weights.
    """

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 patch_size: int = 4, dim: int = 128, depth: int = 6, num_heads: int = 8,
                 mlp_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        if img_size != 32 or patch_size != 4:
            got = f"img_size={img_size}" + (f", patch_size={patch_size}" if patch_size != 4 else "")
            raise ValueError(f"notebook_vit is fixed at 32px, patch 4 (65 position embeddings), got {got}; "
                             f"use vit_tiny_6l8h for other sizes")
        if dim % num_heads:
            raise ValueError(f"notebook_vit dim={dim} must be a multiple of num_heads={num_heads}")
        self.default_img_size = img_size
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * in_chans, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([NotebookBlock(dim, num_heads, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        kaiming_init_(self)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    width = vit_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.default_img_size, "notebook_vit")
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
        x = self.patch_embed(x.reshape(B, (H // p) * (W // p), p * p * C))  # (B, 64, dim)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class NotebookBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@register_model
def notebook_vit(**kw) -> NotebookViT:
    """The study notebook's ViT (6 layers, 8 heads, dim 128, patch 4, 32px): see `NotebookViT`."""
    return NotebookViT(**kw)
