"""Fast building blocks for the CPU train step of ConvMixer: two small C kernels, the same function.

Why this file exists: a ConvMixer train step on a CPU spends its time not in the matmuls but in
(1) the backward of the depthwise k x k convolution, almost all of it in the *weight* gradient
(oneDNN: ~39 ms fp32 and ~125 ms bf16 per layer at batch 64, 22x22, 256 channels, on a 2-core
Sapphire Rapids), although it is only 7% of the FLOPs, and (2) GELU -> BatchNorm, four memory-bound
passes forward and backward, each also an OpenMP parallel region (costly on a shared CPU).

- Depthwise weight/bias gradient. Per channel c, dW[c, i, j] = sum_{b,h,w} x[b, c, h+i-P, w+j-P] *
  dy[b, c, h, w] (P = k // 2): a sum of k*k products of shifted planes. The kernel works in
  channels-last layout, 16 channels per vector, keeping the k running sums of one output row in
  registers while a zero-padded input row streams past; it accumulates in fp32 whatever the input
  dtype. The forward pass and the input gradient stay with `F.conv2d`.
- GELU -> BatchNorm (training mode) fused: forward is one pass computing y = gelu(z) and the batch
  statistics of y, one pass applying the affine normalisation; backward is one pass for the two
  per-channel sums and one computing dz. GELU is exact (erf, Abramowitz & Stegun 7.1.26, the formula
  PyTorch's vectorised CPU erf uses); sums are fp32 per 64 rows, accumulated in double. y is kept
  for backward, as eager PyTorch keeps it.

Each kernel is compiled once with the system C compiler (~0.1 s, `-O3 -march=native -fopenmp`,
sharing torch's OpenMP threads) and cached on disk. Where no compiler is found, or a layer or input
does not fit the kernels' assumptions (CPU, channels divisible by 16, channels_last input for the
fused GELU -> BatchNorm, odd square kernel with stride 1 and 'same' padding for the depthwise conv),
the layers run PyTorch's own ops: same results, usual speed.

    n = use_fast_kernels(model)   # swaps fitting layers in place; same parameters and state_dict
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

_DWCONV_SOURCE = r"""
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

_GELU_BN_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 splat(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }

/* exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n via the exponent) */
static inline v16 vexp_neg(v16 x) {
    v16i low = x < splat(-87.0f);                    /* lanes of -1 where true */
    x = (v16)(((v16i)splat(-87.0f) & low) | ((v16i)x & ~low));
    v16 n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  /* round to nearest */
    v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)e;
}

/* cdf = Phi(z) = (1 + erf(z / sqrt 2)) / 2 and pdf = phi(z), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
   the formula PyTorch's vectorised CPU erf uses. */
static inline void phi(v16 z, v16 *cdf, v16 *pdf) {
    v16 x = z * splat(0.70710678f);
    v16i sign = (v16i)x & (int32_t)0x80000000;
    v16 ax = (v16)((v16i)x ^ sign);                  /* |x| */
    v16 t = splat(1.0f) / (splat(0.3275911f) * ax + splat(1.0f));
    v16 r = splat(1.061405429f);
    r = r * t + splat(-1.453152027f);
    r = r * t + splat(1.421413741f);
    r = r * t + splat(-0.284496736f);
    r = r * t + splat(0.254829592f);
    v16 e = vexp_neg(-ax * ax);                       /* exp(-z^2 / 2) */
    v16 erf_abs = splat(1.0f) - r * t * e;
    v16 erf = (v16)((v16i)erf_abs | sign);          /* erf is odd */
    *cdf = splat(0.5f) * (splat(1.0f) + erf);
    *pdf = e * splat(0.39894228f);
}

