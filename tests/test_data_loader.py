"""Batched augmentation and the seeded, sharded Loader (no files: splits are made in memory)."""

import functools
import operator
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from patchbench.config import CIFAR10_MEAN, CIFAR10_STD, DataConfig
from patchbench.data import Loader, Split, augment
from patchbench.data.augment import (
    _crop_resize_cpu,
    _crop_resize_roi_align,
    center_crop_boxes,
    random_resized_crop_boxes,
)
from patchbench.errors import UserError
from patchbench.recipes import get_preset

S = 24
THREADS = torch.get_num_threads()


def make_split(n=50, size=S, seed=0) -> Split:
    """Random images; label i for image i, so labels identify images."""
    rng = np.random.default_rng(seed)
    return Split(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64))


def unnormalise(x, cfg):
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_an_extreme_ratio_falls_back_to_a_crop_at_least_one_pixel_wide():
    """ratio 0.01,0.01 never fits a 32px square in 10 attempts; the central fallback would be round(0.32) = 0
    pixels wide (torchvision's arithmetic), which cannot be resized: it is one pixel wide instead."""
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(8, 32, (0.35, 1.0), (0.01, 0.01), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(w, torch.ones(8)) and torch.equal(h, torch.full((8,), 32.0))
    tall = random_resized_crop_boxes(8, 32, (0.35, 1.0), (100.0, 100.0), g)
    assert torch.equal(tall[:, 3] - tall[:, 1], torch.ones(8))


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    size, scale, ratio = 160, (0.35, 1.0), (3 / 4, 4 / 3)
    boxes = random_resized_crop_boxes(4000, size, scale, ratio, g)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= size).all() and (y1 <= size).all()
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, as torchvision
    area = w * h / size**2
    # w and h are rounded to whole pixels: allow that much slack around the scale range
    slack = 2 / size
    assert area.min() >= scale[0] - slack and area.max() <= scale[1] + slack
    # the same distribution as torchvision's RandomResizedCrop (retries favour smaller crops)
    torch.manual_seed(0)
    ref = [T.RandomResizedCrop.get_params(torch.empty(3, size, size), list(scale), list(ratio))
           for _ in range(4000)]
    ref_area = torch.tensor([h * w / size**2 for _, _, h, w in ref])
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.015)
    assert area.std().item() == pytest.approx(ref_area.std().item(), abs=0.015)
    r = w / h
    assert r.min() >= ratio[0] * (1 - slack) - 0.02 and r.max() <= ratio[1] * (1 + slack) + 0.02
    # the study's transform: square crops, 80..99% of the area
    sq = random_resized_crop_boxes(2000, size, (0.8, 0.99), (1.0, 1.0), g)
    sw, sh = sq[:, 2] - sq[:, 0], sq[:, 3] - sq[:, 1]
    assert torch.equal(sw, sh)
    assert (sw * sh / size**2).min() >= 0.8 - slack and (sw * sh / size**2).max() <= 0.99 + slack


def test_crop_boxes_fall_back_to_centre_when_nothing_fits():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(10, 100, (0.9, 1.0), (3.0, 4.0), g)  # too wide for 100x100
    i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(3, 100, 100), [0.9, 1.0], [3.0, 4.0])
    assert (i, j, h, w) == (33, 0, 33, 100)  # torchvision's fallback, for the record
    assert torch.equal(boxes, torch.tensor([[j, i, j + w, i + h]], dtype=torch.float32).expand(10, 4))


def test_cpu_crop_is_torchvisions_uint8_resized_crop():
    images = torch.from_numpy(make_split(4).images[:4])
    boxes = torch.tensor([[0, 0, 24, 24], [3, 5, 17, 20], [10, 2, 24, 12], [1, 1, 9, 23]], dtype=torch.float32)
    out = _crop_resize_cpu(images, boxes, torch.tensor([False, True, False, True]), 32).to(torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(images[i].permute(2, 0, 1), y0, x0, y1 - y0, x1 - x0, [32, 32], antialias=True)
        if i in (1, 3):
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_roi_align_path_is_plain_bilinear_when_enlarging_and_agrees_with_cpu_path():
    images = torch.from_numpy(make_split(6).images[:6])
    full = torch.tensor([[0, 0, S, S]], dtype=torch.float32).expand(6, 4)
    x = _crop_resize_roi_align(images, full, None, 40)
    ref = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(40, 40), mode="bilinear",
                        align_corners=False, antialias=False)
    assert torch.allclose(x, ref, atol=1e-3)
    flip = torch.tensor([True, False, True, False, True, False])
    boxes = random_resized_crop_boxes(6, S, (0.3, 0.9), (0.75, 1.33), torch.Generator().manual_seed(1))
    a = _crop_resize_roi_align(images, boxes, flip, 40)
    b = _crop_resize_cpu(images, boxes, flip, 40)
    # the CPU kernel is PIL's fixed-point uint8 one (< 1 level from float) and clamps at the crop
    # edges, where roi_align reads the pixels just outside (up to 2 output pixels at 3x enlargement)
    assert (a - b)[:, :, 2:-2, 2:-2].abs().max() <= 1.0 + 1e-4


