"""Batched augmentation on the training device: random-resized-crop + flip + normalise.

The random numbers (crop boxes, flips) are drawn on the CPU from a `torch.Generator`, so they
depend only on its seed, never on the device or on what ran before; the pixels are then
processed for the whole batch on the device, and normalised there in place.

Crop + resize, two kernels with the same geometry (box edges on pixel edges, samples at pixel
centres, as `F.interpolate(..., align_corners=False)`):
- on an accelerator, one `torchvision.ops.roi_align` call for the batch, `aligned=True`,
  `sampling_ratio=0` (adaptive: ceil(crop / output) samples per output pixel, averaged). A crop
  that is enlarged or kept at its size gets one sample per pixel: plain bilinear, equal to
  `F.interpolate(mode="bilinear", antialias=False)`. A crop that is shrunk (the study's ~150px
  crops to 32px) is averaged, an antialiasing box filter: on noise it lands within ~5/255 of PIL's
  antialiased resize, where one sample per pixel is ~37/255 away (aliasing).
- on the CPU, the same antialiased bilinear filter as PIL and torchvision's Resize, per sample:
  torch's uint8 antialiased kernel (equal to PIL's resize), then converted and normalised. There
  roi_align is far slower. (A fused C++ crop operator was measured against it and gave nothing a
  train step could see: benchmarks/cpu_levers.py.) Away from the crop
  border the CPU and accelerator kernels agree within one grey level when enlarging.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from patchbench.errors import UserError


def check_crop_args(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if not (0 < scale[0] <= scale[1] <= 1):
        raise UserError(f"scale={tuple(scale)}: need 0 < min <= max <= 1 (fractions of the image area)")
    if not (0 < ratio[0] <= ratio[1]):
        raise UserError(f"ratio={tuple(ratio)}: need 0 < min <= max (crop width / height)")


def random_resized_crop_boxes(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                              generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """(n, 4) integer crop boxes (x0, y0, x1, y1) in a size×size image, as float32.

    torchvision's RandomResizedCrop.get_params, for n samples at once: up to `attempts` draws of
    area (uniform in `scale` × image area) and aspect ratio (log-uniform in `ratio`), the first that
    fits wins; a sample with none falls back to the largest centred crop within `ratio`.
    """
    area = size * size
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator,
                                                                         dtype=torch.float64))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=generator,
                                                                      dtype=torch.float64))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.to(torch.uint8).argmax(dim=1)  # index of the first fitting attempt
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    # fallback: torchvision's central crop when no attempt fits (a square image: ratio bounds), at least one
    # pixel wide (torchvision's would be 0 pixels, and crash, for a ratio under 1 / (2 x size))
    if ratio[0] > 1:
        fw, fh = size, max(1, round(size / ratio[0]))
    elif ratio[1] < 1:
        fw, fh = max(1, round(size * ratio[1])), size
    else:
        fw, fh = size, size
    ok = fits.any(dim=1)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    x0 = torch.where(ok, torch.floor(u[:, 0] * (size - w + 1)), torch.floor((size - w) / 2))
    y0 = torch.where(ok, torch.floor(u[:, 1] * (size - h + 1)), torch.floor((size - h) / 2))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).float()


def center_crop_boxes(n: int, size: int, crop: float) -> torch.Tensor:
    """(n, 4) boxes of the centred square keeping `crop` of the side (the evaluation transform)."""
    if not 0 < crop <= 1:
        raise UserError(f"eval_crop={crop}: need a fraction of the image side in (0, 1]")
    c = max(1, round(size * crop))
    o = (size - c) // 2
    return torch.tensor([[o, o, o + c, o + c]], dtype=torch.float32).expand(n, 4).clone()


def flip_boxes(boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the x extent of boxes where `flip`: cropping a mirrored image there = mirrored crop."""
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack([torch.where(flip, size - x1, x0), y0, torch.where(flip, size - x0, x1), y1], 1)


