"""Matched budgets: each family sized by the width it declares (`width()`) to a number of parameters or
of MACs per image, within ±5%, preferring widths of whole vectors of channels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from patchbench.errors import UserError
from patchbench.flops import count_macs, count_params
from patchbench.models import create_model

BUDGET_TOLERANCE = 0.05


def model_params(model: str, *, num_classes: int, img_size: int, **overrides) -> int:
    """Parameter count of `model` built with `overrides`, on the meta device (no memory, instant)."""
    with torch.device("meta"):
        return count_params(create_model(model, num_classes=num_classes, img_size=img_size, **overrides))


def model_macs(model: str, *, num_classes: int, img_size: int, **overrides) -> int:
    """MACs of one forward pass on one `img_size` image, counted on the meta device."""
    with torch.device("meta"):
        return count_macs(create_model(model, num_classes=num_classes, img_size=img_size, **overrides), img_size)


MEASURES = {"params": (model_params, "--param-budget", "parameters"), "macs": (model_macs, "--mac-budget", "MACs")}


def width_knob(model: str, *, num_classes: int, img_size: int,
               base: dict | None = None) -> tuple[str, int, Callable[[int], dict], str | None]:
    """(what is varied, its value in `base` in steps, width -> overrides, a finer knob or None), as the
    model's family declares it (`width()`): ConvMixer and the isotropic backbone `dim`, ResNets `width`,
    ViTs `dim` in steps of the head count with the MLP in proportion, then `mlp_dim` alone."""
    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, img_size=img_size, **(base or {}))
    if not hasattr(net, "width"):
        raise UserError(f"model {model!r} ({type(net).__name__}) declares no width to size for a budget; "
                        f"use a convmixer_*, vit_*, resnet* or iso_* model")
    w = net.width()  # each family declares its own (patchbench.models.layers.Width)
    return w.knob, w.value // w.step, w.overrides, w.fine


def _closest(params: Callable[[int], int], budget: int, start: int, limit: int) -> int:
    """The integer w in [1, limit] whose params(w) is closest to budget; params must grow with w."""
    lo, hi = 1, max(2, start)
    while params(hi) < budget and hi < limit:  # grow the bracket until it holds the budget
        lo, hi = hi, min(limit, hi * 2)
    while hi - lo > 1:  # params(lo) < budget <= params(hi), or lo == 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < budget else (lo, mid)
    return min((lo, hi), key=lambda w: abs(params(w) - budget))


def _aligned(count: Callable[[int], int], budget: int, w: int, tolerance: float,
             channels: Callable[[int], int], reach: int = 256) -> int:
    """Among the widths near `w` whose size is within `tolerance` of `budget`, the one whose channel count
    is a multiple of 16, else of 8 (the widths oneDNN's vector kernels and patchbench.cpu's operators run
    fastest), else `w`; the closest to the budget among equals."""
    def within(v: int) -> bool:
        return v >= 1 and abs(count(v) - budget) <= tolerance * budget

    if not within(w):
        return w
    near = [w]
    for step in (-1, 1):
        v = w + step
        while abs(v - w) <= reach and within(v):
            near.append(v)
            v += step

    def rank(v: int) -> tuple:
        c = channels(v)
        return (0 if c % 16 == 0 else 1 if c % 8 == 0 else 2, abs(count(v) - budget))
    return min(near, key=rank)


def match_budget(model: str, budget: int, *, num_classes: int, img_size: int, base: dict | None = None,
                 tolerance: float = BUDGET_TOLERANCE, measure: str = "params") -> tuple[dict, int]:
    """(overrides, size): `base` (the preset's overrides: depth, patch size, ...) unchanged when it is
    within `tolerance` of `budget` already, else with the width whose size is closest. The size is the
    parameter count, or with measure="macs" the MACs of one forward pass at `img_size`.

    Within the tolerance, a width that is a multiple of 16 (else 8) channels is preferred to the closest
    one (`_aligned`). Raises UserError when even the closest width misses by more than `tolerance`.
    """
    size_of, flag, unit = MEASURES[measure]
    base = dict(base or {})
    knob, default, width_overrides, fine = width_knob(model, num_classes=num_classes, img_size=img_size, base=base)

    def overrides_for(w: int) -> dict:
        return {**base, **width_overrides(w)}

    def count(overrides: dict) -> int:
        return size_of(model, num_classes=num_classes, img_size=img_size, **overrides)

    if abs(count(base) - budget) <= tolerance * budget:
        return base, count(base)  # already within the budget: keep the model as designed (its width may be
        # chosen for speed, e.g. a multiple of 16 channels for patchbench.cpu's operators)
    w = _closest(lambda v: count(overrides_for(v)), budget, default, 1 << 14)
    w = _aligned(lambda v: count(overrides_for(v)), budget, w, tolerance, lambda v: overrides_for(v)[knob])
    overrides = overrides_for(w)
    if fine and abs(count(overrides) - budget) > tolerance * budget:
        coarse = dict(overrides)
        fit = _closest(lambda v: count({**coarse, fine: v}), budget, coarse[fine], 1 << 16)
        overrides[fine] = _aligned(lambda v: count({**coarse, fine: v}), budget, fit, tolerance, lambda v: v)
    got = count(overrides)
    if abs(got - budget) > tolerance * budget:
        near = f"{knob}={overrides[knob]} has {got:,}"
        neighbour = w + 1 if got < budget else w - 1  # the width on the budget's other side
        if neighbour >= 1 and not fine:
            other = overrides_for(neighbour)
            near += f", {knob}={other[knob]} has {count(other):,}"
        raise UserError(f"{flag} {budget:,} is more than {tolerance:.0%} from every {model}: {near} "
                        f"{unit}; choose a budget near one of these")
    return overrides, got

def patch_size_of(model: str, overrides: dict, *, num_classes: int, img_size: int) -> int | None:
    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, img_size=img_size, **overrides)
    return getattr(net, "patch_size", None)