def test_eval_transform_is_deterministic_and_exact_at_full_size():
    split = make_split(10)
    cfg = DataConfig(img_size=S, eval_crop=1.0)
    loader = Loader(split, cfg, batch_size=4, train=False, device="cpu", seed=0)
    first = [x for x, _ in loader]
    loader.set_epoch(5)
    second = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    x = torch.cat(first)
    assert x.dtype == torch.float32 and x.shape == (10, 3, S, S) and x.is_contiguous()
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float()
    assert torch.allclose(unnormalise(x, cfg), images, atol=1e-3)  # eval_crop=1, same size: identity


def test_eval_centre_crop_box():
    assert center_crop_boxes(2, 160, 0.946).tolist() == [[4.0, 4.0, 155.0, 155.0]] * 2
    with pytest.raises(UserError, match="eval_crop"):
        center_crop_boxes(1, 160, 0.0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_val_image_seen_exactly_once(world_size):
    split = make_split(50)
    seen = []
    for rank in range(world_size):
        loader = Loader(split, DataConfig(img_size=16), batch_size=8, train=False, device="cpu",
                        seed=0, rank=rank, world_size=world_size)
        ys = [y for _, y in loader]
        assert len(ys) == len(loader)
        seen += torch.cat(ys).tolist()
    assert sorted(seen) == list(range(50))


def test_train_drops_last_partial_batch_and_shards_are_disjoint():
    split = make_split(50)
    cfg = DataConfig(img_size=16)
    per_rank = []
    for rank in range(3):
        loader = Loader(split, cfg, batch_size=4, train=True, device="cpu", seed=7, rank=rank, world_size=3)
        assert len(loader) == 50 // 12 == 4
        ys = [y for _, y in loader]
        assert len(ys) == 4 and all(len(y) == 4 for y in ys)
        per_rank.append(torch.cat(ys).tolist())
    everything = functools.reduce(operator.iadd, per_rank, [])
    assert len(set(everything)) == 48  # disjoint, and 48 of 50 used (2 dropped)
    # the same permutation as one rank with the global batch
    single = Loader(split, cfg, batch_size=12, train=True, device="cpu", seed=7)
    assert sorted(torch.cat([y for _, y in single]).tolist()) == sorted(everything)


def test_ranks_reproduce_the_single_process_batches_pixel_for_pixel():
    split = make_split(40)
    cfg = DataConfig(img_size=20, scale=(0.3, 1.0))
    single = list(Loader(split, cfg, batch_size=8, train=True, device="cpu", seed=3))
    ranks = [list(Loader(split, cfg, batch_size=4, train=True, device="cpu", seed=3, rank=r, world_size=2))
             for r in range(2)]
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)


def test_randomness_depends_only_on_seed_and_epoch():
    split = make_split(40)
    cfg = DataConfig(img_size=16)
    a = Loader(split, cfg, batch_size=8, train=True, device="cpu", seed=1)
    for epoch in range(3):  # run some epochs first: must not matter
        a.set_epoch(epoch)
        list(a)
    a.set_epoch(3)
    b = Loader(split, cfg, batch_size=8, train=True, device="cpu", seed=1)
    b.set_epoch(3)  # a fresh loader resumed at epoch 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(4)
    assert not torch.equal(next(iter(b))[1], next(iter(a))[1])  # another epoch, another order
    c = Loader(split, cfg, batch_size=8, train=True, device="cpu", seed=2)
    c.set_epoch(3)
    assert not torch.equal(next(iter(c))[1], next(iter(a))[1])  # another seed, another order