def normalize_constants(mean, std, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift), each (3,) float32: (x / 255 - mean) / std = x * scale + shift."""
    scale = torch.tensor([1.0 / (255.0 * sd) for sd in std], device=device)
    shift = torch.tensor([-m / sd for m, sd in zip(mean, std)], device=device)
    return scale, shift


def normalize_(x: torch.Tensor, mean, std) -> torch.Tensor:
    """In place: (x - mean) / std per channel, for x in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def crop_resize_normalize(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None,
                          out_size: int, mean, std, *, rows: list[int] | None = None,
                          channels_last: bool = False, accelerator: bool | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) images on the device -> normalised float32 (B, 3, out_size, out_size).

    `boxes` (B, 4) are integer (x0, y0, x1, y1) pixel boxes; `flip` (B,) bool mirrors those samples
    horizontally (None: no flips). Both are CPU tensors. Sample i is cropped from image `rows[i]`
    (None: image i), so on the CPU crops are read straight from a memory-mapped split, no gather.
    `channels_last`: the same values in NHWC memory (the layout a channels_last model wants).
    `accelerator`: the gather + roi_align path (default: on every device but the CPU; True runs it on
    the CPU too, which is how that path is tested without a GPU).
    """
    device = images.device
    scale, shift = normalize_constants(mean, std, device)
    if accelerator if accelerator is not None else device.type != "cpu":
        batch = images if rows is None else images[torch.tensor(rows, device=device)]  # (B, S, S, 3)
        x = _crop_resize_roi_align(batch, boxes, flip, out_size)
        x = x.mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return _crop_resize_cpu(images, boxes, flip, out_size, rows=rows, norm=(scale, shift),
                            channels_last=channels_last, threads=torch.get_num_threads())


def _crop_resize_roi_align(images, boxes, flip, out_size):
    """One roi_align call for the whole batch (the accelerator path): float (B, 3, out, out), 0..255.

    The flip is applied to the uint8 input, with the box mirrored to match, rather than to the
    four-times-larger float output.
    """
    b, s = images.shape[0], images.shape[1]
    if flip is not None and bool(flip.any()):
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(2), images)
        boxes = flip_boxes(boxes, s, flip)
    x = images.permute(0, 3, 1, 2).float().contiguous()  # (B, 3, S, S)
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes], dim=1).to(images.device)
    return roi_align(x, rois, output_size=(out_size, out_size), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)


def _crop_resize_cpu(images, boxes, flip, out_size, *, rows=None, norm=None, channels_last=False, threads=1):
    """Crop + resize + flip (+ normalise) on the CPU, written as float (B, 3, out, out): 0..255, or
    `x * scale + shift` when `norm` = (scale, shift) (3,) is given.

    Per sample, the uint8 antialiased kernel that torchvision's Resize runs on uint8 tensors (equal to
    PIL's), reading each channels-last crop in place, then converted and normalised while in cache.
    The samples are split into `threads` contiguous chunks, the first on the calling thread and the
    others on worker threads; every sample is written by the same code whoever runs it, so the batch
    does not depend on the thread count. The channels-last batch is the cheaper one to write: a plain
    copy per sample rather than a transposing one.
    """
    b = len(boxes)
    rows = list(range(b)) if rows is None else rows
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(b, 3, out_size, out_size, memory_format=fmt)
    run = _torch_crop_resize(images, boxes, flip, out_size, rows, norm, channels_last, out)
    n = max(1, min(threads, b, os.cpu_count() or 1))
    ends = [b * c // n for c in range(n + 1)]
    with one_thread():  # also where the workers start (see _worker_one_thread)
        futures = [_workers().submit(run, ends[c], ends[c + 1]) for c in range(1, n)]
        try:
            run(ends[0], ends[1])
        finally:
            for fut in futures:  # wait for all (no worker still writing into `out`), then raise the first error
                fut.exception()
    for fut in futures:
        fut.result()
    return out


def _torch_crop_resize(images, boxes, flip, out_size, rows, norm, channels_last, out):
    """`run(lo, hi)` writing samples lo..hi-1 of `out` with torch's ops, one sample at a time."""
    b = len(boxes)
    chw = images.permute(0, 3, 1, 2)  # (N, 3, S, S) view, channels-last in memory
    if norm is not None and channels_last:
        # (B, out, out*3) view of the NHWC memory; scale/shift repeated along a row: RGBRGB...
        planes = out.permute(0, 2, 3, 1).reshape(b, out_size, out_size * 3)
        scale, shift = norm[0].repeat(out_size), norm[1].repeat(out_size)
    elif norm is not None:
        planes = out
        scale, shift = norm[0].view(3, 1, 1), norm[1].view(3, 1, 1)
    flips = flip.tolist() if flip is not None else [False] * b
    jobs = list(zip(boxes.long().tolist(), rows, flips))

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            (x0, y0, x1, y1), k, f = jobs[i]
            r = F.interpolate(chw[k:k + 1, :, y0:y1, x0:x1], size=(out_size, out_size),
                              mode="bilinear", antialias=True, align_corners=False)[0]  # uint8 (3, out, out)
            out[i].copy_(r.flip(2) if f else r)
            if norm is not None:
                planes[i].mul_(scale).add_(shift)

    return run


_POOL: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    """The process's augmentation worker threads (one fewer than the cores), started on first use."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="patchbench-augment",
                                   initializer=_worker_one_thread)
    return _POOL


def _worker_one_thread() -> None:
    """Pin a worker thread's own OpenMP team to one thread, for good.

    torch reads the process-wide setting into a thread's own OpenMP setting the first time the
    thread asks for it, and keeps that; `torch.get_num_threads()` makes that happen now, then
    `set_num_threads(1)` overrides it. Later changes by the caller (one_thread() restoring its count)
    leave this thread at 1. A worker starts inside the caller's one_thread() block, where the
    process-wide setting is already 1, so the caller sees nothing change."""
    torch.get_num_threads()
    torch.set_num_threads(1)


@contextmanager
def one_thread():
    """Run small CPU ops (the random draws, torch's crop path) on one thread. Each op would otherwise
    open an OpenMP parallel region, and on a busy machine (more runnable threads than cores) waiting
    for descheduled threads at every region costs far more than a second thread gains on ops this
    small (benchmarks/data_pipeline.py measures the loader)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
