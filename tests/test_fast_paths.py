"""The fast CPU paths compute the same function: the depthwise weight-gradient kernel against float64
references, and ConvMixer with the kernel against the plain model and timm's (outputs and gradients)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer

from patchbench import kernels
from patchbench.kernels import FastDepthwiseConv2d, depthwise_param_grads, use_fast_depthwise
from patchbench.models import create_model

pytestmark = pytest.mark.skipif(not kernels.fast_depthwise_available(7), reason="no C compiler here")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_weight_grad(x, g, k):
    return torch.nn.grad.conv2d_weight(x.double(), (x.shape[1], 1, k, k), g.double(), padding=k // 2,
                                       groups=x.shape[1])


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_matches_float64_fp32(k, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 32, 9, 11).contiguous(memory_format=fmt)  # H != W catches swapped axes
    g = torch.randn(3, 32, 9, 11)
    ours, bias = depthwise_param_grads(x, g, k)
    assert ours.shape == (32, 1, k, k) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_weight_grad(x, g, k), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_weight_grad_bf16_inputs_accumulate_in_fp32():
    x = torch.randn(4, 16, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 12, 12).bfloat16()
    ours, _ = depthwise_param_grads(x, g, 7)
    # exact up to fp32 summation: the bf16 values are converted, never rounded again
    torch.testing.assert_close(ours.double(), reference_weight_grad(x, g, 7), rtol=1e-5, atol=1e-4)


def test_weight_grad_is_usable_by_torch_library_checks():
    x = torch.randn(2, 16, 6, 6)
    g = torch.randn(2, 16, 6, 6)
    torch.library.opcheck(depthwise_param_grads, (x, g, 5), test_utils=("test_schema", "test_faketensor"))


def small_convmixer(**kw):
    return create_model("convmixer_256_8", dim=32, depth=2, kernel_size=5, img_size=16, **kw)


def grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_convmixer_is_the_same_function_fp32(channels_last):
    plain = small_convmixer()
    fast = small_convmixer()
    fast.load_state_dict(plain.state_dict())
    assert use_fast_depthwise(fast) == 2
    assert list(fast.state_dict()) == list(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 16, 16)
    plain, fast = plain.to(memory_format=fmt), fast.to(memory_format=fmt)
    out_p, grads_p = grads(plain, x.contiguous(memory_format=fmt))
    out_f, grads_f = grads(fast, x.contiguous(memory_format=fmt))
    torch.testing.assert_close(out_f, out_p)
    for gp, gf in zip(grads_p, grads_f):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-5)


def test_fast_convmixer_is_the_same_function_bf16_autocast():
    plain = small_convmixer().to(memory_format=torch.channels_last)
    fast = small_convmixer().to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    use_fast_depthwise(fast)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = grads(plain, x)
        out_f, grads_f = grads(fast, x)
    torch.testing.assert_close(out_f, out_p)
    for gp, gf in zip(grads_p, grads_f):
        assert gf.dtype == gp.dtype
        # the same bf16 operands; ours sums in fp32 before rounding, so differences are bf16 rounding
        torch.testing.assert_close(gf, gp, rtol=2e-2, atol=2e-2 * gp.abs().max().item())


def test_fast_convmixer_matches_timm_convmixer():
    ours = create_model("convmixer_256_8", dim=32, depth=2, kernel_size=7, patch_size=4, img_size=32)
    timm_model = TimmConvMixer(dim=32, depth=2, kernel_size=7, patch_size=4, num_classes=10)
    state = {k.replace("head.3.", "head."): v for k, v in ours.state_dict().items()}
    timm_model.load_state_dict(state)
    use_fast_depthwise(ours)
    x = torch.randn(4, 3, 32, 32)
    out_o, grads_o = grads(ours, x)
    out_t, grads_t = grads(timm_model, x)
    torch.testing.assert_close(out_o, out_t)
    for go, gt in zip(grads_o, grads_t):
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-5)


def test_seed_convmixer_gets_the_kernel_and_keeps_its_gradients():
    plain = create_model("seed_convmixer", dim=32, depth=1)
    fast = create_model("seed_convmixer", dim=32, depth=1)
    fast.load_state_dict(plain.state_dict())
    assert use_fast_depthwise(fast) == 1
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), fast.eval()  # dropout off
    for gp, gf in zip(grads(plain, x)[1], grads(fast, x)[1]):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-5)


def test_only_fitting_convs_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(32, 32, 7, padding=3, groups=32),  # fits
        nn.Conv2d(32, 32, 7, padding=3, groups=32, stride=2),  # strided
        nn.Conv2d(24, 24, 5, padding=2, groups=24),  # 24 channels: not whole vectors of 16
        nn.Conv2d(32, 32, 4, padding="same", groups=32),  # even kernel
        nn.Conv2d(32, 32, 3, padding=0, groups=32),  # not 'same'
        nn.Conv2d(32, 32, 1),  # pointwise
    )
    assert use_fast_depthwise(model) == 1
    assert isinstance(model[0], FastDepthwiseConv2d)
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * 5


@pytest.mark.parametrize("name", ["vit_tiny_6l8h", "resnet18", "resnet9", "seed_vit", "seed_resnet9"])
def test_vit_and_resnet_paths_are_untouched(name):
    model = create_model(name, img_size=32)
    before = [type(m) for m in model.modules()]
    assert use_fast_depthwise(model) == 0
    assert [type(m) for m in model.modules()] == before


def test_swapped_layer_shares_parameters_and_eval_is_plain():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    weight = model[0].weight
    use_fast_depthwise(model)
    assert model[0].weight is weight
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, weight, model[0].bias, padding=1, groups=16))


def test_without_a_compiler_nothing_is_swapped(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_LIBS", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    model = small_convmixer()
    with pytest.warns(UserWarning, match="could not build"):
        assert use_fast_depthwise(model) == 0
    assert not any(isinstance(m, FastDepthwiseConv2d) for m in model.modules())