static inline v16 load_f32(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
static inline void store_f32(float *p, v16 v) { memcpy(p, &v, 64); }
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
static inline v16 load_bf16(const uint16_t *p) { v16h h; memcpy(&h, p, 32); return (v16)(__builtin_convertvector(h, v16u) << 16); }
static inline void store_bf16(uint16_t *p, v16 v) {  /* round to nearest even */
    v16u u = (v16u)v;
    u += 0x7FFF + ((u >> 16) & 1);
    v16h h = __builtin_convertvector(u >> 16, v16h);
    memcpy(p, &h, 32);
}

/* Each thread takes a contiguous range of 16-channel blocks and walks every pixel (N = B*H*W rows of C). */
#define THREAD_BLOCKS long nb = C / 16, t = omp_get_thread_num(), T = omp_get_num_threads(); \
    long cb0 = nb * t / T, cb1 = nb * (t + 1) / T

#define DEFINE(SUFFIX, TYPE, LOAD, STORE)                                                            \
/* y = gelu(z), stored; s[c] = sum y, q[c] = sum y^2 of the stored values (fp32 partials per 64 rows, \
   summed in double) */                                                                             \
void gelu_stats_##SUFFIX(const TYPE *z, TYPE *y, long N, long C, double *s, double *q) {             \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long c = cb0 * 16; c < cb1 * 16; c++) s[c] = q[c] = 0;                                  \
        for (long n0 = 0; n0 < N; n0 += 64) {                                                        \
            long n1 = n0 + 64 < N ? n0 + 64 : N;                                                     \
            for (long cb = cb0; cb < cb1; cb++) {                                                    \
                v16 ps = splat(0), pq = splat(0), cdf, pdf;                                          \
                for (long n = n0; n < n1; n++) {                                                     \
                    v16 zv = LOAD(z + n * C + cb * 16);                                              \
                    phi(zv, &cdf, &pdf);                                                             \
                    STORE(y + n * C + cb * 16, zv * cdf);                                            \
                    v16 yv = LOAD(y + n * C + cb * 16);  /* as stored (rounded for bf16) */          \
                    ps += yv; pq += yv * yv;                                                         \
                }                                                                                    \
                for (int l = 0; l < 16; l++) { s[cb * 16 + l] += ps[l]; q[cb * 16 + l] += pq[l]; }   \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
/* out = y * scale[c] + shift[c] */                                                                  \
void affine_##SUFFIX(const TYPE *y, TYPE *out, long N, long C, const float *scale, const float *shift) { \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long n = 0; n < N; n++)                                                                 \
            for (long cb = cb0; cb < cb1; cb++)                                                      \
                STORE(out + n * C + cb * 16,                                                         \
                      LOAD(y + n * C + cb * 16) * load_f32(scale + cb * 16) + load_f32(shift + cb * 16)); \
    }                                                                                                \
}                                                                                                    \
/* sd[c] = sum dout, sdy[c] = sum dout * y (fp32 partials per 64 rows, summed in double) */          \
void grad_stats_##SUFFIX(const TYPE *y, const TYPE *dout, long N, long C, double *sd, double *sdy) { \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long c = cb0 * 16; c < cb1 * 16; c++) sd[c] = sdy[c] = 0;                               \
        for (long n0 = 0; n0 < N; n0 += 64) {                                                        \
            long n1 = n0 + 64 < N ? n0 + 64 : N;                                                     \
            for (long cb = cb0; cb < cb1; cb++) {                                                    \
                v16 a = splat(0), b = splat(0);                                                      \
                for (long n = n0; n < n1; n++) {                                                     \
                    v16 g = LOAD(dout + n * C + cb * 16);                                            \
                    a += g; b += g * LOAD(y + n * C + cb * 16);                                      \
                }                                                                                    \
                for (int l = 0; l < 16; l++) { sd[cb * 16 + l] += a[l]; sdy[cb * 16 + l] += b[l]; }  \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
/* dz = (ka[c] * dout + kb[c] * y + kc[c]) * gelu'(z), gelu'(z) = Phi(z) + z phi(z) */               \
void gelu_bn_grad_##SUFFIX(const TYPE *z, const TYPE *y, const TYPE *dout, TYPE *dz, long N, long C, \
                           const float *ka, const float *kb, const float *kc) {                      \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long n = 0; n < N; n++)                                                                 \
            for (long cb = cb0; cb < cb1; cb++) {                                                    \
                long o = n * C + cb * 16;                                                            \
                v16 zv = LOAD(z + o), cdf, pdf;                                                      \
                phi(zv, &cdf, &pdf);                                                                 \
                v16 dy = load_f32(ka + cb * 16) * LOAD(dout + o) + load_f32(kb + cb * 16) * LOAD(y + o) \
                         + load_f32(kc + cb * 16);                                                   \
                STORE(dz + o, dy * (cdf + zv * pdf));                                                \
            }                                                                                        \
    }                                                                                                \
}

