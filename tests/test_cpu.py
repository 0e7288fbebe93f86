"""patchbench.cpu: the operators compute the same function (the depthwise gradient and fused GELU ->
BatchNorm against float64 references, on every instruction set this CPU has; ConvMixer with them
against the plain model and timm's: outputs, gradients and BatchNorm buffers), check their inputs by
name, run on torch's threads, and give way to PyTorch's ops where they cannot be built."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from patchbench.cpu import layers, ops
from patchbench.cpu.layers import FastDepthwiseConv2d, GELUBatchNorm2d, use_fast_kernels
from patchbench.models import create_model
from patchbench.models.layers import Residual

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
# skipped only without a compiler: with one, a build that fails fails these tests
needs_ops = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here: the operators cannot be built")


@needs_ops
def test_the_operators_build_where_there_is_a_compiler():
    from patchbench.cpu import build

    assert ops.available(), build.FAILURE
ISAS = ("generic", "avx2", "avx512", "avx512bf16")


def isas_here() -> list[str]:
    """The instruction sets the operators can use on this CPU, lowest first."""
    if not ops.available():
        return []
    best = torch.ops.patchbench.cpu_isa()
    return list(ISAS[:ISAS.index(best) + 1])


@pytest.fixture
def isa():
    """Set the operators' instruction set for a test (the best this CPU has again after it)."""
    before = torch.ops.patchbench.cpu_isa()
    yield lambda name: torch.ops.patchbench.cpu_isa(name)
    torch.ops.patchbench.cpu_isa(before)


def depthwise_param_grads(x, g, k):
    return torch.ops.patchbench.depthwise_param_grads(x, g.to(x.dtype), k)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_weight_grad(x, g, k):
    return torch.nn.grad.conv2d_weight(x.double(), (x.shape[1], 1, k, k), g.double(), padding=k // 2,
                                       groups=x.shape[1])


@needs_ops
@pytest.mark.parametrize("k", [3, 5, 7, 9])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ISAS)
def test_weight_grad_matches_float64_fp32(k, channels_last, name, isa):
    if name not in isas_here():
        pytest.skip(f"this CPU has no {name}")
    isa(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 32, 9, 11).contiguous(memory_format=fmt)  # H != W catches swapped axes
    g = torch.randn(3, 32, 9, 11)
    ours, bias = depthwise_param_grads(x, g, k)
    assert ours.shape == (32, 1, k, k) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_weight_grad(x, g, k), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


@needs_ops
def test_weight_grad_bf16_inputs_accumulate_in_fp32():
    x = torch.randn(4, 16, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 12, 12).bfloat16()
    ours, _ = depthwise_param_grads(x, g, 7)
    # exact up to fp32 summation: the bf16 values are converted, never rounded again
    torch.testing.assert_close(ours.double(), reference_weight_grad(x, g, 7), rtol=1e-5, atol=1e-4)


@needs_ops
def test_the_operators_pass_torch_library_checks():
    x, g = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    z = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    y, w = torch.randn_like(z), torch.rand(16)
    pb, checks = torch.ops.patchbench, ("test_schema", "test_faketensor")
    for op, args in [(pb.depthwise_param_grads, (x, g, 5)), (pb.gelu_stats, (z,)), (pb.bn_affine, (y, w, w, z)),
                     (pb.bn_affine, (y, w, w, None)), (pb.bn_grad_stats, (y, z)), (pb.gelu_bn_grad, (z, y, y, w, w, w))]:
        torch.library.opcheck(op, args, test_utils=checks)


@needs_ops
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ISAS)
def test_gelu_batch_norm_matches_float64(dtype, tol, name, isa):
    if name not in isas_here():
        pytest.skip(f"this CPU has no {name}")
    isa(name)
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


@needs_ops
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


@needs_ops
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


@needs_ops
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


@needs_ops
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


