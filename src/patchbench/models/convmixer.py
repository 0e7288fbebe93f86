"""ConvMixer: Trockman & Kolter, "Patches Are All You Need?" (arXiv:2201.09792).

    stem:   patch embedding Conv2d(in_chans, dim, kernel=stride=patch_size) -> act -> BN
    blocks: depth x [Residual(depthwise k x k 'same' conv -> act -> BN) -> 1x1 conv -> act -> BN]
    head:   global average pool -> (dropout) -> Linear(dim, num_classes)

Deviation from the paper: none in `ConvMixer` with its defaults. Inputs whose side is not a multiple of
`patch_size` lose the last `side % patch_size` rows/columns to the strided stem, as in the paper's
224px / patch 7 models (e.g. 160px with patch 7 sees a 22x22 grid of patches covering 154 pixels).

`notebook_convmixer` is the study notebook's model, flaws included (see its docstring).
"""

from __future__ import annotations

import torch
from torch import nn

from patchbench.models import register_model
from patchbench.models.layers import (
    Residual,
    Width,
    check_img_size,
    drop_path_rates,
    kaiming_init_,
)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class ConvMixer(nn.Module):
    """ConvMixer-`dim`/`depth` with the paper's arguments, plus three options the study's notebook needs.

    `stem_stride` (default `patch_size`) other than `patch_size` makes the stem an overlapping conv
    rather than a patch embedding; `residual_gain` scales each depthwise residual by a learnable scalar
    initialised to 0; `drop_rate` is dropout before the classifier; `drop_path` is stochastic depth on
    the depthwise residual branches, rising linearly over the blocks to this rate (timm's schedule). `img_size` is only the natural
    input size (recorded as `default_img_size`); the model is fully convolutional and runs at any size
    of at least `patch_size` pixels.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        activation: str = "gelu",
        in_chans: int = 3,
        num_classes: int = 10,
        stem_stride: int | None = None,
        residual_gain: bool = False,
        drop_rate: float = 0.0,
        drop_path: float = 0.0,
        img_size: int = 224,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvMixer activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name, value in [("dim", dim), ("kernel_size", kernel_size), ("patch_size", patch_size),
                            ("in_chans", in_chans), ("num_classes", num_classes)]:
            if value < 1:
                raise ValueError(f"ConvMixer {name} must be >= 1, got {value}")
        if depth < 0:
            raise ValueError(f"ConvMixer depth must be >= 0, got {depth}")
        self.default_img_size = check_img_size(img_size, patch_size, f"ConvMixer with patch_size={patch_size}")
        self.patch_size = patch_size  # recorded in summary.json for the report's patch-grid figure
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stem_stride or patch_size),
            act(),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(
                    nn.Sequential(
                        nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),  # spatial mixing
                        act(),
                        nn.BatchNorm2d(dim),
                    ),
                    gain_init=0.0 if residual_gain else None,
                    drop_path=rate,
                ),
                nn.Conv2d(dim, dim, kernel_size=1),  # channel mixing
                act(),
                nn.BatchNorm2d(dim),
            )
            for rate in drop_path_rates(drop_path, depth)
        ])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(drop_rate),
            nn.Linear(dim, num_classes),
        )

    def width(self) -> Width:
        return Width("dim", self.head[-1].in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, dim, H/p, W/p)
        x = self.blocks(x)  # same shape: every block keeps the resolution
        return self.head(x)  # (B, num_classes)


@register_model(dim=256, depth=12, kernel_size=7, patch_size=7, img_size=160)
def convmixer_256_12(**kw) -> ConvMixer:
    """The study's stated design: ConvMixer-256/12, kernel 7, patch 7, for 160px Imagenette."""
    return ConvMixer(**kw)


@register_model(dim=256, depth=8, kernel_size=5, patch_size=2, img_size=32)
def convmixer_256_8(**kw) -> ConvMixer:
    """The paper's CIFAR-10 model: ConvMixer-256/8, kernel 5, patch 2, for 32px images."""
    return ConvMixer(**kw)


@register_model(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu", img_size=224)
def convmixer_768_32(**kw) -> ConvMixer:
    """The paper's ImageNet ConvMixer-768/32 (kernel 7, patch 7, ReLU), for 224px images."""
    return ConvMixer(**kw)


@register_model(dim=1536, depth=20, kernel_size=9, patch_size=7, img_size=224)
def convmixer_1536_20(**kw) -> ConvMixer:
    """The paper's ImageNet ConvMixer-1536/20 (kernel 9, patch 7), for 224px images."""
    return ConvMixer(**kw)


@register_model(dim=256, depth=12, kernel_size=7, patch_size=2, stem_stride=1, residual_gain=True, drop_rate=0.3,
                img_size=32)
def notebook_convmixer(**kw) -> ConvMixer:
    """The study notebook's ConvMixer, exactly (961,814 parameters at 10 classes), for 32px images.

    Flaws kept on purpose: the "patch embedding" is Conv2d(3, 256, kernel=2, stride=1), an overlapping
    conv that keeps the resolution (31x31 tokens at 32px), not a patch embedding; the study's text
    calls it patch size 7. Also unlike the paper: each depthwise residual is scaled by a learnable
    scalar gain initialised to 0, dropout 0.3 before the classifier, and the notebook's kaiming-normal
    init of every conv/linear weight with zero biases.
    """
    return kaiming_init_(ConvMixer(**kw))
