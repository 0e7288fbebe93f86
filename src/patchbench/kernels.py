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
- seed_convmixer's gained residual x + gain * BN(GELU(z)) folded into that kernel's affine pass (the
  gain into the per-channel scale and shift, the sum into the store): forward saves writing the
  BatchNorm's output, the product and their separate passes; backward, the product's two passes
  (dgain comes from the two per-channel sums the kernel computes anyway).

Each kernel is C source in patchbench/csrc/, compiled once with the system C compiler (~0.1 s,
`-O3 -march=native -fopenmp`, sharing torch's OpenMP threads) into a cache folder private to the
user, its SHA-256 recorded beside it; a cached library is loaded only when that digest, its owner
and its permissions check out, else it is built again (nothing foreign is ever loaded). Where no compiler is found, or a layer or input
does not fit the kernels' assumptions (CPU, channels divisible by 16, channels_last input for the
fused GELU -> BatchNorm, odd square kernel with stride 1 and 'same' padding for the depthwise conv),
the layers run PyTorch's own ops: same results, usual speed.

    n = use_fast_kernels(model)   # swaps fitting layers in place; same parameters and state_dict
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.device import cpu_features
from patchbench.models.layers import Residual

LANES = 16  # channels per vector in the C kernel (one 512-bit register of fp32)

_LIBS: dict[str, ctypes.CDLL | None] = {}
FAILURES: dict[str, str] = {}  # library name -> why it could not be built or loaded (recorded in config.json)


