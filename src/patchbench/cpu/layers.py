"""The layers that run patchbench's CPU operators in a ConvMixer train step, and `use_fast_kernels`,
which swaps them into a model.

Why: a ConvMixer train step on a CPU spends its time less in the matmuls than in (1) the backward of
the depthwise k x k convolution, almost all of it in the *weight* gradient, a small share of the
FLOPs that oneDNN computes slowly, and (2) GELU -> BatchNorm, four memory-bound passes forward and
backward. So:

- FastDepthwiseConv2d: F.conv2d forward and input gradient; the weight and bias gradients from
  torch.ops.patchbench.depthwise_param_grads (fp32 sums whatever the input dtype).
- GELUBatchNorm2d: GELU -> BatchNorm (training mode) fused: forward is one pass computing y = gelu(z)
  and the batch statistics of y, one pass applying the affine normalisation; backward is one pass for
  the two per-channel sums and one computing dz. GELU is exact (erf by Abramowitz & Stegun 7.1.26,
  the formula PyTorch's vectorised CPU erf uses); y is kept for backward, as eager PyTorch keeps it.
- FusedGainResidual: the notebook ConvMixer's gained residual x + gain * BN(GELU(z)) folded into that
  kernel's affine pass (the gain into the per-channel scale and shift, the sum into the store).

Where the operators cannot be built, or a layer or input does not fit them (CPU, channels divisible
by 16, channels_last input for GELU -> BatchNorm, odd square kernel of 3 to 9 with stride 1 and
'same' padding for the depthwise conv), the layers run PyTorch's own ops: same results, usual speed.

    n = use_fast_kernels(model)   # swaps fitting layers in place; same parameters and state_dict
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.cpu import ops
from patchbench.models.layers import Residual

LANES = 16  # channels per vector in the kernels (one 512-bit register of fp32)
KERNEL_SIZES = (3, 5, 7, 9)  # the depthwise kernel sizes the operator is compiled for


def gelu_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, gain: torch.Tensor | None = None):
    """Training-mode BatchNorm of gelu(z), z channels_last (B, C, H, W) fp32/bf16; with `residual` (like
    z) and `gain` (a (1,) scalar) it returns residual + gain * that instead, in the same pass.

    Returns (out, y = gelu(z), batch mean, 1/sqrt(biased var + eps)); the last two (C,) in float64.
    """
    y, s, q = torch.ops.patchbench.gelu_stats(z)
    n = z.numel() // z.shape[1]
    mean = s / n
    rstd = (q / n - mean * mean).clamp_min(0).add(eps).rsqrt()
    scale = (weight.double() * rstd).float()
    shift = (bias.double() - mean * weight.double() * rstd).float()
    if gain is not None:  # gain * (y * scale + shift), folded into the per-channel constants
        scale, shift = scale * gain.float(), shift * gain.float()
    return torch.ops.patchbench.bn_affine(y, scale, shift, residual), y, mean, rstd


def gelu_batch_norm_backward(z, y, grad_out, weight, bias, mean, rstd, gain=None):
    """Gradients (dz, dweight, dbias, dgain) of `gelu_batch_norm`; grad_out channels_last like z. With
    `gain`, grad_out is that of residual + gain * BN(gelu(z)) (the residual's own gradient is grad_out)
    and dgain = sum(grad_out * BN(gelu(z))); without it dgain is that sum too, unused."""
    n = z.numel() // z.shape[1]
    sd, sdy = torch.ops.patchbench.bn_grad_stats(y, grad_out)
    dbias = sd  # sum of dout
    dweight = rstd * (sdy - mean * sd)  # sum of dout * y_hat
    dgain = (weight.double() * dweight + bias.double() * dbias).sum().reshape(1)  # sum of dout * BN(y)
    a = weight.double() * rstd
    if gain is not None:  # the BatchNorm's output gradient is gain * dout
        g = gain.double()
        dbias, dweight, a_out = dbias * g, dweight * g, a * g
    else:
        a_out = a
    # d out / d y folded into one line per channel: dy = ka * dout + kb * y + kc
    kb = -a * rstd * dweight / n
    ka, kc = a_out.float(), (-a * dbias / n - kb * mean).float()
    dz = torch.ops.patchbench.gelu_bn_grad(z, y, grad_out, ka, kb.float(), kc)
    return (dz, dweight.to(weight.dtype), dbias.to(weight.dtype),
            dgain.to(gain.dtype if gain is not None else weight.dtype))


class _DepthwiseConv2dFn(torch.autograd.Function):
    """F.conv2d forward and input gradient; the weight and bias gradients from the operator."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        k, groups = weight.shape[-1], weight.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # correlation with the kernel turned 180 degrees: the transpose of a 'same' stride-1 conv
            grad_x = F.conv2d(grad_out, weight.flip((-2, -1)), padding=k // 2, groups=groups)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, grad_b = torch.ops.patchbench.depthwise_param_grads(x, grad_out.to(x.dtype), k)
            grad_w = grad_w.to(weight.dtype)
            grad_b = grad_b.to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def _fits(conv: nn.Conv2d) -> bool:
    """A depthwise, stride-1, 'same' conv with a square kernel the operator has, whose channels fill
    whole vectors."""
    k = conv.kernel_size
    same = conv.padding == "same" or conv.padding == (k[0] // 2, k[1] // 2)
    return (conv.groups == conv.in_channels == conv.out_channels and conv.in_channels % LANES == 0
            and k[0] == k[1] and k[0] in KERNEL_SIZES and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and same and conv.padding_mode == "zeros")


class FastDepthwiseConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) whose weight gradient uses the operator on CPU."""

    def forward(self, x):
        if x.device.type != "cpu" or not torch.is_grad_enabled():  # the kernel only speeds up training
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # do what autocast does for conv2d: compute in its dtype
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _DepthwiseConv2dFn.apply(x, weight, bias)


class _GELUBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, eps, residual, gain):
        out, y, mean, rstd = gelu_batch_norm(z, weight, bias, eps, residual, gain)
        ctx.save_for_backward(z, y, weight, bias, mean, rstd, gain)
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _mean, _rstd):
        z, y, weight, bias, mean, rstd, gain = ctx.saved_tensors
        grad_out = grad_out.to(z.dtype).contiguous(memory_format=torch.channels_last)
        dz, dweight, dbias, dgain = gelu_batch_norm_backward(z, y, grad_out, weight, bias, mean, rstd, gain)
        return dz, dweight, dbias, None, grad_out if ctx.needs_input_grad[4] else None, dgain if gain is not None else None


class GELUBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d of GELU(x): replaces the pair GELU -> BatchNorm2d (the GELU becomes nn.Identity).

    Same parameters, buffers and state_dict keys as the BatchNorm2d it replaces. Training on CPU with
    a channels_last fp32 or bf16 input runs the fused operators; everything else (eval, other devices,
    dtypes or layouts) runs F.gelu then BatchNorm2d (`fused` says which). On the fused path
    `forward(x, residual, gain)` returns residual + gain * BN(GELU(x)), the sum and the scalar gain
    folded into the kernel's last pass (FusedGainResidual); off it the caller combines them
    (Residual.combine), not this layer.
    """

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """Whether `forward(x, residual)` runs the fused kernels; if not, `forward(x)` is F.gelu then
        BatchNorm2d and a residual or gain is refused."""
        return (self.training and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                          and residual.is_contiguous(memory_format=torch.channels_last))))

    def forward(self, x, residual=None, gain=None):
        if not self.fused(x, residual):
            if residual is not None or gain is not None:  # FusedGainResidual asks `fused` first
                raise ValueError("GELUBatchNorm2d takes a residual and gain only on its fused path; "
                                 "call it without them and combine outside (Residual.combine)")
            return super().forward(F.gelu(x))
        out, mean, rstd = _GELUBatchNormFn.apply(x, self.weight, self.bias, self.eps, residual, gain)
        with torch.no_grad():  # what BatchNorm2d does with its buffers in training mode
            self.num_batches_tracked.add_(1)
            n = x.numel() / x.shape[1]
            var = (rstd.pow(-2) - self.eps) * (n / max(n - 1, 1))  # unbiased, as BatchNorm2d keeps it
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        return out


