"""Small pieces shared by the model families: the residual wrapper, stochastic depth, input-size checks,
the study's init."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Width:
    """How a family is made wider or narrower to meet a parameter or MAC budget, declared by the family
    (its `width()` method): the constructor argument `knob` at `value`, moved in steps of `step` channels
    (a ViT: its head count), `scaled` arguments kept in proportion ({name: ratio to the knob}), and a
    `fine` argument to try alone when whole steps miss the tolerance."""

    knob: str
    value: int
    step: int = 1
    scaled: dict[str, float] = field(default_factory=dict)
    fine: str | None = None

    def overrides(self, w: int) -> dict:
        """The constructor arguments of width `w` (in steps)."""
        return {self.knob: self.step * w, **{k: round(r * self.step * w) for k, r in self.scaled.items()}}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016), per sample: in training, the branch it wraps is dropped
    for a sample with probability `p` and scaled by 1 / (1 - p) otherwise; identity in eval. The same
    draws as timm's `DropPath` (one bernoulli_ over a (B, 1, ...) tensor from the global RNG)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """timm's schedule: the rate grows linearly from 0 at the first block to `drop_path` at the last."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


class Residual(nn.Module):
    """`x + fn(x)`, or `x + gain * fn(x)` with a learnable scalar gain when `gain_init` is given, the
    branch dropped per sample with probability `drop_path` in training (stochastic depth).

    The gain is how the study's notebook scaled its ConvMixer residuals (initialised to 0, so every
    block starts as the identity on its mixing branch). It has shape (1,) so optimisers that skip
    weight decay on `ndim <= 1` parameters skip it too.
    """

    def __init__(self, fn: nn.Module, gain_init: float | None = None, drop_path: float = 0.0):
        super().__init__()
        self.fn = fn
        self.gain = None if gain_init is None else nn.Parameter(torch.full((1,), float(gain_init)))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(x, self.fn(x))

    def combine(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`x + gain * out` (`x + out` without a gain), the branch's output `out` dropped as configured."""
        if self.gain is not None:
            # in the branch's dtype: under bf16 autocast an fp32 gain would promote the whole trunk to
            # fp32 and every later layer would cast it back; in fp32 this is the same product
            out = out * self.gain.to(out.dtype)
        return x + self.drop_path(out)


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
