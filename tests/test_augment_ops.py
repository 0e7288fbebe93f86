"""The batched augmentations against torchvision's own per-sample ops, for the same parameters.

Tolerances: the colour ops compute torchvision's formulas on the same float32 values, so they agree
to 1e-6 (rounding of a different order of operations); the affine ops build torchvision's grid per
sample and sample it nearest-neighbour, equalize and autocontrast call torchvision's batched kernels:
those agree exactly. Mixup, cutmix and erasing are compared with torchvision's transforms given the
parameters we drew.
"""

import math

import numpy as np
import pytest
import torch
from timm.layers import drop_path as timm_drop_path
from timm.layers import resample_abs_pos_embed
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from patchbench.config import DataConfig
from patchbench.data import Loader, Split, autoaugment, holdout_split, mix
from patchbench.data.loader import seeded_generator
from patchbench.models import create_model
from patchbench.models.layers import DropPath

SIZE = 32


def images(n=8, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5  # a flat image (autocontrast's and equalize's edge case)
    x[1, :, :, : size // 2] = 1.0  # saturated pixels
    return x


def torchvision_op(policy: str, name: str, img: torch.Tensor, magnitude: float) -> torch.Tensor:
    t = v2.TrivialAugmentWide() if policy == "trivialaugment" else v2.RandAugment()
    return t._apply_image_or_video_transform(img, name, magnitude, interpolation=t.interpolation, fill=t._fill)


def magnitudes_for(policy: str, name: str, n: int) -> torch.Tensor:
    fn, signed = autoaugment.POLICIES[policy][name]
    if fn is None:
        return torch.zeros(n, dtype=torch.float64)
    table = fn(autoaugment.NUM_BINS, SIZE, SIZE).double()
    bins = torch.linspace(0, autoaugment.NUM_BINS - 1, n).round().long()  # the whole range, both ends
    mags = table[bins]
    if signed:
        mags[1::2] *= -1
    return mags


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("name", list(autoaugment.OPS))
def test_each_op_equals_torchvisions_per_sample_op(policy, name):
    x = images()
    mags = magnitudes_for(policy, name, len(x))
    ops = torch.full((len(x), 1), list(autoaugment.POLICIES[policy]).index(name))
    ours = autoaugment.apply_ops(x.clone(), policy, ops, mags.view(-1, 1))
    for i in range(len(x)):
        expected = torchvision_op(policy, name, x[i], float(mags[i]))
        assert torch.allclose(ours[i], expected, atol=1e-6, rtol=0), (name, float(mags[i]))


def test_quarter_turns_and_odd_angles_rotate_like_torchvision():
    x = images(6)
    mags = torch.tensor([90.0, -90.0, 180.0, 4.5, -135.0, 0.0], dtype=torch.float64)
    ours = autoaugment.rotate(x.clone(), mags)
    for i in range(len(x)):
        assert torch.equal(ours[i], torchvision_op("trivialaugment", "Rotate", x[i], float(mags[i])))


def test_draws_follow_torchvisions_spaces():
    g = torch.Generator().manual_seed(0)
    ops, mags = autoaugment.draw_ops("trivialaugment", 20_000, SIZE, g)
    assert ops.shape == (20_000, 1)
    counts = torch.bincount(ops.flatten(), minlength=14).double() / 20_000
    assert torch.allclose(counts, torch.full((14,), 1 / 14, dtype=torch.float64), atol=0.01)  # uniform ops
    names = list(autoaugment.TRIVIAL_WIDE)
    rotate = mags[ops == names.index("Rotate")]
    assert rotate.abs().max() <= 135 and (rotate < 0).float().mean() == pytest.approx(0.5, abs=0.05)
    assert set(mags[ops == names.index("Posterize")].tolist()) <= set(range(2, 9))
    assert (mags[ops == names.index("Equalize")] == 0).all()
    ops, mags = autoaugment.draw_ops("randaugment", 5_000, SIZE, g, num_ops=2, magnitude=9)
    assert ops.shape == (5_000, 2)
    shear = mags[ops == list(autoaugment.RAND_AUGMENT).index("ShearX")].abs()
    assert torch.allclose(shear, torch.full_like(shear, 0.3 * 9 / 30))  # bin 9 of 31 over [0, 0.3]


def test_random_erasing_equals_torchvisions_erase_for_the_drawn_boxes():
    x = images(64)
    boxes = autoaugment.draw_erasing(64, SIZE, SIZE, 0.5, torch.Generator().manual_seed(1))
    erased = boxes[:, 2] > 0
    assert 0.3 < erased.float().mean() < 0.7  # p = 0.5 (and nearly every draw fits)
    area = (boxes[erased, 2] * boxes[erased, 3]).double() / SIZE ** 2
    assert area.min() >= 0.02 * 0.9 and area.max() <= 0.33 * 1.1
    ours = autoaugment.erase(x.clone(), boxes)
    for i in range(64):
        i0, j0, h, w = boxes[i].tolist()
        expected = TF.erase(x[i], i0, j0, h, w, torch.zeros(3, 1, 1)) if h else x[i]
        assert torch.equal(ours[i], expected)


def test_mixup_and_cutmix_equal_torchvisions_transforms():
    x, y = images(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    lam = 0.3
    tv_mixup = v2.MixUp(alpha=1.0, num_classes=4)
    params = {"lam": lam, "labels": y, "batch_size": 8}
    assert torch.allclose(mix.mixup(x.clone(), lam), tv_mixup.transform(x, params), atol=1e-7)
    assert torch.allclose(mix.mix_targets(y, 4, lam), tv_mixup._mixup_label(y, lam=lam))
    box, lam_adjusted = mix.cutmix_box(SIZE, SIZE, 0.6, torch.Generator().manual_seed(3))
    tv_cutmix = v2.CutMix(alpha=1.0, num_classes=4)
    expected = tv_cutmix.transform(x, {"box": box, "labels": y, "batch_size": 8, "lam_adjusted": lam_adjusted})
    assert torch.equal(mix.cutmix(x.clone(), box), expected)
    x1, y1, x2, y2 = box
    assert lam_adjusted == pytest.approx(1 - (x2 - x1) * (y2 - y1) / SIZE ** 2)


def test_batch_mixer_is_seeded_and_keeps_the_labels_sum():
    cfg = DataConfig(mixup=0.5, cutmix=1.0)
    mixer = mix.MixupCutmix(cfg, num_classes=4, smoothing=0.1, seed=7)
    y = torch.tensor([0, 1, 2, 3])
    a, b = images(4), images(4)
    ta, tb = mixer(a, y, epoch=2, batch=5), mixer(b, y, epoch=2, batch=5)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # a function of (seed, epoch, batch)
    assert torch.allclose(ta.sum(1), torch.ones(4)) and (ta >= 0.1 / 4 - 1e-7).all()  # smoothed, then mixed
    lams = [mix._beta(0.5, seeded_generator(i)) for i in range(2000)]
    assert np.mean(lams) == pytest.approx(0.5, abs=0.03) and np.var(lams) == pytest.approx(1 / 8, abs=0.02)


def make_split(n=40, size=40, classes=4):
    rng = np.random.default_rng(0)
    return Split(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % classes)


def test_loader_with_ops_and_erasing_is_a_function_of_seed_epoch_batch():
    cfg = DataConfig(img_size=32, auto_augment="randaugment", random_erasing=0.5)
    split = make_split()
    full = Loader(split, cfg, batch_size=8, train=True, seed=3)
    full.set_epoch(1)
    batches = [x for x, _ in full]
    later = Loader(split, cfg, batch_size=8, train=True, seed=3)
    later.set_epoch(1, start_batch=2)
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], [x for x, _ in later]))
    two_ranks = [Loader(split, cfg, batch_size=4, train=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in two_ranks:
        loader.set_epoch(1)
    for b, (r0, r1) in enumerate(zip(*two_ranks)):  # 2 ranks x 4 reproduce 1 rank x 8, augmented too
        assert torch.equal(torch.cat([r0[0], r1[0]]), batches[b])
    other = Loader(split, cfg, batch_size=8, train=True, seed=4)
    other.set_epoch(1)
    assert not torch.equal(next(iter(other))[0], batches[0])


def test_loader_trains_at_the_epochs_size_and_evaluates_at_img_size():
    cfg = DataConfig(img_size=32, train_sizes=(16, 32))
    split = make_split()
    train = Loader(split, cfg, batch_size=8, train=True)
    train.set_epoch(0, img_size=16)
    assert next(iter(train))[0].shape == (8, 3, 16, 16)
    assert next(iter(Loader(split, cfg, batch_size=8, train=False)))[0].shape == (8, 3, 32, 32)


def test_train_size_schedule_splits_the_epochs_evenly():
    from patchbench.config import RunConfig, TrainConfig

    cfg = RunConfig(data=DataConfig(img_size=160, train_sizes=(96, 128, 160)), train=TrainConfig(epochs=9))
    assert [cfg.train_size(e) for e in range(9)] == [96] * 3 + [128] * 3 + [160] * 3
    assert RunConfig(data=DataConfig(img_size=64)).train_size(5) == 64


def test_holdout_is_stratified_seeded_and_disjoint():
    split = make_split(200, classes=4)
    rest, held = holdout_split(split, 0.1, seed=0)
    assert len(held) == 20 and len(rest) == 180
    assert np.bincount(held.labels).tolist() == [5, 5, 5, 5]  # class-stratified
    assert set(held.rows.tolist()).isdisjoint(rest.rows.tolist())
    assert sorted([*held.rows.tolist(), *rest.rows.tolist()]) == list(range(200))
    assert np.array_equal(held.rows, holdout_split(split, 0.1, seed=0)[1].rows)  # the same for every training seed
    assert not np.array_equal(held.rows, holdout_split(split, 0.1, seed=1)[1].rows)
    _x, y = next(iter(Loader(held, DataConfig(img_size=40, eval_crop=1.0), batch_size=20, train=False)))
    assert torch.equal(y, torch.from_numpy(split.labels[held.rows]))  # each sample keeps its own label


def test_drop_path_draws_as_timm():
    x = torch.randn(16, 8, 4, 4)
    torch.manual_seed(0)
    ours = DropPath(0.3).train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, timm_drop_path(x, 0.3, training=True))
    assert torch.equal(DropPath(0.3).eval()(x), x)


def test_vit_position_embedding_is_resampled_as_timm():
    vit = create_model("vit_tiny_6l8h", dim=32, num_heads=2, depth=1, mlp_dim=64, patch_size=16, img_size=160,
                       dynamic_img_size=True)
    torch.nn.init.normal_(vit.pos_embed)
    assert torch.equal(vit.pos_embed_for(6), resample_abs_pos_embed(vit.pos_embed, [6, 6], num_prefix_tokens=1))
    assert vit.pos_embed_for(10) is vit.pos_embed  # the built size: unchanged
    assert vit(torch.randn(2, 3, 96, 96)).shape == (2, 10)
    fixed = create_model("vit_tiny_6l8h", dim=32, num_heads=2, depth=1, mlp_dim=64)
    with pytest.raises(ValueError, match="create it with img_size=96"):
        fixed(torch.randn(2, 3, 96, 96))


def test_drop_path_rates_rise_linearly_over_the_blocks():
    cm = create_model("convmixer_256_8", dim=32, depth=5, drop_path=0.2)
    rates = [b[0].drop_path.p if hasattr(b[0].drop_path, "p") else 0.0 for b in cm.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert math.isclose(create_model("vit_tiny_6l8h", drop_path=0.1).blocks[-1].drop_path.p, 0.1)
