"""AdamW with parameter groups, and learning-rate schedules as pure functions of the step.

A schedule here is a plain function `(step, total_steps, cfg) -> (lr, beta1)`: what the optimizer
uses for training step `step` (0-based). Nothing is stateful, so resuming only needs the step number,
and the schedule can be plotted or tested without an optimizer (airbench's way).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from patchbench.config import SCHEDULES, TrainConfig


def param_groups(model: nn.Module, weight_decay: float, conv_linear_only: bool = False) -> list[dict]:
    """Two AdamW groups: decayed weights, and everything that must not be decayed.

    Not decayed: every parameter with ndim <= 1 (norm weights and biases, conv/linear biases, the
    ConvMixer residual gains) and the names in `model.no_weight_decay()` (cls token, position
    embedding). With `conv_linear_only` (the study notebook's rule) only weights of nn.Conv2d/nn.Linear
    modules are decayed, so e.g. nn.MultiheadAttention's packed in_proj_weight is not.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    conv_linear = {f"{name}.weight" if name else "weight"
                   for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep = p.ndim > 1 and name not in skip and (not conv_linear_only or name in conv_linear)
        (decay if keep else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.wd_conv_linear_only)
    lr, beta1 = lr_at(0, 1, cfg)
    # foreach=False: the same per-tensor kernels everywhere, so CPU results do not depend on grouping
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, cfg.betas[1]), foreach=False)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps the schedule is sized for: `schedule_epochs` (the study's 100) or exactly the run."""
    return (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def onecycle(step: int, total: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4, base_momentum: float = 0.85,
             max_momentum: float = 0.95) -> tuple[float, float]:
    """torch.optim.lr_scheduler.OneCycleLR (cosine, two phases) at `step`: (lr, momentum).

    The rate rises from max_lr/div_factor to max_lr over the first pct_start of the steps, then falls
    to max_lr/div_factor/final_div_factor; momentum (Adam's beta1) moves the opposite way.
    """
    initial = max_lr / div_factor
    phases = [  # (end step, lr from, lr to, momentum from, momentum to), as torch lays them out
        (float(pct_start * total) - 1, initial, max_lr, max_momentum, base_momentum),
        (total - 1, max_lr, initial / final_div_factor, base_momentum, max_momentum),
    ]
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start) if end > start else 1.0
            return _cos(lr0, lr1, pct), _cos(m0, m1, pct)
        start = end
    raise AssertionError("unreachable")


def piecewise(step: int, total: int, max_lr: float) -> float:
    """The ConvMixer authors' schedule: linear 0 -> max at 40% -> max/20 at 80% -> 0 at the end.

    Their code evaluates it at t = epoch + (i + 1) / iters, i.e. after the step: so do we.
    """
    t = (step + 1) / total
    return float(np.interp(t, [0.0, 0.4, 0.8, 1.0], [0.0, max_lr, max_lr / 20.0, 0.0]))


def lr_at(step: int, total: int, cfg: TrainConfig) -> tuple[float, float]:
    """(learning rate, Adam beta1) for training step `step` of a schedule sized for `total` steps."""
    if cfg.schedule == "onecycle":
        lr, momentum = onecycle(step, total, cfg.lr, cfg.pct_start)
        return lr, (momentum if cfg.cycle_momentum else cfg.betas[0])
    if cfg.schedule == "piecewise":
        return piecewise(step, total, cfg.lr), cfg.betas[0]
    if cfg.schedule == "constant":
        return cfg.lr, cfg.betas[0]
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, beta1: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["betas"] = (beta1, group["betas"][1])
