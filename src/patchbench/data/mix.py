"""Mixup and cutmix of a training batch, with soft targets: torchvision's MixUp and CutMix, seeded.

As `torchvision.transforms.v2.MixUp` / `CutMix`: each sample is paired with the one before it in
the batch (`roll(1, 0)`; the batch order is already a seeded shuffle), lambda ~ Beta(alpha, alpha)
once per batch, cutmix pastes one box of the partner image and corrects lambda to the pasted area,
and the targets are the one-hot labels mixed the same way. With both on, each batch uses one of the
two with equal odds (as timm's Mixup). Label smoothing, when set, smooths the one-hot labels before
they are mixed. Every draw comes from a generator seeded by (seed, epoch, batch), so a resumed run
mixes exactly as an uninterrupted one. Under DDP each rank mixes within its own part of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchbench.config import DataConfig
from patchbench.data.loader import seeded_generator

_MIX = 2  # the random stream of mixing (0: permutation, 1: crops; see loader.py)


def mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    """torchvision MixUp's image transform, in place: x * lam + x.roll(1, 0) * (1 - lam)."""
    partner = x.roll(1, 0)
    return x.mul_(lam).add_(partner.mul_(1.0 - lam))


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[tuple[int, int, int, int], float]:
    """torchvision CutMix.make_params: a box (x1, y1, x2, y2) of area ~(1 - lam) and the lambda it gives."""
    r_x = int(torch.randint(width, (1,), generator=generator))
    r_y = int(torch.randint(height, (1,), generator=generator))
    r = 0.5 * math.sqrt(1.0 - lam)
    r_w_half, r_h_half = int(r * width), int(r * height)
    x1, y1 = max(r_x - r_w_half, 0), max(r_y - r_h_half, 0)
    x2, y2 = min(r_x + r_w_half, width), min(r_y + r_h_half, height)
    return (x1, y1, x2, y2), float(1.0 - (x2 - x1) * (y2 - y1) / (width * height))


def cutmix(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """torchvision CutMix's image transform, in place: the box taken from the previous sample."""
    x1, y1, x2, y2 = box
    x[..., y1:y2, x1:x2] = x.roll(1, 0)[..., y1:y2, x1:x2]
    return x


def mix_targets(y: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """(B, num_classes) soft targets: lam * onehot(y) + (1 - lam) * onehot(y.roll(1))."""
    t = F.one_hot(y, num_classes).float()
    if smoothing:
        t = t * (1.0 - smoothing) + smoothing / num_classes
    return t.roll(1, 0).mul_(1.0 - lam).add_(t.mul(lam))


class MixupCutmix:
    """`mix(x, y, epoch, batch) -> soft targets`, mixing the images x in place."""

    def __init__(self, cfg: DataConfig, num_classes: int, smoothing: float, seed: int):
        self.mixup_alpha, self.cutmix_alpha = cfg.mixup, cfg.cutmix
        self.num_classes, self.smoothing, self.seed = num_classes, smoothing, seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        g = seeded_generator(self.seed, epoch, _MIX, batch)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand((), generator=g) < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = _beta(alpha, g)
        if use_cutmix:
            box, lam = cutmix_box(x.shape[-2], x.shape[-1], lam, g)
            cutmix(x, box)
        else:
            mixup(x, lam)
        return mix_targets(y, self.num_classes, lam, self.smoothing)


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) from the seeded generator: X / (X + Y) with X, Y ~ Gamma(alpha)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=g)
    total = float(a[0] + a[1])
    return float(a[0]) / total if total > 0 else 0.5  # both underflow only for alpha far below 0.1
