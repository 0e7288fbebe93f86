"""`Loader`: seeded batches from a prepared split, augmented on the device, sharded for DDP.

Every random choice is a pure function of (seed, epoch, batch index): the permutation of an epoch
comes from a generator seeded with (seed, epoch), the crops and flips of global batch b from one
seeded with (seed, epoch, b), and the per-sample ops (TrivialAugmentWide / RandAugment) and random
erasing from streams of their own (data/autoaugment.py). So a run resumed at any batch
(`set_epoch(epoch, start_batch=b)`) sees exactly the batches it would have seen, and the batches do
not depend on how the work is split over ranks.

Training (train=True): each rank takes the same permutation; global batch b is the slice
perm[b*B*W : (b+1)*B*W] (B = batch_size per rank, W = world_size), and rank r takes the r-th
B-sized part of it, with the crop boxes and flips drawn for the whole global batch. So ranks are
disjoint, every rank has N // (B*W) batches (the last partial global batch is dropped), and
W ranks × B reproduce one rank × W*B sample for sample.

Evaluation (train=False): no shuffling, the deterministic centre crop; rank r takes the contiguous
r-th of W near-equal parts of the split and every image is seen exactly once over all ranks. Ranks
can differ by one batch, so reduce evaluation sums once after the loop, not per batch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from patchbench.config import DataConfig
from patchbench.cpu.memory import keep_freed_memory
from patchbench.data import autoaugment
from patchbench.data.augment import (
    center_crop_boxes,
    check_crop_args,
    crop_resize_normalize,
    normalize_,
    one_thread,
    random_resized_crop_boxes,
)
from patchbench.data.cache import Split
from patchbench.errors import UserError

_PERMUTATION, _AUGMENT, _AUTOAUG, _ERASE = 0, 1, 3, 4  # independent random streams (2 is mixing's: data/mix.py)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed mixes all of `key` (SeedSequence: no collisions like seed+epoch)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class Loader:
    """Iterate (x, y) batches of one split: x float32 (B, 3, size, size) normalised, y int64 (B,),
    both on `device`. `batch_size` is per rank. `channels_last`: x in NHWC memory (same shape and
    values), what a channels_last model wants; on the CPU it is also the cheaper layout to write.
    On the CPU, iterating applies patchbench's malloc policy (`cpu.memory.keep_freed_memory`) once per process.

    Two ways to make a batch, the same function within the documented tolerance (augment.py):
    - the CPU path: crops read straight from the memory-mapped split (torch's uint8 resize);
    - the accelerator path: the whole uint8 split held on the device, one gather and one
      `roi_align` per batch. It runs on GPUs when the split takes < 1/4 of free memory;
      `hold_on_device=True` forces it (on the CPU too: that is how it is tested without a GPU),
      `False` forbids it.
    """

    def __init__(self, split: Split, cfg: DataConfig, *, batch_size: int, train: bool, device="cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 hold_on_device: bool | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: need at least 1")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise UserError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if seed < 0:
            raise UserError(f"seed={seed}: need a non-negative integer")
        size = split.images.shape[1]
        if not 1 <= cfg.img_size:
            raise UserError(f"img_size={cfg.img_size}: need a positive number of pixels")
        check_crop_args(cfg.scale, cfg.ratio)
        if not 0 < cfg.eval_crop <= 1:
            raise UserError(f"eval_crop={cfg.eval_crop}: need a fraction of the image side in (0, 1]")
        self.split, self.cfg, self.size = split, cfg, size
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = bool(channels_last)
        self.device = torch.device(device)
        self.hold_on_device = hold_on_device
        self.epoch, self.img_size, self.start_batch = 0, cfg.img_size, 0
        n = len(split)
        if train:
            self.num_batches = n // (batch_size * world_size)
            if self.num_batches == 0:
                raise UserError(f"the training split has {n} images, fewer than one global batch of "
                                f"{batch_size} x {world_size} ranks; lower the batch size")
            self.num_samples = self.num_batches * batch_size
        else:
            lo, hi = rank * n // world_size, (rank + 1) * n // world_size
            self._eval_range = (lo, hi)
            self.num_samples = hi - lo
            self.num_batches = math.ceil(self.num_samples / batch_size)
        self._images = None  # the whole split on the device, when held there
        self._labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def set_epoch(self, epoch: int, *, img_size: int | None = None, start_batch: int = 0) -> None:
        """The epoch to iterate next, its image size (default the config's) and the batch to start at
        (a run resumed mid-epoch makes only the batches it has not trained on)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.num_batches}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.img_size = int(img_size or self.cfg.img_size)

    def __len__(self) -> int:
        return self.num_batches

    def _held_on_device(self) -> torch.Tensor | None:
        """The uint8 image array on the device (airbench's trick), copied once: on CUDA when it takes
        < 1/4 of free memory, wherever `hold_on_device` is True; None otherwise."""
        if self.hold_on_device is False or (self.hold_on_device is None and self.device.type != "cuda"):
            return None
        if self._images is None:
            fits = True
            if self.hold_on_device is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                fits = self.split.images.nbytes < free // 4
            if fits:
                self._images = torch.from_numpy(np.ascontiguousarray(self.split.images)).to(self.device)
        return self._images

    def crop_path(self) -> str:
        """Which implementation crops this loader's batches (they differ in rounding: recorded per run)."""
        if self._held_on_device() is not None or self.device.type != "cpu":
            return "gather + roi_align on the device (float)"
        return "torch's uint8 antialiased resize (rounded to uint8), then normalised"

    def _source(self, rows: np.ndarray) -> tuple[torch.Tensor, list[int] | None, bool]:
        """(uint8 images (N, S, S, 3) to crop from, the rows of this batch in them, accelerator path?).

        Held on the device: the held array and the rows (a gather, then roi_align). On the CPU: the
        memory-mapped split itself (read, never written), so only the crop regions are read. Else
        (a GPU without room): this batch's images copied over."""
        held = self._held_on_device()
        if held is not None:
            return held, rows.tolist(), True
        if self.device.type == "cpu":
            with warnings.catch_warnings():  # a read-only memmap: torch warns that writes would fail
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(self.split.images), rows.tolist(), False
        return torch.from_numpy(self.split.images[rows]).to(self.device), None, True

    def _permutation(self) -> torch.Tensor | None:
        if not self.train:
            return None
        return torch.randperm(len(self.split), generator=seeded_generator(self.seed, self.epoch, _PERMUTATION))

    def _indices(self, b: int, perm: torch.Tensor | None) -> torch.Tensor:
        """Sample indices (int64, CPU) of this rank's batch b, given the epoch's permutation."""
        B, W, r = self.batch_size, self.world_size, self.rank
        if perm is not None:
            return perm[(b * W + r) * B:(b * W + r + 1) * B]
        lo, hi = self._eval_range
        return torch.arange(lo + b * B, min(lo + (b + 1) * B, hi))

    def _draws(self, b: int, n: int) -> dict:
        """Every random choice of training batch b, drawn for the global batch; this rank keeps its part."""
        cfg, B, W, r = self.cfg, self.batch_size, self.world_size, self.rank
        part = slice(r * B, (r + 1) * B)
        g = seeded_generator(self.seed, self.epoch, _AUGMENT, b)
        d = {"boxes": random_resized_crop_boxes(B * W, self.size, cfg.scale, cfg.ratio, g)[part],
             "flip": (torch.rand(B * W, generator=g) < 0.5)[part] if cfg.hflip else None}
        if cfg.auto_augment != "none":
            ops, mags = autoaugment.draw_ops(cfg.auto_augment, B * W, self.img_size,
                                             seeded_generator(self.seed, self.epoch, _AUTOAUG, b),
                                             num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
            d["ops"], d["mags"] = ops[part], mags[part]
        if cfg.random_erasing > 0:
            d["erase"] = autoaugment.draw_erasing(B * W, self.img_size, self.img_size, cfg.random_erasing,
                                                  seeded_generator(self.seed, self.epoch, _ERASE, b))[part]
        return d

    def __iter__(self):
        cfg = self.cfg
        if self.device.type == "cpu":
            keep_freed_memory()  # else each batch is fresh, page-faulted memory
        perm = self._permutation()
        size = self.img_size if self.train else cfg.img_size
        for b in range(self.start_batch if self.train else 0, self.num_batches):
            idx = self._indices(b, perm)
            with one_thread():
                if self.train:
                    d = self._draws(b, len(idx))
                else:
                    d = {"boxes": center_crop_boxes(len(idx), self.size, cfg.eval_crop), "flip": None}
            images, rows, accelerator = self._source(self.split.row_of(idx.numpy()))
            ops = "ops" in d
            # with per-sample ops the crop stays in [0, 1] (torchvision's float range) until they ran
            mean, std = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) if ops else (cfg.mean, cfg.std)
            x = crop_resize_normalize(images, d["boxes"], d["flip"], size, mean, std, rows=rows,
                                      channels_last=self.channels_last, accelerator=accelerator)
            if ops:
                x = normalize_(autoaugment.apply_ops(x, cfg.auto_augment, d["ops"], d["mags"]), cfg.mean, cfg.std)
            if "erase" in d:
                x = autoaugment.erase(x, d["erase"])
            if self.channels_last and not x.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self._labels[idx].to(self.device)
