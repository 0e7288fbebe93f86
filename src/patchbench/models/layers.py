"""Small pieces shared by the model families: the residual wrapper, input-size checks, the study's init."""

from __future__ import annotations

import torch
import torch.nn as nn


class Residual(nn.Module):
    """`x + fn(x)`, or `x + gain * fn(x)` with a learnable scalar gain when `gain_init` is given.

    The gain is how the study's notebook scaled its ConvMixer residuals (initialised to 0, so every
    block starts as the identity on its mixing branch). It has shape (1,) so optimisers that skip
    weight decay on `ndim <= 1` parameters skip it too.
    """

    def __init__(self, fn: nn.Module, gain_init: float | None = None):
        super().__init__()
        self.fn = fn
        self.gain = None if gain_init is None else nn.Parameter(torch.full((1,), float(gain_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return x + (out if self.gain is None else self.gain * out)


def check_img_size(img_size: int, min_size: int, model: str) -> int:
    """Raise ValueError unless `img_size` is an int the model can take (at least `min_size` pixels)."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < min_size:
        raise ValueError(f"{model} needs img_size >= {min_size} pixels, got {img_size!r}")
    return img_size


def kaiming_init_(model: nn.Module) -> nn.Module:
    """The study notebook's init: kaiming-normal (fan-in, ReLU gain) on every Conv2d/Linear weight, zero biases.

    Only modules that are `nn.Conv2d`/`nn.Linear` instances are touched, as in the notebook; e.g. the
    packed q/k/v projection inside `nn.MultiheadAttention` keeps PyTorch's default (Xavier) init.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
