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
    """Blend with a 3x3 smoothing (5 in the middle, 1 around, /13) on the interior; the border is kept."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=x.dtype, device=x.device).expand(3, 1, 3, 3)
    out = x.clone()
    blurred = F.conv2d(x, kernel, groups=3)  # (n, 3, H-2, W-2)
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


def shear_x(x, m):
    h, w = x.shape[-2:]  # torchvision shears about the top-left corner (center=[0, 0])
    return _warp(x, [_inverse_affine(0.0, (0, 0), (math.degrees(math.atan(v)), 0.0), (-0.5 * w, -0.5 * h))
                     for v in m.tolist()])


def shear_y(x, m):
    h, w = x.shape[-2:]
    return _warp(x, [_inverse_affine(0.0, (0, 0), (0.0, math.degrees(math.atan(v))), (-0.5 * w, -0.5 * h))
                     for v in m.tolist()])


def translate_x(x, m):
    return _warp(x, [_inverse_affine(0.0, (int(v), 0), (0.0, 0.0), (0.0, 0.0)) for v in m.tolist()])


def translate_y(x, m):
    return _warp(x, [_inverse_affine(0.0, (0, int(v)), (0.0, 0.0), (0.0, 0.0)) for v in m.tolist()])


def rotate(x, m):
    """torchvision's rotate: exact quarter turns by rot90 (square images), others by the affine grid."""
    out = torch.empty_like(x)
    angles = [v % 360 for v in m.tolist()]
    square = x.shape[-1] == x.shape[-2]
    quarter = {0: 0, 180: 2, 90: 1, 270: 3} if square else {0: 0, 180: 2}
    rest = [i for i, a in enumerate(angles) if a not in quarter]
    for k in set(quarter.values()):
        idx = [i for i, a in enumerate(angles) if quarter.get(a) == k]
        if idx:
            out[idx] = torch.rot90(x[idx], k=k, dims=(-2, -1))
    if rest:
        out[rest] = _warp(x[rest], [_inverse_affine(-angles[i], (0, 0), (0.0, 0.0), (0.0, 0.0)) for i in rest])
    return out


OPS = {"Identity": None, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
       "TranslateY": translate_y, "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast,
       "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
       "Equalize": equalize}


def apply_ops(x: torch.Tensor, policy: str, ops: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """Apply the drawn ops (from `draw_ops`) round by round; each op runs once over the samples that drew it."""
    names = list(POLICIES[policy])
    for r in range(ops.shape[1]):
        for k, name in enumerate(names):
            fn = OPS[name]
            idx = (ops[:, r] == k).nonzero().flatten()
            if fn is None or len(idx) == 0:
                continue
            idx_dev = idx.to(x.device)
            x[idx_dev] = fn(x.index_select(0, idx_dev), mags[idx, r])
    return x


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