@needs_ops
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


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx512s_intrinsics_give_the_avx2_codes_values(dtype, isa):
    """Where the CPU has AVX-512, three steps of GELU -> BatchNorm use its intrinsics: the same values as
    the AVX2 build (both with FMA), bit for bit, but bf16 values below 2^-126, which the bf16
    conversion instruction flushes to zero."""
    here = isas_here()
    if "avx512" not in here:
        pytest.skip("no AVX-512 here")
    z = (torch.randn(4, 32, 9, 7) * torch.tensor([0.1, 1.0, 5.0, 30.0]).repeat(8).view(1, 32, 1, 1))
    z = z.to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn_like(z)
    w, b, g = torch.rand(32) + 0.5, torch.randn(32), torch.tensor([0.3])
    dout = torch.randn_like(z)
    results = []
    for name in ("avx2", here[-1]):
        isa(name)
        out, y, mean, rstd = layers.gelu_batch_norm(z, w, b, 1e-5, x, g)
        grads = layers.gelu_batch_norm_backward(z, y, dout, w, b, mean, rstd, g)
        results.append([out, y, mean, rstd, *grads])
    tiny = torch.finfo(torch.float32).tiny
    for native, portable in zip(*results):
        if native.dtype == torch.bfloat16:
            native, portable = (torch.where(t.float().abs() < tiny, 0.0, t.float()) for t in (native, portable))
        assert torch.equal(native, portable)


@needs_ops
def test_seed_convmixer_gets_the_kernels_and_keeps_its_gradients():
    plain = create_model("notebook_convmixer", dim=32, depth=2)
    with torch.no_grad():  # non-zero gains, so the residual branches have gradients to compare
        for i, block in enumerate(plain.blocks):
            block[0].gain.fill_(0.5 + i)
    fast = create_model("notebook_convmixer", dim=32, depth=2)
    fast.load_state_dict(plain.state_dict())
    # 2 depthwise convs, 5 GELU -> BatchNorm pairs, 2 gained residuals folded into their pair's kernel
    assert use_fast_kernels(fast) == 9
    assert sum(isinstance(m, layers.FusedGainResidual) for m in fast.modules()) == 2
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


@needs_ops
def test_seed_convmixer_fused_residuals_under_bf16_autocast():
    """As close to the fp32 function as PyTorch's own bf16 run of the plain model is."""
    models = [create_model("notebook_convmixer", dim=32, depth=2) for _ in range(3)]
    with torch.no_grad():
        for i, block in enumerate(models[0].blocks):
            block[0].gain.fill_(0.5 + i)
    for m in models:
        m.load_state_dict(models[0].state_dict())
        m.head[2].p = 0.0
        m.to(memory_format=torch.channels_last)
    truth, plain, fast = models
    use_fast_kernels(fast)
    assert sum(isinstance(m, layers.FusedGainResidual) for m in fast.modules()) == 2
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_t, grads_t = grads(truth, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = grads(plain, x)
        out_f, grads_f = grads(fast, x)
    assert out_f.dtype == out_p.dtype
    assert_as_close_as_pytorchs_bf16((out_t, grads_t), (out_p, grads_p), (out_f, grads_f))


@needs_ops
def test_only_gained_residuals_without_drop_path_are_fused():
    dropped = create_model("notebook_convmixer", dim=32, depth=2, drop_path=0.1)  # rates 0 and 0.1 (timm's rule)
    assert use_fast_kernels(dropped) == 8  # 2 depthwise convs, 5 GELU -> BatchNorm pairs, 1 residual
    assert [type(block[0]) for block in dropped.blocks] == [layers.FusedGainResidual, Residual]
    plain = create_model("convmixer_256_8", dim=32, depth=2)  # residuals without a gain
    use_fast_kernels(plain)
    assert not any(isinstance(m, layers.FusedGainResidual) for m in plain.modules())


class _ToChannelsLastFloat(nn.Module):
    def forward(self, x):
        return x.float().contiguous(memory_format=torch.channels_last)


@needs_ops
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
    assert type(fused) is layers.FusedGainResidual
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


@needs_ops
def test_only_fitting_layers_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(32, 32, 7, padding=3, groups=32),  # fits
        nn.Conv2d(32, 32, 7, padding=3, groups=32, stride=2),  # strided
        nn.Conv2d(24, 24, 5, padding=2, groups=24),  # 24 channels: not whole vectors of 16
        nn.Conv2d(32, 32, 4, padding="same", groups=32),  # even kernel
        nn.Conv2d(32, 32, 11, padding=5, groups=32),  # a size the operator is not compiled for
        nn.Conv2d(32, 32, 3, padding=0, groups=32),  # not 'same'
        nn.Conv2d(32, 32, 1),  # pointwise
    )
    assert use_fast_kernels(model) == 1
    assert isinstance(model[0], FastDepthwiseConv2d)
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * 6
    model = nn.Sequential(nn.GELU(), nn.BatchNorm2d(32), nn.GELU(approximate="tanh"), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.BatchNorm2d(32), nn.GELU(), nn.BatchNorm2d(24))
    assert use_fast_kernels(model) == 1  # only exact GELU -> BatchNorm2d with whole vectors of channels
    assert [type(m) for m in model] == [nn.Identity, GELUBatchNorm2d, nn.GELU, nn.BatchNorm2d,
                                        nn.ReLU, nn.BatchNorm2d, nn.GELU, nn.BatchNorm2d]


