"""Fast building blocks for the CPU train step: ConvMixer's depthwise-convolution weight gradient.

Why this file exists: on a CPU, a ConvMixer train step spends ~40% of its time in the backward of
the depthwise k x k convolution, almost all of it in the *weight* gradient (oneDNN: ~39 ms fp32 and
~125 ms bf16 per layer at batch 64, 22x22, 256 channels, on a 2-core Sapphire Rapids), although it
is only 7% of the step's FLOPs. The weight gradient of a depthwise conv is, per channel c,

    dW[c, i, j] = sum_{b, h, w} x[b, c, h + i - P, w + j - P] * dy[b, c, h, w]      (P = k // 2)

a sum of k*k products of shifted planes. `_C_SOURCE` computes it in channels-last layout, 16
channels per vector, with the k running sums of one output row held in registers while a padded
input row streams past, accumulating in fp32 whatever the input dtype (fp32 or bf16). It is
compiled once per kernel size with the system C compiler (~0.1 s) and cached on disk; where no
compiler is found, or the tensors do not fit its assumptions (CPU, channels divisible by 16, odd
square kernel, stride 1, 'same' padding), the standard PyTorch path is used instead.

Nothing changes the function the model computes: the forward pass and the input gradient still go
through `F.conv2d`; only the weight gradient is computed by a different summation order.

    model = use_fast_depthwise(model)   # swaps depthwise nn.Conv2d layers in place, same parameters
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LANES = 16  # channels per vector in the C kernel (one 512-bit register of fp32)

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* KS (kernel size, odd) is fixed at compile time so the KS running sums live in registers. */
#define P (KS / 2)
typedef float v16 __attribute__((vector_size(64)));  /* 16 channels of fp32 */

static inline float from_f32(float v) { return v; }
static inline float from_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

/* dw[k][c] = sum_{b,h,w} x[b][h+i-P][w+j-P][c] * g[b][h][w][c] for k = i*KS + j, and the bias gradient
   db[c] = sum_{b,h,w} g[b][h][w][c]; x and g are (B, H, W, C) contiguous (channels_last), dw is
   (KS*KS, C) and db (C,), both fp32. Blocks of 16 channels are shared out among the
   OpenMP threads (torch's own pool: the library links the libgomp that torch has loaded). */
#define DEFINE_WGRAD(NAME, T, LOAD)                                                                  \
int NAME(const T *x, const T *g, float *dw, float *db, long B, long H, long W, long C) {                        \
    long WP = W + 2 * P, failed = 0;                                                                 \
    _Pragma("omp parallel for schedule(static) reduction(|: failed)")                                \
    for (long cb = 0; cb < C / 16; cb++) {                                                           \
        long c0 = cb * 16;                                                                           \
        v16 *xb = aligned_alloc(64, sizeof(v16) * (H + 2 * P) * WP);  /* zero-padded input plane */  \
        v16 *gb = aligned_alloc(64, sizeof(v16) * H * W);             /* output-gradient plane */    \
        if (!xb || !gb) { free(xb); free(gb); failed = 1; continue; }                                \
        v16 total[KS * KS], bias = {0};                                                              \
        memset(total, 0, sizeof total);                                                              \
        for (long b = 0; b < B; b++) {                                                               \
            memset(xb, 0, sizeof(v16) * (H + 2 * P) * WP);                                           \
            for (long h = 0; h < H; h++)                                                             \
                for (long w = 0; w < W; w++) {                                                       \
                    const T *xp = x + ((b * H + h) * W + w) * C + c0;                                \
                    const T *gp = g + ((b * H + h) * W + w) * C + c0;                                \
                    v16 xv, gv;                                                                      \
                    for (int l = 0; l < 16; l++) { xv[l] = LOAD(xp[l]); gv[l] = LOAD(gp[l]); }      \
                    xb[(h + P) * WP + w + P] = xv;                                                   \
                    gb[h * W + w] = gv;                                                              \
                    bias += gv;                                                                      \
                }                                                                                    \
            for (long h = 0; h < H; h++)                                                             \
                for (int i = 0; i < KS; i++) {  /* KS running sums of one output row, in registers */\
                    const v16 *xrow = xb + (h + i) * WP, *grow = gb + h * W;                         \
                    v16 acc[KS];                                                                     \
                    memset(acc, 0, sizeof acc);                                                      \
                    for (long w = 0; w < W; w++) {                                                   \
                        v16 gv = grow[w];                                                            \
                        for (int j = 0; j < KS; j++) acc[j] += xrow[w + j] * gv;                     \
                    }                                                                                \
                    for (int j = 0; j < KS; j++) total[i * KS + j] += acc[j];                        \
                }                                                                                    \
        }                                                                                            \
        for (int k = 0; k < KS * KS; k++) memcpy(dw + k * C + c0, &total[k], sizeof(v16));          \
        memcpy(db + c0, &bias, sizeof(v16));                                                         \
        free(xb); free(gb);                                                                          \
    }                                                                                                \
    return (int)failed;                                                                              \
}

DEFINE_WGRAD(dw_wgrad_f32, float, from_f32)
DEFINE_WGRAD(dw_wgrad_bf16, uint16_t, from_bf16)
"""

