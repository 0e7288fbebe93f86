"""Parameter groups and schedules: checked against torch's own OneCycleLR and the ConvMixer shape."""

import pytest
import torch

from patchbench.config import TrainConfig
from patchbench.models import create_model
from patchbench.optim import (
    create_optimizer,
    lr_at,
    onecycle,
    param_groups,
    piecewise,
    total_steps,
)
from patchbench.recipes import get_preset


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_norms_biases_gains_and_tokens():
    vit = create_model("vit_tiny_6l8h", img_size=32, patch_size=8)
    decay, no_decay = (names_of(vit, g) for g in param_groups(vit, 0.05))
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.norm1.weight"} <= no_decay
    assert {"patch_embed.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= decay
    assert not decay & no_decay and len(decay | no_decay) == len(list(vit.parameters()))
    mixer = create_model("notebook_convmixer")
    decay, no_decay = (names_of(mixer, g) for g in param_groups(mixer, 0.05))
    gains = {n for n in no_decay if n.endswith(".gain")}
    assert len(gains) == 12 and all(n.endswith(("bias", "weight", "gain")) for n in no_decay)
    assert all(mixer.get_parameter(n).ndim == 4 or n == "head.3.weight" for n in decay)


def test_notebook_rule_decays_only_conv_and_linear_weights():
    vit = create_model("notebook_vit")
    decay = names_of(vit, param_groups(vit, 0.3)[0])
    nb_decay = names_of(vit, param_groups(vit, 0.3, conv_linear_only=True)[0])
    assert "blocks.0.attn.in_proj_weight" in decay - nb_decay  # nn.MultiheadAttention's packed projection
    assert "blocks.0.attn.out_proj.weight" in nb_decay  # a Linear subclass
    opt = create_optimizer(vit, get_preset("notebook").config_for("notebook_vit").train)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert names_of(vit, opt.param_groups[0]) == nb_decay


@pytest.mark.parametrize("total,pct", [(50, 0.3), (37, 0.25), (1000, 0.3)])
def test_onecycle_matches_torch(total, pct):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total, pct_start=pct)
    for step in range(total):
        lr, momentum = onecycle(step, total, 2e-3, pct)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        assert momentum == pytest.approx(opt.param_groups[0]["betas"][0], rel=1e-9)
        opt.step()
        sched.step()


def test_piecewise_is_the_convmixer_shape():
    total = 1000
    lrs = [piecewise(s, total, 0.01) for s in range(total)]
    assert lrs[399] == pytest.approx(0.01) and lrs[799] == pytest.approx(0.0005)
    assert lrs[-1] == pytest.approx(0.0) and max(lrs) == pytest.approx(0.01)
    assert lrs[199] == pytest.approx(0.005)


def test_seed_schedule_is_sized_for_100_epochs_and_never_anneals():
    t = get_preset("notebook").config_for("notebook_convmixer").train
    steps = 591  # 9,469 // 16
    total = total_steps(t, steps)
    assert total == 100 * steps and t.epochs == 30 and t.cycle_momentum
    last_lr, _ = lr_at(30 * steps - 1, total, t)
    assert last_lr > 0.99 * t.lr  # the run stops at the top of the warm-up
    t_fixed = TrainConfig(epochs=30, lr=1e-3)
    assert lr_at(total_steps(t_fixed, steps) - 1, total_steps(t_fixed, steps), t_fixed)[0] < 1e-7
    assert lr_at(5, 10, TrainConfig(schedule="constant", lr=0.1)) == (0.1, 0.9)