class FusedGainResidual(Residual):
    """Residual(x + gain * fn(x)) whose branch ends in a GELUBatchNorm2d: the gain's product and the sum
    run inside the fused kernel's affine pass, saving three memory-bound passes forward (the affine's
    output, the product, the sum) and two backward. Same parameters and state_dict as the Residual."""

    def forward(self, x):
        *body, norm = self.fn
        h = x
        for layer in body:
            h = layer(h)
        if norm.fused(h, residual=x):
            return norm(h, residual=x, gain=self.gain)
        return self.combine(x, norm(h))  # eval, or a residual the kernel cannot take


def _fits_gelu_bn(act: nn.Module, bn: nn.Module) -> bool:
    return (type(act) is nn.GELU and act.approximate == "none" and type(bn) is nn.BatchNorm2d
            and bn.affine and bn.track_running_stats and bn.momentum is not None and bn.num_features % LANES == 0)


def use_fast_kernels(model: nn.Module) -> int:
    """Swap fitting layers of `model` for the fast ones, in place; returns how many were swapped.

    Depthwise convs become FastDepthwiseConv2d; each GELU -> BatchNorm2d pair inside an nn.Sequential
    becomes nn.Identity -> GELUBatchNorm2d; a gained Residual (notebook_convmixer's) whose branch then ends
    in one becomes FusedGainResidual. Parameters and buffers are shared, not copied, so the
    state_dict is unchanged. Models without such layers (ViT, ResNet) are left exactly as they were,
    and so is everything where the operators cannot be built (no C++ compiler). Call it before building the optimizer or
    wrapping the model (DDP, torch.compile).
    """
    if not ops.available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (name, child), (next_name, next_child) in zip(children, children[1:] + [(None, None)]):
            if type(child) is nn.Conv2d and _fits(child):
                fast = FastDepthwiseConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, padding=child.padding,
                    groups=child.groups, bias=child.bias is not None, device="meta",
                )
                fast.weight, fast.bias = child.weight, child.bias  # the same Parameters, not copies
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
            elif isinstance(parent, nn.Sequential) and _fits_gelu_bn(child, next_child):
                fused = GELUBatchNorm2d(next_child.num_features, eps=next_child.eps, momentum=next_child.momentum,
                                        device="meta")
                fused.weight, fused.bias = next_child.weight, next_child.bias
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(fused, buf, getattr(next_child, buf))
                fused.train(next_child.training)
                setattr(parent, name, nn.Identity())
                setattr(parent, next_name, fused)
                swapped += 1
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if (type(child) is Residual and child.gain is not None and type(child.drop_path) is nn.Identity
                    and type(child.fn) is nn.Sequential and len(child.fn) and child.gain.numel() == 1
                    and isinstance(child.fn[-1], GELUBatchNorm2d)):
                fused = FusedGainResidual(child.fn)
                fused.gain = child.gain  # the same Parameter
                fused.train(child.training)
                setattr(parent, name, fused)
                swapped += 1
    return swapped