@pytest.mark.parametrize("name", ["vit_tiny_6l8h", "resnet18", "resnet9", "notebook_vit", "notebook_resnet9"])
def test_vit_and_resnet_paths_are_untouched(name):
    model = create_model(name, img_size=32)
    before = [type(m) for m in model.modules()]
    assert use_fast_kernels(model) == 0
    assert [type(m) for m in model.modules()] == before


@needs_ops
def test_swapped_layer_shares_parameters_and_eval_is_plain():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    weight = model[0].weight
    use_fast_kernels(model)
    assert model[0].weight is weight
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, weight, model[0].bias, padding=1, groups=16))


WITHOUT_A_COMPILER = """
import warnings, torch
from patchbench.cpu import build, layers
from patchbench.models import create_model
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = create_model("convmixer_256_8", dim=32, depth=2, kernel_size=5, img_size=16)
    swapped = layers.use_fast_kernels(model)
print(swapped, any(isinstance(m, layers.FastDepthwiseConv2d) for m in model.modules()))
print(build.FAILURE)
print(str(caught[0].message) if caught else "no warning")
"""


def test_without_a_compiler_nothing_is_swapped(tmp_path):
    """A fresh interpreter whose C++ compiler does not exist: no layer is swapped, and why is said once."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "PATCHBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_A_COMPILER], env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    swapped, failure, warning = done.stdout.strip().splitlines()
    assert swapped == "0 False"
    assert failure.startswith("the CPU operators could not be built")
    assert warning.startswith("patchbench.cpu: the CPU operators could not be built") and "PyTorch's" in warning


# ------------------------------------------------------------------------------------ the operators' checks

def _cl(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)


PB = "torch.ops.patchbench."
BAD_CALLS = [
    ("gelu_stats(torch.randn(2, 16, 3, 3))", "gelu_stats: z must be contiguous in channels_last memory format"),
    ("gelu_stats(_cl(2, 16, 3, 3, dtype=torch.float64))", "gelu_stats: z must be float32 or bfloat16, got Double"),
    ("gelu_stats(_cl(2, 24, 3, 3))", "gelu_stats: z must have a positive multiple of 16 channels, got 24"),
    ("gelu_stats(torch.randn(16, 3, 3))", "gelu_stats: z must be 4-D"),
    ("gelu_stats(_cl(2, 0, 3, 3))", "gelu_stats: z must have a positive multiple of 16 channels, got 0"),
    ("gelu_stats(_cl(2, 16, 3, 3).to('meta'))", "gelu_stats: z must be a CPU tensor, got one on meta"),
    ("bn_affine(_cl(2, 16, 3, 3), torch.ones(16).double(), torch.zeros(16), None)",
     "bn_affine: scale must be Float, got Double"),
    ("bn_affine(_cl(2, 16, 3, 3), torch.ones(16), torch.zeros(8), None)",
     "bn_affine: shift must be a contiguous vector of 16"),
    ("bn_affine(_cl(2, 16, 3, 3), torch.ones(16), torch.zeros(16), torch.randn(2, 16, 3, 3))",
     "bn_affine: residual must be contiguous in channels_last memory format, like y"),
    ("bn_affine(_cl(2, 16, 3, 3), torch.ones(16), torch.zeros(16), _cl(2, 16, 3, 3, dtype=torch.bfloat16))",
     "bn_affine: residual must have y's dtype"),
    ("bn_grad_stats(_cl(2, 16, 3, 3), _cl(2, 16, 3, 4))", "bn_grad_stats: grad_out must have y's shape"),
    ("bn_grad_stats(_cl(2, 16, 3, 3), _cl(2, 16, 3, 3).to('meta'))", "bn_grad_stats: grad_out must be a CPU tensor"),
    (("gelu_bn_grad(_cl(2, 16, 3, 3), _cl(2, 16, 3, 3), torch.randn(2, 16, 3, 3), torch.ones(16), torch.ones(16), "
     "torch.ones(16))"), "gelu_bn_grad: grad_out must be contiguous in channels_last"),
    (("gelu_bn_grad(_cl(2, 16, 3, 3), _cl(2, 16, 3, 3), _cl(2, 16, 3, 3), torch.ones(16), torch.ones(16, 1), "
     "torch.ones(16))"), "gelu_bn_grad: kb must be a contiguous vector of 16"),
    ("depthwise_param_grads(torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5), 4)",
     "depthwise_param_grads: kernel_size must be 3, 5, 7 or 9, got 4"),
    ("depthwise_param_grads(torch.randn(2, 16, 5, 5).half(), torch.randn(2, 16, 5, 5).half(), 3)",
     "depthwise_param_grads: x must be float32 or bfloat16, got Half"),
    ("depthwise_param_grads(torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5).double(), 3)",
     "depthwise_param_grads: grad_out must have x's dtype and shape"),
    ("depthwise_param_grads(torch.randn(2, 16, 5, 5, device='meta'), torch.randn(2, 16, 5, 5, device='meta'), 3)",
     "depthwise_param_grads: x must be a CPU tensor"),
    ("cpu_isa('sse9')", "cpu_isa: cap is 'sse9', not one of generic, avx2, avx512, avx512bf16"),
]


@needs_ops
@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[c.split("(")[0] + str(i) for i, (c, _) in enumerate(BAD_CALLS)])
def test_each_operator_names_the_argument_it_cannot_take(call, message):
    with pytest.raises(RuntimeError, match=message):
        eval(PB + call)


def test_every_operator_has_a_bad_call_case():
    schemas = ("gelu_stats", "bn_affine", "bn_grad_stats", "gelu_bn_grad", "depthwise_param_grads", "cpu_isa")
    assert {call.split("(")[0] for call, _ in BAD_CALLS} == set(schemas)


@needs_ops
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core")
def test_torchs_thread_count_governs_the_operators():
    z = _cl(4, 64, 6, 6)  # 4 blocks of 16 channels to share out
    x, g = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for call in (lambda: torch.ops.patchbench.gelu_stats(z),
                         lambda: torch.ops.patchbench.depthwise_param_grads(x, g, 3)):
                call()
                assert torch.ops.patchbench.threads_used() == threads
    finally:
        torch.set_num_threads(before)
