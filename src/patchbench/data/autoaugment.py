"""TrivialAugmentWide, RandAugment and random erasing for a whole batch at once, on its device.

torchvision's transforms draw one op and one magnitude per image and run it on that image alone.
Here the parameters are drawn per sample for the whole batch in one go (from a generator seeded by
(seed, epoch, batch), so resuming is exact), and each op then runs once over all the samples that
drew it, with per-sample magnitudes as tensors. Op set, magnitude bins, signs, the nearest-neighbour
affine grid with zero fill, and every formula are torchvision's (`transforms.v2.TrivialAugmentWide`,
`RandAugment`, `RandomErasing` and `transforms.v2.functional`); tests/test_augment_ops.py checks
each op against torchvision's own per-sample op for the same parameters.

Images are float (B, 3, H, W) in [0, 1] (torchvision's float convention), before normalisation;
random erasing runs after normalisation and writes 0 there, as torchvision's RandomErasing(value=0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

NUM_BINS = 31  # torchvision's num_magnitude_bins

# op -> (magnitudes of the bins as a function of (bins, height, width), or None; signed?)
TRIVIAL_WIDE = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 135.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 6))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
RAND_AUGMENT = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 4))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
POLICIES = {"trivialaugment": TRIVIAL_WIDE, "randaugment": RAND_AUGMENT}


# --------------------------------------------------------------------------------------------------
# Drawing the parameters


def draw_ops(policy: str, n: int, size: int, generator: torch.Generator, *, num_ops: int = 2,
             magnitude: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """(ops, magnitudes), each (n, rounds): the op index (into the policy's op list) and the signed
    magnitude of every sample in every round, drawn as torchvision does per image (TrivialAugmentWide:
    one round, a random bin; RandAugment: `num_ops` rounds at bin `magnitude`)."""
    space = POLICIES[policy]
    names = list(space)
    rounds = 1 if policy == "trivialaugment" else num_ops
    ops = torch.randint(len(names), (n, rounds), generator=generator)
    bins = torch.randint(NUM_BINS, (n, rounds), generator=generator) if policy == "trivialaugment" \
        else torch.full((n, rounds), magnitude)
    negative = torch.rand(n, rounds, generator=generator) <= 0.5
    mags = torch.zeros(n, rounds, dtype=torch.float64)
    for k, name in enumerate(names):
        fn, signed = space[name]
        if fn is None:
            continue
        table = fn(NUM_BINS, size, size).to(torch.float64)
        chosen = ops == k
        value = table[bins[chosen]]
        if signed:
            value = torch.where(negative[chosen], -value, value)
        mags[chosen] = value
    return ops, mags


# --------------------------------------------------------------------------------------------------
# The ops, batched: x (n, 3, H, W) float in [0, 1], m (n,) float64 magnitudes


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend, per-sample ratio: a * r + b * (1 - r), clamped to [0, 1]."""
    r = _col(ratio, a)
    return (a * r).add_(b * (1.0 - r)).clamp_(0, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def brightness(x, m):
    return (x * _col(1.0 + m, x)).clamp_(0, 1)


def color(x, m):
    return _blend(x, _grayscale(x), 1.0 + m)


def contrast(x, m):
    return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + m)


def sharpness(x, m):
    """Blend with a 3x3 smoothing (5 in the middle, 1 around, /13) on the interior; the border is kept.

    The smoothing is torchvision's 3x3 kernel, computed as (3x3 box sum + 4 x centre) / 13 with two
    separable sums: faster than the grouped conv2d on a CPU, equal within float rounding."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    out = x.clone()
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]  # (n, 3, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (n, 3, H-2, W-2)
    blurred = box.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0)
    view = out[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view).mul_(_col(-m, x)))  # x + (1 - factor) (blur - x), factor = 1 + m
    return out.clamp_(0, 1)


def posterize(x, m):
    levels = _col(torch.pow(2.0, m), x)
    return torch.minimum((x * levels).floor_(), levels - 1).clamp_(min=0).div_(levels)


def solarize(x, m):
    return torch.where(x >= _col(m, x), 1.0 - x, x)


def autocontrast(x, m):
    return TF.autocontrast_image(x)  # batched in torchvision already


def equalize(x, m):
    return TF.equalize_image(x)  # batched in torchvision already (via uint8, as torchvision does for floats)


def _inverse_affine(angle: float, translate: tuple[float, float], shear: tuple[float, float],
                    center: tuple[float, float]) -> list[float]:
    """torchvision's _get_inverse_affine_matrix (scale 1): the output-to-input map, 2x3 row-major."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += cx - matrix[0] * (cx + tx) - matrix[1] * (cy + ty)
    matrix[5] += cy - matrix[3] * (cx + tx) - matrix[4] * (cy + ty)
    return matrix


def _warp(x: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """One grid_sample for the batch (nearest, zero fill): torchvision's _affine_grid per sample."""
    n, _, h, w = x.shape
    theta = torch.tensor(matrices, dtype=x.dtype, device=x.device).view(n, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device))
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def affine_matrix(name: str, v: float, h: int, w: int) -> list[float] | None:
    """torchvision's inverse affine matrix of op `name` at signed magnitude `v` (None: a quarter turn,
    which torchvision makes with rot90 rather than a grid)."""
    if name == "ShearX":  # torchvision shears about the top-left corner (center=[0, 0])
        return _inverse_affine(0.0, (0, 0), (math.degrees(math.atan(v)), 0.0), (-0.5 * w, -0.5 * h))
    if name == "ShearY":
        return _inverse_affine(0.0, (0, 0), (0.0, math.degrees(math.atan(v))), (-0.5 * w, -0.5 * h))
    if name == "TranslateX":
        return _inverse_affine(0.0, (int(v), 0), (0.0, 0.0), (0.0, 0.0))
    if name == "TranslateY":
        return _inverse_affine(0.0, (0, int(v)), (0.0, 0.0), (0.0, 0.0))
    if name == "Rotate":
        angle = v % 360
        if angle in _quarter_turns(h, w):
            return None
        return _inverse_affine(-angle, (0, 0), (0.0, 0.0), (0.0, 0.0))
    raise ValueError(f"{name} is not an affine op")


def _quarter_turns(h: int, w: int) -> dict[float, int]:
    """Angles torchvision's rotate makes exactly with rot90 (90 and 270 only for square images)."""
    return {0: 0, 180: 2, 90: 1, 270: 3} if h == w else {0: 0, 180: 2}


def warp(x: torch.Tensor, names: list[str], m: torch.Tensor) -> torch.Tensor:
    """The affine ops of a round, each sample its own (op, magnitude), in one grid_sample call."""
    h, w = x.shape[-2:]
    values = m.tolist()
    matrices = [affine_matrix(name, v, h, w) for name, v in zip(names, values)]
    grid = [i for i, mat in enumerate(matrices) if mat is not None]
    if len(grid) == len(x):  # the usual case: no quarter turn in this group
        return _warp(x, matrices)
    out = torch.empty_like(x)
    if grid:
        idx = torch.tensor(grid, device=x.device)
        out.index_copy_(0, idx, _warp(x.index_select(0, idx), [matrices[i] for i in grid]))
    turns = _quarter_turns(h, w)
    for k in set(turns.values()):
        idx = [i for i, mat in enumerate(matrices) if mat is None and turns[values[i] % 360] == k]
        if idx:
            idx = torch.tensor(idx, device=x.device)
            out.index_copy_(0, idx, torch.rot90(x.index_select(0, idx), k=k, dims=(-2, -1)))
    return out


def rotate(x, m):
    """torchvision's rotate: exact quarter turns by rot90 (square images), others by the affine grid."""
    return warp(x, ["Rotate"] * len(m), m)


AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


COLOUR_OPS = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
              "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize}
OPS = {"Identity": None, **{name: None for name in AFFINE}, **COLOUR_OPS}  # affine ops run through `warp`


def apply_ops(x: torch.Tensor, policy: str, ops: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """Apply the drawn ops (from `draw_ops`) round by round; returns the batch in its original order.

    Each round sorts the batch by op (one gather), so every op runs once, on a contiguous slice of the
    samples that drew it, and all the round's affine ops share one grid_sample call; a last gather
    puts the samples back in order. (Gathering a few samples per op instead costs more per sample
    than the ops themselves.)"""
    names = list(POLICIES[policy])
    rank = {name: i for i, name in enumerate(("Identity", *AFFINE, *COLOUR_OPS))}  # affine ops side by side
    x = x.contiguous()  # NCHW: gathers of whole samples are plain copies
    order = torch.arange(len(x))  # x[j] is sample order[j]
    for r in range(ops.shape[1]):
        drawn = [names[k] for k in ops[:, r].tolist()]
        by_op = torch.tensor(sorted(range(len(x)), key=lambda j: rank[drawn[order[j]]]))  # stable sort
        x, order = x.index_select(0, by_op.to(x.device)), order[by_op]
        kinds = [drawn[i] for i in order.tolist()]
        m = mags[order, r]
        for group in (AFFINE, *((name,) for name in COLOUR_OPS)):
            idx = [j for j, k in enumerate(kinds) if k in group]
            if idx:
                lo, hi = idx[0], idx[-1] + 1
                fn = COLOUR_OPS.get(group[0]) or (lambda v, mv, sel=kinds[lo:hi]: warp(v, sel, mv))
                x[lo:hi] = fn(x[lo:hi], m[lo:hi])
    return x.index_select(0, torch.argsort(order).to(x.device)) if ops.shape[1] else x


# --------------------------------------------------------------------------------------------------
# Random erasing


def draw_erasing(n: int, height: int, width: int, p: float, generator: torch.Generator,
                 scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts: int = 10) -> torch.Tensor:
    """(n, 4) int64 boxes (i, j, h, w) to erase, as torchvision's RandomErasing.make_params per image
    (h = w = 0: nothing erased, either not chosen with probability `p` or no attempt fitted)."""
    area = height * width
    chosen = torch.rand(n, generator=generator) < p
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator, dtype=torch.float64))
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=generator,
                                                                      dtype=torch.float64))
    h = torch.round(torch.sqrt(target * aspect)).long()
    w = torch.round(torch.sqrt(target / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(dim=1)
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    i = torch.floor(u[:, 0] * (height - h + 1)).long()
    j = torch.floor(u[:, 1] * (width - w + 1)).long()
    keep = chosen & fits.any(dim=1)
    zero = torch.zeros_like(h)
    return torch.stack([torch.where(keep, i, zero), torch.where(keep, j, zero),
                        torch.where(keep, h, zero), torch.where(keep, w, zero)], dim=1)


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """x[b, :, i:i+h, j:j+w] = 0 for every sample's box, as one masked fill."""
    if not bool((boxes[:, 2] > 0).any()):
        return x
    h, w = x.shape[-2:]
    b = boxes.to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    i, j, bh, bw = (b[:, k].view(-1, 1, 1) for k in range(4))
    mask = (ys >= i) & (ys < i + bh) & (xs >= j) & (xs < j + bw)  # (n, H, W)
    return x.masked_fill_(mask.unsqueeze(1), 0.0)