def test_flips_are_about_half_and_are_mirror_images():
    n = 400
    ramp = np.broadcast_to(np.arange(S, dtype=np.uint8)[None, :, None] * 10, (S, S, 3))
    split = Split(images=np.ascontiguousarray(np.broadcast_to(ramp, (n, S, S, 3))),
                  labels=np.zeros(n, dtype=np.int64))
    cfg = DataConfig(img_size=S, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)  # crop = whole image
    x = torch.cat([x for x, _ in Loader(split, cfg, batch_size=50, train=True, device="cpu", seed=0)])
    pixels = unnormalise(x, cfg).round()
    plain = torch.from_numpy(ramp.copy()).permute(2, 0, 1).float()
    is_plain = (pixels == plain).flatten(1).all(1)
    is_flipped = (pixels == plain.flip(2)).flatten(1).all(1)
    assert torch.all(is_plain ^ is_flipped)
    assert 0.42 < is_flipped.float().mean().item() < 0.58
    cfg_off = DataConfig(img_size=S, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    x = torch.cat([x for x, _ in Loader(split, cfg_off, batch_size=50, train=True, device="cpu", seed=0)])
    assert (unnormalise(x, cfg_off).round() == plain).all()


def test_seed_preset_transform_works():
    cfg = get_preset("notebook").data_config
    split = make_split(40, size=cfg.prepare_size // 4)  # a 40px stand-in for the 160px cache
    train = Loader(split, cfg, batch_size=16, train=True, device="cpu", seed=0)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64 and len(train) == 2
    val = Loader(split, cfg, batch_size=16, train=False, device="cpu", seed=0)
    assert len(val) == 3 and sum(len(y) for _, y in val) == 40  # the study dropped 5; we keep all
    grey = Split(images=np.full((16, 40, 40, 3), 128, np.uint8), labels=np.zeros(16, dtype=np.int64))
    x, _ = next(iter(Loader(grey, cfg, batch_size=16, train=True, device="cpu", seed=0)))
    expected = (128 / 255 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(x.mean((0, 2, 3)), expected, atol=1e-5)


def test_bad_arguments_are_user_errors():
    split = make_split(10)
    with pytest.raises(UserError, match="fewer than one global batch"):
        Loader(split, DataConfig(), batch_size=8, train=True, device="cpu", seed=0, world_size=2)
    with pytest.raises(UserError, match="scale"):
        Loader(split, DataConfig(scale=(0.9, 0.2)), batch_size=2, train=True, device="cpu", seed=0)
    with pytest.raises(UserError, match="ratio"):
        Loader(split, DataConfig(ratio=(0.0, 1.0)), batch_size=2, train=True, device="cpu", seed=0)
    with pytest.raises(UserError, match="rank"):
        Loader(split, DataConfig(), batch_size=2, train=False, device="cpu", seed=0, rank=2, world_size=2)


def test_cpu_crop_is_bit_identical_over_threads_and_layouts():
    split = make_split(30)
    images = torch.from_numpy(split.images)
    g = torch.Generator().manual_seed(4)
    boxes = random_resized_crop_boxes(12, S, (0.2, 1.0), (0.75, 1.33), g)
    flip = torch.rand(12, generator=g) < 0.5
    rows = [29, 3, 3, 17, 0, 8, 21, 5, 12, 26, 9, 1]  # crops read from these images, no gather
    norm = (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([-1.0, 0.5, 2.0]))
    ref = _crop_resize_cpu(images[rows], boxes, flip, 20)
    ref = ref * norm[0].view(1, 3, 1, 1) + norm[1].view(1, 3, 1, 1)
    first = None
    for threads in (1, 2, 3):
        for channels_last in (False, True):
            x = _crop_resize_cpu(images, boxes, flip, 20, rows=rows, norm=norm, channels_last=channels_last,
                                 threads=threads)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.shape == (12, 3, 20, 20) and x.is_contiguous(memory_format=fmt)
            assert torch.allclose(x, ref, rtol=0, atol=1e-5)
            first = x if first is None else first
            assert torch.equal(x, first), (threads, channels_last)


def test_loader_channels_last_gives_the_same_batches_in_nhwc_memory():
    split = make_split(40)
    cfg = DataConfig(img_size=20, scale=(0.3, 1.0))
    for train in (True, False):
        plain = list(Loader(split, cfg, batch_size=8, train=train, device="cpu", seed=5))
        nhwc = list(Loader(split, cfg, batch_size=8, train=train, device="cpu", seed=5, channels_last=True))
        assert len(plain) == len(nhwc)
        for (xa, ya), (xb, yb) in zip(plain, nhwc):
            assert xb.is_contiguous(memory_format=torch.channels_last) and xb.shape == xa.shape
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("bad", [0, 11])  # a sample in the calling thread's chunk, one in a worker's
def test_an_error_in_any_chunk_reaches_the_caller_and_the_workers_stay_usable(bad):
    images = torch.from_numpy(make_split(12).images)
    boxes = torch.tensor([[0, 0, S, S]], dtype=torch.float32).repeat(12, 1)
    boxes[bad] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # zero width: interpolate refuses it
    with pytest.raises(RuntimeError):  # torch's ops: the error comes from a chunk, on its thread
        _crop_resize_cpu(images, boxes, None, 8, threads=2)
    boxes[bad] = torch.tensor([0.0, 0.0, S, S])
    x = _crop_resize_cpu(images, boxes, None, 8, threads=2)
    assert torch.equal(x, _crop_resize_cpu(images, boxes, None, 8, threads=1))


def test_loader_leaves_the_callers_torch_thread_count_alone_and_workers_on_one_thread():
    torch.set_num_threads(2)
    try:
        list(Loader(make_split(40), DataConfig(img_size=16), batch_size=8, train=True, device="cpu", seed=0))
        assert torch.get_num_threads() == 2
        if (os.cpu_count() or 1) > 1:  # the split ran on a worker thread: no OpenMP team of its own
            assert augment._workers().submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(THREADS)


IN_HEAP = """
import ctypes, numpy as np
from patchbench.config import DataConfig
from patchbench.data import Loader, Split
from patchbench.cpu.memory import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
split = Split(images=np.zeros((100, 32, 32, 3), dtype=np.uint8), labels=np.zeros(100, dtype=np.int64))
# a 30 MB batch (100 x 3 x 160 x 160 float32 = 30.7 MB): from the heap (below the program break),
# where a freed one is reused, or a fresh mmap that is page-faulted and zeroed again every time
x, _ = next(iter(Loader(split, DataConfig(img_size=160), batch_size=100, train=False, device="cpu")))
print(keep_freed_memory(), x.data_ptr() < libc.sbrk(0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc")
def test_cpu_batches_come_from_the_heap_where_freed_memory_is_reused():
    def run(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PATCHBENCH_MALLOC"))}
        done = subprocess.run([sys.executable, "-c", IN_HEAP], env={**base, **env}, capture_output=True,
                              text=True, check=True)
        return done.stdout.split()

    assert run() == ["True", "True"]
    assert run(PATCHBENCH_MALLOC="default") == ["False", "False"]  # glibc's default: a fresh mmap


def test_malloc_is_left_alone_when_the_user_tunes_it(monkeypatch):
    from patchbench.cpu.memory import keep_freed_memory

    for name, value in (("MALLOC_TOP_PAD_", "0"), ("PATCHBENCH_MALLOC", "default")):
        keep_freed_memory.cache_clear()
        monkeypatch.setenv(name, value)
        assert keep_freed_memory() is False, name
        monkeypatch.delenv(name)
    keep_freed_memory.cache_clear()


# --------------------------------------------------------------------------------------------------
# The accelerator path (split held on the device, gather + roi_align), run on the CPU


def test_loader_held_on_device_path_runs_on_the_cpu_and_matches_the_cpu_path():
    """hold_on_device=True takes the GPU code path (one gather of the held split, one roi_align) with CPU
    tensors. Evaluation at the cached size is the identity on both paths; training crops that are
    enlarged agree within one grey level away from the crop's border (see augment.py)."""
    split = make_split(40)
    cfg = DataConfig(img_size=S, eval_crop=1.0, scale=(0.3, 0.9))
    for train in (False, True):
        cpu = Loader(split, cfg, batch_size=8, train=train, seed=2, hold_on_device=False)
        held = Loader(split, cfg, batch_size=8, train=train, seed=2, hold_on_device=True)
        for (xa, ya), (xb, yb) in zip(cpu, held):
            assert torch.equal(ya, yb)
            a, b = unnormalise(xa, cfg), unnormalise(xb, cfg)
            if train:
                assert (a - b)[:, :, 2:-2, 2:-2].abs().max() <= 1.0 + 1e-3
            else:
                assert torch.allclose(a, b, atol=1e-3)
        assert held._images is not None and held._images.device.type == "cpu"  # the split was held


def test_held_split_follows_a_holdout_subset_row_for_row():
    from patchbench.data import holdout_split

    split = make_split(40)
    split.labels = split.labels % 4  # four classes of ten
    _, held_out = holdout_split(split, 0.25, seed=0)
    assert len(held_out) == 8  # round(0.25 * 10) = 2 per class
    cfg = DataConfig(img_size=S, eval_crop=1.0)
    xa = torch.cat([x for x, _ in Loader(held_out, cfg, batch_size=8, train=False, hold_on_device=False)])
    xb = torch.cat([x for x, _ in Loader(held_out, cfg, batch_size=8, train=False, hold_on_device=True)])
    assert torch.allclose(xa, xb, atol=1e-5)
    images = torch.from_numpy(split.images[held_out.rows]).permute(0, 3, 1, 2).float()
    assert torch.allclose(unnormalise(xa, cfg), images, atol=1e-3)  # the right rows, in order