_LIBS: dict[int, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    root = os.environ.get("PATCHBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "patchbench")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's feature flags: a library built with -march=native is only reused on the same kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compile(kernel_size: int) -> ctypes.CDLL | None:
    """Build (once, cached by source + flags + CPU) and load the kernel library; None without a C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-DKS={kernel_size}"]
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"dwconv_k{kernel_size}_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "dwconv.c", Path(tmp) / "dwconv.so"
            src.write_text(_C_SOURCE)
            try:
                done = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            except OSError as e:
                done = subprocess.CompletedProcess([cc], 1, "", str(e))
            if done.returncode != 0:
                warnings.warn(f"patchbench.kernels: {cc} could not build the depthwise kernel, using PyTorch's "
                              f"(slower) path: {done.stderr.strip()[:300]}", stacklevel=3)
                return None
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(path))
    for name in ("dw_wgrad_f32", "dw_wgrad_bf16"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 4
    return lib


def _library(kernel_size: int) -> ctypes.CDLL | None:
    if kernel_size not in _LIBS:
        _LIBS[kernel_size] = _compile(kernel_size)
    return _LIBS[kernel_size]


def fast_depthwise_available(kernel_size: int = 7) -> bool:
    """True when the C weight-gradient kernel for this kernel size could be built and loaded here."""
    return kernel_size % 2 == 1 and _library(kernel_size) is not None


@torch.library.custom_op("patchbench::depthwise_param_grads", mutates_args=())
def depthwise_param_grads(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of a stride-1 'same' depthwise conv: input and output gradient, both
    (B, C, H, W), -> (C, 1, k, k) and (C,), fp32.

    A registered op (opaque to torch.compile) so compiled models can call it too.
    """
    lib = _library(kernel_size)
    if lib is None:
        raise RuntimeError(f"no C compiler: the depthwise kernel for k={kernel_size} could not be built")
    B, C, H, W = x.shape
    xs = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): a view when x is channels_last
    gs = grad_out.to(x.dtype).permute(0, 2, 3, 1).contiguous()
    dw = torch.empty(kernel_size * kernel_size, C, dtype=torch.float32)  # (k*k, C)
    db = torch.empty(C, dtype=torch.float32)
    fn = lib.dw_wgrad_f32 if x.dtype == torch.float32 else lib.dw_wgrad_bf16
    if fn(xs.data_ptr(), gs.data_ptr(), dw.data_ptr(), db.data_ptr(), B, H, W, C) != 0:
        raise MemoryError("depthwise weight-gradient kernel could not allocate its buffers")
    return dw.t().contiguous().view(C, 1, kernel_size, kernel_size), db


@depthwise_param_grads.register_fake
def _(x, grad_out, kernel_size):
    C = x.shape[1]
    return x.new_empty((C, 1, kernel_size, kernel_size), dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


class _DepthwiseConv2dFn(torch.autograd.Function):
    """F.conv2d forward and input gradient; the weight and bias gradients from the C kernel."""

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
            grad_w, grad_b = depthwise_param_grads(x, grad_out, k)
            grad_w = grad_w.to(weight.dtype)
            grad_b = grad_b.to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def _fits(conv: nn.Conv2d) -> bool:
    """A depthwise, stride-1, 'same', odd square-kernel conv whose channels fill whole vectors."""
    k = conv.kernel_size
    same = conv.padding == "same" or conv.padding == (k[0] // 2, k[1] // 2)
    return (conv.groups == conv.in_channels == conv.out_channels and conv.in_channels % LANES == 0
            and k[0] == k[1] and k[0] % 2 == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and same and conv.padding_mode == "zeros")


class FastDepthwiseConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) whose weight gradient uses the C kernel on CPU."""

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


def use_fast_depthwise(model: nn.Module) -> int:
    """Swap every fitting depthwise nn.Conv2d in `model` for a FastDepthwiseConv2d sharing its parameters.

    Returns how many were swapped (0 where no C compiler is available: the model is left as it was).
    Call it before building the optimizer or wrapping the model (DDP, torch.compile).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and _fits(child) and fast_depthwise_available(child.kernel_size[0]):
                fast = FastDepthwiseConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, padding=child.padding,
                    groups=child.groups, bias=child.bias is not None, device="meta",
                )
                fast.weight, fast.bias = child.weight, child.bias  # the same Parameters, not copies
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
