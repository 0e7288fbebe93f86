"""`Loader`: seeded batches from a prepared split, augmented on the device, sharded for DDP.

Every random choice is a pure function of (seed, epoch, batch index): the permutation of an epoch
comes from a generator seeded with (seed, epoch), the crops and flips of global batch b from one
seeded with (seed, epoch, b). So a run resumed at an epoch boundary sees exactly the batches it
would have seen, and the batches do not depend on how the work is split over ranks.

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
from patchbench.data.augment import (center_crop_boxes, check_crop_args, crop_resize_normalize,
                                     one_thread, random_resized_crop_boxes)
from patchbench.data.cache import Split
from patchbench.data.memory import reuse_freed_batches
from patchbench.errors import UserError

_PERMUTATION, _AUGMENT = 0, 1  # independent random streams


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed mixes all of `key` (SeedSequence: no collisions like seed+epoch)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class Loader:
    """Iterate (x, y) batches of one split: x float32 (B, 3, img_size, img_size) normalised, y int64 (B,),
    both on `device`. `batch_size` is per rank. `channels_last`: x in NHWC memory (same shape and
    values), what a channels_last model wants; on the CPU it is also the cheaper layout to write.
    On the CPU, iterating sets glibc's malloc thresholds once per process (`data/memory.py`)."""

    def __init__(self, split: Split, cfg: DataConfig, *, batch_size: int, train: bool, device="cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False):
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
        self.epoch = 0
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
        self._images = None  # the whole split on the device, when it is a GPU with room for it
        self._labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _held_on_device(self) -> torch.Tensor | None:
        """On CUDA, copy the uint8 split to the GPU once (airbench's trick) if it takes < 1/4 of free memory."""
        if self.device.type != "cuda":
            return None
        if self._images is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.split.images.nbytes < free // 4:
                self._images = torch.from_numpy(np.ascontiguousarray(self.split.images)).to(self.device)
        return self._images

    def _source(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """uint8 images (N, S, S, 3) on the device to crop from, and the rows of `idx` in them.

        On the CPU that is the memory-mapped split itself (read, never written), so only the crop
        regions are read; on a GPU the split held there, else this batch copied over."""
        if self.device.type == "cpu":
            with warnings.catch_warnings():  # a read-only memmap: torch warns that writes would fail
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(self.split.images), idx.tolist()
        held = self._held_on_device()
        if held is not None:
            return held, idx.tolist()
        return torch.from_numpy(self.split.images[idx.numpy()]).to(self.device), None

    def _permutation(self) -> torch.Tensor | None:
        if not self.train:
            return None
        return torch.randperm(len(self.split), generator=seeded_generator(self.seed, self.epoch, _PERMUTATION))

    def _indices(self, b: int, perm: torch.Tensor | None) -> torch.Tensor:
        """Dataset indices (int64, CPU) of this rank's batch b, given the epoch's permutation."""
        B, W, r = self.batch_size, self.world_size, self.rank
        if perm is not None:
            return perm[(b * W + r) * B:(b * W + r + 1) * B]
        lo, hi = self._eval_range
        return torch.arange(lo + b * B, min(lo + (b + 1) * B, hi))

    def __iter__(self):
        cfg, B, W, r = self.cfg, self.batch_size, self.world_size, self.rank
        if self.device.type == "cpu":
            reuse_freed_batches()  # else each batch is fresh, page-faulted memory (see data/memory.py)
        perm = self._permutation()
        for b in range(self.num_batches):
            idx = self._indices(b, perm)
            with one_thread():
                if self.train:
                    g = seeded_generator(self.seed, self.epoch, _AUGMENT, b)
                    # drawn for the whole global batch, this rank keeps its part
                    boxes = random_resized_crop_boxes(B * W, self.size, cfg.scale, cfg.ratio, g)[r * B:(r + 1) * B]
                    flip = (torch.rand(B * W, generator=g) < 0.5)[r * B:(r + 1) * B] if cfg.hflip else None
                else:
                    boxes = center_crop_boxes(len(idx), self.size, cfg.eval_crop)
                    flip = None
            images, rows = self._source(idx)
            x = crop_resize_normalize(images, boxes, flip, cfg.img_size, cfg.mean, cfg.std, rows=rows,
                                      channels_last=self.channels_last)
            yield x, self._labels[idx].to(self.device)