DEFINE(f32, float, load_f32, store_f32)
DEFINE(bf16, uint16_t, load_bf16, store_bf16)
"""

_LIBS: dict[str, ctypes.CDLL | None] = {}


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


def build_library(name: str, source: str, defines: list[str], signatures: dict,
                  suffixes: tuple[str, ...] = ("f32", "bf16")) -> ctypes.CDLL | None:
    """Build (once, cached by source + flags + CPU) and load a kernel library; None without a C compiler.

    `signatures` maps a function name to (restype, argtypes); the library defines it once per
    dtype, as `<name>_<suffix>` for each of `suffixes`."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *defines]
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{name}_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            try:
                done = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            except OSError as e:
                done = subprocess.CompletedProcess([cc], 1, "", str(e))
            if done.returncode != 0:
                warnings.warn(f"patchbench.kernels: {cc} could not build the {name} kernel, using PyTorch's "
                              f"(slower) path: {done.stderr.strip()[:300]}", stacklevel=4)
                return None
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(path))
    for fn_name, (restype, argtypes) in signatures.items():
        for suffix in suffixes:
            fn = getattr(lib, f"{fn_name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes
    return lib


_P, _L = ctypes.c_void_p, ctypes.c_long  # pointers (tensor.data_ptr()) and sizes
_SIGNATURES = {
    "dwconv": {"dw_wgrad": (ctypes.c_int, [_P] * 4 + [_L] * 4)},
    "gelu_bn": {"gelu_stats": (None, [_P, _P, _L, _L, _P, _P]), "affine": (None, [_P, _P, _L, _L, _P, _P]),
                "grad_stats": (None, [_P, _P, _L, _L, _P, _P]), "gelu_bn_grad": (None, [_P] * 4 + [_L] * 2 + [_P] * 3)},
}


def _library(name: str, kernel_size: int = 0) -> ctypes.CDLL | None:
    key = f"{name}{kernel_size or ''}"
    if key not in _LIBS:
        if name == "dwconv":
            _LIBS[key] = (build_library(f"dwconv_k{kernel_size}", _DWCONV_SOURCE, [f"-DKS={kernel_size}"], _SIGNATURES[name])
                          if kernel_size % 2 else None)
        else:
            _LIBS[key] = build_library(name, _GELU_BN_SOURCE, [], _SIGNATURES[name])
    return _LIBS[key]


def fast_depthwise_available(kernel_size: int = 7) -> bool:
    """True when the C depthwise-gradient kernel for this (odd) kernel size could be built and loaded here."""
    return _library("dwconv", kernel_size) is not None


def fast_gelu_bn_available() -> bool:
    """True when the fused GELU -> BatchNorm kernels could be built and loaded here."""
    return _library("gelu_bn") is not None


@torch.library.custom_op("patchbench::depthwise_param_grads", mutates_args=())
def depthwise_param_grads(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of a stride-1 'same' depthwise conv: input and output gradient, both
    (B, C, H, W), -> (C, 1, k, k) and (C,), fp32.

    A registered op (opaque to torch.compile) so compiled models can call it too.
    """
    lib = _library("dwconv", kernel_size)
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


def _suffix(x: torch.Tensor) -> str:
    return "f32" if x.dtype == torch.float32 else "bf16"


@torch.library.custom_op("patchbench::gelu_batch_norm", mutates_args=())
def gelu_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of gelu(z), z channels_last (B, C, H, W) fp32/bf16.

    Returns (out, y = gelu(z), batch mean, 1/sqrt(biased var + eps)); the last two (C,) in float64.
    """
    lib = _library("gelu_bn")
    B, C, H, W = z.shape
    y, out = torch.empty_like(z), torch.empty_like(z)
    s, q = z.new_empty(C, dtype=torch.float64), z.new_empty(C, dtype=torch.float64)
    getattr(lib, f"gelu_stats_{_suffix(z)}")(z.data_ptr(), y.data_ptr(), B * H * W, C, s.data_ptr(), q.data_ptr())
    mean = s / (B * H * W)
    rstd = (q / (B * H * W) - mean * mean).clamp_min(0).add(eps).rsqrt()
    scale = (weight.double() * rstd).float()
    shift = (bias.double() - mean * weight.double() * rstd).float()
    getattr(lib, f"affine_{_suffix(z)}")(y.data_ptr(), out.data_ptr(), B * H * W, C, scale.data_ptr(), shift.data_ptr())
    return out, y, mean, rstd


@gelu_batch_norm.register_fake
def _(z, weight, bias, eps):
    C = z.shape[1]
    return (torch.empty_like(z), torch.empty_like(z), z.new_empty(C, dtype=torch.float64),
            z.new_empty(C, dtype=torch.float64))


@torch.library.custom_op("patchbench::gelu_batch_norm_backward", mutates_args=())
def gelu_batch_norm_backward(z: torch.Tensor, y: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dz, dweight, dbias) of `gelu_batch_norm`; grad_out channels_last like z."""
    lib = _library("gelu_bn")
    B, C, H, W = z.shape
    n = B * H * W
    sd, sdy = z.new_empty(C, dtype=torch.float64), z.new_empty(C, dtype=torch.float64)
    getattr(lib, f"grad_stats_{_suffix(z)}")(y.data_ptr(), grad_out.data_ptr(), n, C, sd.data_ptr(), sdy.data_ptr())
    dbias = sd  # sum of dout
    dweight = rstd * (sdy - mean * sd)  # sum of dout * y_hat
    # d out / d y folded into one line per channel: dy = ka * dout + kb * y + kc
    a = weight.double() * rstd
    kb = -a * rstd * dweight / n
    ka, kc = a.float(), (-a * dbias / n - kb * mean).float()
    kb = kb.float()
    dz = torch.empty_like(z)
    getattr(lib, f"gelu_bn_grad_{_suffix(z)}")(z.data_ptr(), y.data_ptr(), grad_out.data_ptr(), dz.data_ptr(), n, C,
                                      ka.data_ptr(), kb.data_ptr(), kc.data_ptr())
    return dz, dweight.to(weight.dtype), dbias.to(weight.dtype)


@gelu_batch_norm_backward.register_fake
def _(z, y, grad_out, weight, mean, rstd):
    return torch.empty_like(z), torch.empty_like(weight), torch.empty_like(weight)


class _GELUBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, eps):
        out, y, mean, rstd = gelu_batch_norm(z, weight, bias, eps)
        ctx.save_for_backward(z, y, weight, mean, rstd)
        ctx.mark_non_differentiable(y, mean, rstd)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _mean, _rstd):
        z, y, weight, mean, rstd = ctx.saved_tensors
        grad_out = grad_out.to(z.dtype).contiguous(memory_format=torch.channels_last)
        dz, dweight, dbias = gelu_batch_norm_backward(z, y, grad_out, weight, mean, rstd)
        return dz, dweight, dbias, None


class GELUBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d of GELU(x): replaces the pair GELU -> BatchNorm2d (the GELU becomes nn.Identity).

    Same parameters, buffers and state_dict keys as the BatchNorm2d it replaces. Training on CPU with
    a channels_last input runs the fused C kernels; everything else (eval, other devices or layouts)
    runs F.gelu then BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4):
            return super().forward(F.gelu(x))
        out, mean, rstd = _GELUBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():  # what BatchNorm2d does with its buffers in training mode
            self.num_batches_tracked.add_(1)
            n = x.numel() / x.shape[1]
            var = (rstd.pow(-2) - self.eps) * (n / max(n - 1, 1))  # unbiased, as BatchNorm2d keeps it
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        return out


def _fits_gelu_bn(act: nn.Module, bn: nn.Module) -> bool:
    return (type(act) is nn.GELU and act.approximate == "none" and type(bn) is nn.BatchNorm2d
            and bn.affine and bn.track_running_stats and bn.momentum is not None and bn.num_features % LANES == 0)


def use_fast_kernels(model: nn.Module) -> int:
    """Swap fitting layers of `model` for the fast ones, in place; returns how many were swapped.

    Depthwise convs become FastDepthwiseConv2d; each GELU -> BatchNorm2d pair inside an nn.Sequential
    becomes nn.Identity -> GELUBatchNorm2d. Parameters and buffers are shared, not copied, so the
    state_dict is unchanged. Models without such layers (ViT, ResNet) are left exactly as they were,
    and so is everything where no C compiler is available. Call it before building the optimizer or
    wrapping the model (DDP, torch.compile).
    """
    swapped = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (name, child), (next_name, next_child) in zip(children, children[1:] + [(None, None)]):
            if type(child) is nn.Conv2d and _fits(child) and fast_depthwise_available(child.kernel_size[0]):
                fast = FastDepthwiseConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, padding=child.padding,
                    groups=child.groups, bias=child.bias is not None, device="meta",
                )
                fast.weight, fast.bias = child.weight, child.bias  # the same Parameters, not copies
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
            elif (isinstance(parent, nn.Sequential) and _fits_gelu_bn(child, next_child)
                  and fast_gelu_bn_available()):
                fused = GELUBatchNorm2d(next_child.num_features, eps=next_child.eps, momentum=next_child.momentum,
                                        device="meta")
                fused.weight, fused.bias = next_child.weight, next_child.bias
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(fused, buf, getattr(next_child, buf))
                fused.train(next_child.training)
                setattr(parent, name, nn.Identity())
                setattr(parent, next_name, fused)
                swapped += 1
    return swapped
