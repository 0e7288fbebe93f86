"""The fast CPU paths compute the same function: the depthwise-gradient and fused GELU -> BatchNorm
kernels against float64 references, and ConvMixer with them against the plain model and timm's
(outputs, gradients and BatchNorm buffers)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from patchbench import kernels
from patchbench.device import cpu_features
from patchbench.kernels import (
    FastDepthwiseConv2d,
    GELUBatchNorm2d,
    depthwise_param_grads,
    use_fast_kernels,
)
from patchbench.models import create_model
from patchbench.models.layers import Residual

pytestmark = pytest.mark.skipif(not (kernels.fast_depthwise_available(7) and kernels.fast_gelu_bn_available()),
                                reason="no C compiler here")


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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gelu_batch_norm_matches_float64(dtype, tol):
    z = (2 * torch.randn(4, 32, 7, 5)).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(32) + 0.5, torch.randn(32)
    bn = GELUBatchNorm2d(32).train()
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    zz = z.clone().requires_grad_()
    out = bn(zz)
    dout = torch.randn_like(out)
    out.backward(dout)
    z64, w64, b64 = (t.detach().double().requires_grad_() for t in (z, weight, bias))
    ref = F.batch_norm(F.gelu(z64), None, None, w64, b64, training=True)
    ref.backward(dout.double())
    for ours, truth in [(out, ref), (zz.grad, z64.grad), (bn.weight.grad, w64.grad), (bn.bias.grad, b64.grad)]:
        assert ours.dtype in (dtype, torch.float32)
        torch.testing.assert_close(ours.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())
    # the running statistics move as BatchNorm2d's do: momentum 0.1 towards the batch mean / unbiased var
    y = F.gelu(z64.detach())
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * y.mean((0, 2, 3)), rtol=tol, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * y.var((0, 2, 3), unbiased=True), rtol=tol, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_gelu_batch_norm_falls_back_off_the_fast_path():
    bn = GELUBatchNorm2d(16)
    x = torch.randn(2, 16, 4, 4)  # NCHW: the plain ops
    torch.testing.assert_close(bn(x), F.batch_norm(F.gelu(x), None, None, bn.weight, bn.bias, training=True))
    bn.eval()  # eval mode, channels_last: the plain ops with the running statistics
    x = x.contiguous(memory_format=torch.channels_last)
    expected = F.batch_norm(F.gelu(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False)
    torch.testing.assert_close(bn(x), expected)


def small_convmixer(**kw):
    return create_model("convmixer_256_8", dim=32, depth=2, kernel_size=5, img_size=16, **kw)


def grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, [x.grad] + [p.grad for p in model.parameters()]


def assert_as_close_as_pytorchs_bf16(truth, plain, fast):
    """(output, gradients) of an fp32 run, PyTorch's bf16 run and ours: ours within 2x PyTorch's error."""
    def error(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()
    (out_t, grads_t), (out_p, grads_p), (out_f, grads_f) = truth, plain, fast
    assert error(out_f, out_t) < 2 * error(out_p, out_t) + 1e-3
    for gt, gp, gf in zip(grads_t, grads_p, grads_f):
        assert gf.dtype == gp.dtype
        assert error(gf, gt) < 2 * error(gp, gt) + 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_convmixer_is_the_same_function_fp32(channels_last):
    plain = small_convmixer()
    fast = small_convmixer()
    fast.load_state_dict(plain.state_dict())
    assert use_fast_kernels(fast) == 7  # 2 depthwise convs, 5 GELU -> BatchNorm pairs
    assert list(fast.state_dict()) == list(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 16, 16)
    plain, fast = plain.to(memory_format=fmt), fast.to(memory_format=fmt)
    out_p, grads_p = grads(plain, x.contiguous(memory_format=fmt))
    out_f, grads_f = grads(fast, x.contiguous(memory_format=fmt))
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    for gp, gf in zip(grads_p, grads_f):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-5)
    for bp, bf in zip(plain.buffers(), fast.buffers()):  # running statistics too
        torch.testing.assert_close(bf, bp, rtol=1e-5, atol=1e-6)


def test_fast_convmixer_is_the_same_function_bf16_autocast():
    plain = small_convmixer().to(memory_format=torch.channels_last)
    fast = small_convmixer().to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    truth = small_convmixer().to(memory_format=torch.channels_last)
    truth.load_state_dict(plain.state_dict())
    use_fast_kernels(fast)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out_t, grads_t = grads(truth, x)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = grads(plain, x)
        out_f, grads_f = grads(fast, x)
    # both bf16 runs round differently; ours must be as close to the fp32 function as PyTorch's bf16 is
    assert_as_close_as_pytorchs_bf16((out_t, grads_t), (out_p, grads_p), (out_f, grads_f))


def test_fast_convmixer_matches_timm_convmixer():
    ours = create_model("convmixer_256_8", dim=32, depth=2, kernel_size=7, patch_size=4, img_size=32)
    timm_model = TimmConvMixer(dim=32, depth=2, kernel_size=7, patch_size=4, num_classes=10)
    state = {k.replace("head.3.", "head."): v for k, v in ours.state_dict().items()}
    timm_model.load_state_dict(state)
    use_fast_kernels(ours)
    x = torch.randn(4, 3, 32, 32)
    out_o, grads_o = grads(ours, x)
    out_t, grads_t = grads(timm_model, x)
    torch.testing.assert_close(out_o, out_t)
    for go, gt in zip(grads_o, grads_t):
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gelu_batch_norm_with_gain_and_residual_matches_float64(dtype, tol):
    z = (2 * torch.randn(4, 32, 7, 5)).to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 7, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    bn = GELUBatchNorm2d(32).train()
    gain = nn.Parameter(torch.tensor([0.7]))
    with torch.no_grad():
        bn.weight.copy_(torch.rand(32) + 0.5), bn.bias.copy_(torch.randn(32))
    zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
    out = bn(zz, residual=xx, gain=gain)
    dout = torch.randn_like(out)
    out.backward(dout)
    z64, x64, w64, b64, g64 = (t.detach().double().requires_grad_() for t in (z, x, bn.weight, bn.bias, gain))
    ref = x64 + g64 * F.batch_norm(F.gelu(z64), None, None, w64, b64, training=True)
    ref.backward(dout.double())
    pairs = [(out, ref), (zz.grad, z64.grad), (xx.grad, x64.grad), (bn.weight.grad, w64.grad),
             (bn.bias.grad, b64.grad), (gain.grad, g64.grad)]
    for ours, truth in pairs:
        assert ours.dtype in (dtype, torch.float32)
        torch.testing.assert_close(ours.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())
    assert bn.num_batches_tracked.item() == 1
    # off the fast path (NCHW) a residual cannot be folded in: the call is refused, not silently unfused
    assert not bn.fused(z.contiguous(), residual=x.contiguous())
    with pytest.raises(ValueError, match="fused path"):
        bn(z.contiguous(), residual=x.contiguous(), gain=gain)


@pytest.mark.skipif("avx512f" not in cpu_features().split(), reason="no AVX-512 here: both builds are the same code")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_bn_kernel_gives_the_portable_codes_values(dtype, monkeypatch):
    """Where the CPU has AVX-512 three of the kernel's steps use its intrinsics: the same values as the
    build without them (-DPB_GENERIC), bit for bit, but bf16 values below 2^-126, which the bf16
    conversion instruction flushes to zero."""
    z = (torch.randn(4, 32, 9, 7) * torch.tensor([0.1, 1.0, 5.0, 30.0]).repeat(8).view(1, 32, 1, 1))
    z = z.to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn_like(z)
    w, b, g = torch.rand(32) + 0.5, torch.randn(32), torch.tensor([0.3])
    dout = torch.randn_like(z)
    results = []
    for name in ("gelu_bn", "gelu_bn_generic"):
        monkeypatch.setitem(kernels._LIBS, "gelu_bn", kernels._library(name))
        out, y, mean, rstd = kernels.gelu_batch_norm(z, w, b, 1e-5, x, g)
        grads = kernels.gelu_batch_norm_backward(z, y, dout, w, b, mean, rstd, g)
        results.append([out, y, mean, rstd, *grads])
    tiny = torch.finfo(torch.float32).tiny
    for native, generic in zip(*results):
        if native.dtype == torch.bfloat16:
            native, generic = (torch.where(t.float().abs() < tiny, 0.0, t.float()) for t in (native, generic))
        assert torch.equal(native, generic)


def test_fused_ops_pass_torch_library_checks():
    z = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    w, b, g = torch.rand(16) + 0.5, torch.randn(16), torch.tensor([0.3])
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(kernels.gelu_batch_norm, (z, w, b, 1e-5, x, g), test_utils=checks)
    _, y, mean, rstd = kernels.gelu_batch_norm(z, w, b, 1e-5, x, g)
    torch.library.opcheck(kernels.gelu_batch_norm_backward, (z, y, torch.randn_like(z), w, b, mean, rstd, g),
                          test_utils=checks)


def test_seed_convmixer_gets_the_kernels_and_keeps_its_gradients():
    plain = create_model("seed_convmixer", dim=32, depth=2)
    with torch.no_grad():  # non-zero gains, so the residual branches have gradients to compare
        for i, block in enumerate(plain.blocks):
            block[0].gain.fill_(0.5 + i)
    fast = create_model("seed_convmixer", dim=32, depth=2)
    fast.load_state_dict(plain.state_dict())
    # 2 depthwise convs, 5 GELU -> BatchNorm pairs, 2 gained residuals folded into their pair's kernel
    assert use_fast_kernels(fast) == 9
    assert sum(isinstance(m, kernels.FusedGainResidual) for m in fast.modules()) == 2
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain, fast = plain.to(memory_format=torch.channels_last), fast.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    plain.head[2].p = fast.head[2].p = 0.0  # dropout off, BatchNorm in training mode
    out_p, grads_p = grads(plain, x)
    out_f, grads_f = grads(fast, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    for gp, gf in zip(grads_p, grads_f):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-5)
    for bp, bf in zip(plain.buffers(), fast.buffers()):
        torch.testing.assert_close(bf, bp, rtol=1e-5, atol=1e-6)
    plain.eval(), fast.eval()  # eval: the plain ops with the running statistics, the same outputs
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x))


def test_seed_convmixer_fused_residuals_under_bf16_autocast():
    """As close to the fp32 function as PyTorch's own bf16 run of the plain model is."""
    models = [create_model("seed_convmixer", dim=32, depth=2) for _ in range(3)]
    with torch.no_grad():
        for i, block in enumerate(models[0].blocks):
            block[0].gain.fill_(0.5 + i)
    for m in models:
        m.load_state_dict(models[0].state_dict())
        m.head[2].p = 0.0
        m.to(memory_format=torch.channels_last)
    truth, plain, fast = models
    use_fast_kernels(fast)
    assert sum(isinstance(m, kernels.FusedGainResidual) for m in fast.modules()) == 2
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_t, grads_t = grads(truth, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = grads(plain, x)
        out_f, grads_f = grads(fast, x)
    assert out_f.dtype == out_p.dtype
    assert_as_close_as_pytorchs_bf16((out_t, grads_t), (out_p, grads_p), (out_f, grads_f))


def test_only_gained_residuals_without_drop_path_are_fused():
    dropped = create_model("seed_convmixer", dim=32, depth=2, drop_path=0.1)  # rates 0 and 0.1 (timm's rule)
    assert use_fast_kernels(dropped) == 8  # 2 depthwise convs, 5 GELU -> BatchNorm pairs, 1 residual
    assert [type(block[0]) for block in dropped.blocks] == [kernels.FusedGainResidual, Residual]
    plain = create_model("convmixer_256_8", dim=32, depth=2)  # residuals without a gain
    use_fast_kernels(plain)
    assert not any(isinstance(m, kernels.FusedGainResidual) for m in plain.modules())


class _ToChannelsLastFloat(nn.Module):
    def forward(self, x):
        return x.float().contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["eval", "dtype", "layout"])