def kernel_dir() -> Path:
    """`<cache>/kernels`, a folder private to this user (0700, owned by us); made private if it is not,
    or, when it belongs to someone else, a fresh private folder for this process."""
    from patchbench.config import default_cache_dir

    path = default_cache_dir() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)
            st = path.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o077 and os.access(path, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    return private_dir()  # an unusable, read-only or foreign cache folder


_PRIVATE: Path | None = None


def _sha256_of(fd: int) -> str:
    """SHA-256 of the open file `fd` from its start (the descriptor stays open: the same file is loaded)."""
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "rb", closefd=False) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _trusted(path: Path) -> bool:
    """A file we may rely on: a regular file owned by us that nobody else can write."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load_verified(path: Path) -> ctypes.CDLL | None:
    """Load `path` only if it is the library we built: ours (owner, permissions) and its SHA-256 equal
    to the one recorded beside it at build time. The digest is taken from an open descriptor and
    that same file is loaded (through /proc/self/fd), so it cannot be swapped in between; the
    descriptor stays open, so its name stays unique to this library for the process."""
    digest_file = path.with_suffix(".sha256")
    if not (_trusted(path) and _trusted(digest_file)):
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if _sha256_of(fd) != digest_file.read_text().strip():
        os.close(fd)
        return None
    via_fd = f"/proc/self/fd/{fd}"
    if not os.path.exists(via_fd):  # no /proc (not Linux): by path, inside the private folder
        os.close(fd)
        return ctypes.CDLL(str(path))
    _OPEN_LIBRARIES.append(fd)
    return ctypes.CDLL(via_fd)


_OPEN_LIBRARIES: list[int] = []


def _source(file: str) -> str:
    return (resources.files("patchbench") / "csrc" / file).read_text()


def build_library(name: str, source_file: str, defines: list[str], signatures: dict,
                  suffixes: tuple[str, ...] = ("f32", "bf16")) -> ctypes.CDLL | None:
    """Build (once, cached by source + flags + CPU) and load a kernel library; None without a C compiler.

    `source_file` is a file of patchbench/csrc. The library is compiled into the private kernel
    folder with its SHA-256 recorded beside it, and loaded only after that digest checks out; a
    library that fails the check (changed, not ours, or writable by others) is built again.
    `signatures` maps a function name to (restype, argtypes); the library defines it once per
    dtype, as `<name>_<suffix>` for each of `suffixes`."""
    # $CC and $CFLAGS as a shell splits them (CC="ccache gcc"); CFLAGS come last, so "-march=x86-64-v3"
    # there builds for AVX2 CPUs instead of this one
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")]
    if cc[0] is None:
        FAILURES[name] = "no C compiler found ($CC, cc, gcc or clang)"
        return None
    source = _source(source_file)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *defines, *shlex.split(os.environ.get("CFLAGS", ""))]
    key = hashlib.sha256("\0".join([source, *cc, *flags, cpu_features()]).encode()).hexdigest()[:16]
    folder = kernel_dir()
    path = folder / f"{name}_{key}.so"
    lib = _load_verified(path)
    if lib is None:
        try:
            return _build(name, source, cc, flags, folder, path, signatures, suffixes)
        except OSError:  # the cache folder cannot take it (a folder in the library's place, ...): a private one
            try:
                folder = private_dir()
                return _build(name, source, cc, flags, folder, folder / path.name, signatures, suffixes)
            except OSError as e:
                FAILURES[name] = f"no folder could hold the built library ({e})"
                warnings.warn(f"patchbench.kernels: {FAILURES[name]}; using PyTorch's (slower) path", stacklevel=3)
                return None
    FAILURES.pop(name, None)
    return _bind(lib, signatures, suffixes)


def private_dir() -> Path:
    """A fresh folder private to this process, for kernels that the shared cache cannot hold."""
    global _PRIVATE
    if _PRIVATE is None:
        _PRIVATE = Path(tempfile.mkdtemp(prefix="patchbench-kernels-"))
    return _PRIVATE


def _bind(lib: ctypes.CDLL, signatures: dict, suffixes: tuple[str, ...]) -> ctypes.CDLL:
    for fn_name, (restype, argtypes) in signatures.items():
        for suffix in suffixes:
            fn = getattr(lib, f"{fn_name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes
    return lib


def _build(name: str, source: str, cc: list[str], flags: list[str], folder: Path, path: Path, signatures: dict,
           suffixes: tuple[str, ...]) -> ctypes.CDLL | None:
    """Compile `source` into `path` (in `folder`) with its digest beside it, then load it verified."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        try:
            done = subprocess.run([*cc, *flags, str(src), "-o", str(out)], check=False, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess([cc], 1, "", str(e))
        if done.returncode != 0:
            FAILURES[name] = f"{shlex.join(cc)} could not build it: {done.stderr.strip()[:200]}"
            warnings.warn(f"patchbench.kernels: {shlex.join(cc)} could not build the {name} kernel, using PyTorch's "
                          f"(slower) path: {done.stderr.strip()[:300]}", stacklevel=4)
            return None
        os.chmod(out, 0o600)
        fd = os.open(out, os.O_RDONLY)
        try:
            digest = _sha256_of(fd)
        finally:
            os.close(fd)
        record = Path(tmp) / "digest"
        record.write_text(digest + "\n")
        os.chmod(record, 0o600)
        os.replace(record, path.with_suffix(".sha256"))  # atomic: concurrent builders race harmlessly,
        os.replace(out, path)  # each writing a library and its own digest (the builds are identical)
    lib = _load_verified(path)
    if lib is None:
        FAILURES[name] = f"the library built in {folder} did not verify"
        warnings.warn(f"patchbench.kernels: the {name} kernel built in {folder} did not verify after "
                      f"building; using PyTorch's (slower) path", stacklevel=4)
        return None
    FAILURES.pop(name, None)
    return _bind(lib, signatures, suffixes)


_P, _L = ctypes.c_void_p, ctypes.c_long  # pointers (tensor.data_ptr()) and sizes
_SIGNATURES = {
    "dwconv": {"dw_wgrad": (ctypes.c_int, [_P] * 4 + [_L] * 4)},
    "gelu_bn": {"gelu_stats": (None, [_P, _P, _L, _L, _P, _P]), "affine": (None, [_P, _P, _L, _L, _P, _P]),
                "affine_res": (None, [_P, _P, _P, _L, _L, _P, _P]),
                "grad_stats": (None, [_P, _P, _L, _L, _P, _P]), "gelu_bn_grad": (None, [_P] * 4 + [_L] * 2 + [_P] * 3)},
}


def _library(name: str, kernel_size: int = 0) -> ctypes.CDLL | None:
    key = f"{name}{kernel_size or ''}"
    if key not in _LIBS:
        if name == "dwconv":
            _LIBS[key] = (build_library(f"dwconv_k{kernel_size}", "dwconv.c", [f"-DKS={kernel_size}"], _SIGNATURES[name])
                          if kernel_size % 2 else None)
        elif name == "gelu_bn_generic":  # without the kernel's three AVX-512 intrinsics: for comparisons
            _LIBS[key] = build_library(name, "gelu_bn.c", ["-DPB_GENERIC"], _SIGNATURES["gelu_bn"])
        else:
            _LIBS[key] = build_library(name, "gelu_bn.c", [], _SIGNATURES[name])
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
def gelu_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None,
                    gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of gelu(z), z channels_last (B, C, H, W) fp32/bf16; with `residual` (like
    z) and `gain` (a (1,) scalar) it returns residual + gain * that instead, in the same pass.

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
    if gain is not None:  # gain * (y * scale + shift), folded into the per-channel constants
        scale, shift = scale * gain.float(), shift * gain.float()
    if residual is None:
        getattr(lib, f"affine_{_suffix(z)}")(y.data_ptr(), out.data_ptr(), B * H * W, C, scale.data_ptr(),
                                             shift.data_ptr())
    else:
        getattr(lib, f"affine_res_{_suffix(z)}")(y.data_ptr(), residual.data_ptr(), out.data_ptr(), B * H * W, C,
                                                 scale.data_ptr(), shift.data_ptr())
    return out, y, mean, rstd


@gelu_batch_norm.register_fake
def _(z, weight, bias, eps, residual=None, gain=None):
    C = z.shape[1]
    return (torch.empty_like(z), torch.empty_like(z), z.new_empty(C, dtype=torch.float64),
            z.new_empty(C, dtype=torch.float64))


@torch.library.custom_op("patchbench::gelu_batch_norm_backward", mutates_args=())
def gelu_batch_norm_backward(z: torch.Tensor, y: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dz, dweight, dbias, dgain) of `gelu_batch_norm`; grad_out channels_last like z. With
    `gain`, grad_out is that of residual + gain * BN(gelu(z)) (the residual's own gradient is grad_out)
    and dgain = sum(grad_out * BN(gelu(z))); without it dgain is that sum too, unused."""
    lib = _library("gelu_bn")
    B, C, H, W = z.shape
    n = B * H * W
    sd, sdy = z.new_empty(C, dtype=torch.float64), z.new_empty(C, dtype=torch.float64)
    getattr(lib, f"grad_stats_{_suffix(z)}")(y.data_ptr(), grad_out.data_ptr(), n, C, sd.data_ptr(), sdy.data_ptr())
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
    kb = kb.float()
    dz = torch.empty_like(z)
    getattr(lib, f"gelu_bn_grad_{_suffix(z)}")(z.data_ptr(), y.data_ptr(), grad_out.data_ptr(), dz.data_ptr(), n, C,
                                      ka.data_ptr(), kb.data_ptr(), kc.data_ptr())
    return (dz, dweight.to(weight.dtype), dbias.to(weight.dtype),
            dgain.to(gain.dtype if gain is not None else weight.dtype))


@gelu_batch_norm_backward.register_fake
def _(z, y, grad_out, weight, bias, mean, rstd, gain=None):
    return (torch.empty_like(z), torch.empty_like(weight), torch.empty_like(weight),
            weight.new_empty(1, dtype=gain.dtype if gain is not None else weight.dtype))


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
    a channels_last fp32 or bf16 input runs the fused C kernels; everything else (eval, other devices,
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
    becomes nn.Identity -> GELUBatchNorm2d; a gained Residual (seed_convmixer's) whose branch then ends
    in one becomes FusedGainResidual. Parameters and buffers are shared, not copied, so the
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