def test_fused_residual_falls_back_when_the_kernel_cannot_take_it(case):
    """Where the kernel cannot run (eval mode, a residual whose dtype or layout differs from the
    branch's, which the kernel would misread) FusedGainResidual is the plain Residual: same output,
    same gradients."""
    torch.manual_seed(0)
    plain = Residual(nn.Sequential(_ToChannelsLastFloat(), nn.GELU(), nn.BatchNorm2d(16)), gain_init=0.5)
    wrapped = nn.Sequential(copy.deepcopy(plain))
    assert use_fast_kernels(wrapped) == 2  # the GELU -> BatchNorm pair, then the residual
    fused = wrapped[0]
    assert type(fused) is kernels.FusedGainResidual
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    if case == "eval":
        plain.eval(), fused.eval()
    elif case == "dtype":
        x = x.double()  # the branch runs in fp32, the residual stays float64
    else:
        x = x.contiguous()  # NCHW residual, channels_last branch
    norm, h = fused.fn[-1], fused.fn[0](x)  # the layer and the input it gets
    assert not norm.fused(h, residual=x)
    outs = []
    for model in (plain, fused):
        xx = x.clone().requires_grad_()
        out = model(xx)
        out.backward(torch.ones_like(out))
        outs.append((out, xx.grad, model.gain.grad))
    for ours, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(ours, ref)
    if case != "eval":  # the same branch input with a fitting residual does take the kernel
        assert norm.fused(h, residual=h.clone())


def test_only_fitting_layers_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(32, 32, 7, padding=3, groups=32),  # fits
        nn.Conv2d(32, 32, 7, padding=3, groups=32, stride=2),  # strided
        nn.Conv2d(24, 24, 5, padding=2, groups=24),  # 24 channels: not whole vectors of 16
        nn.Conv2d(32, 32, 4, padding="same", groups=32),  # even kernel
        nn.Conv2d(32, 32, 3, padding=0, groups=32),  # not 'same'
        nn.Conv2d(32, 32, 1),  # pointwise
    )
    assert use_fast_kernels(model) == 1
    assert isinstance(model[0], FastDepthwiseConv2d)
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * 5
    model = nn.Sequential(nn.GELU(), nn.BatchNorm2d(32), nn.GELU(approximate="tanh"), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.BatchNorm2d(32), nn.GELU(), nn.BatchNorm2d(24))
    assert use_fast_kernels(model) == 1  # only exact GELU -> BatchNorm2d with whole vectors of channels
    assert [type(m) for m in model] == [nn.Identity, GELUBatchNorm2d, nn.GELU, nn.BatchNorm2d,
                                        nn.ReLU, nn.BatchNorm2d, nn.GELU, nn.BatchNorm2d]


@pytest.mark.parametrize("name", ["vit_tiny_6l8h", "resnet18", "resnet9", "seed_vit", "seed_resnet9"])
def test_vit_and_resnet_paths_are_untouched(name):
    model = create_model(name, img_size=32)
    before = [type(m) for m in model.modules()]
    assert use_fast_kernels(model) == 0
    assert [type(m) for m in model.modules()] == before


def test_swapped_layer_shares_parameters_and_eval_is_plain():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    weight = model[0].weight
    use_fast_kernels(model)
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
        assert use_fast_kernels(model) == 0
    assert not any(isinstance(m, FastDepthwiseConv2d) for m in model.modules())
