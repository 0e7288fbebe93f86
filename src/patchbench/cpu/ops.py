"""The Python side of torch.ops.patchbench: whether the operators can be used here, and the shape of
what each returns (for FakeTensor, meta tensors and torch.compile, which then treat them as opaque).

    available()                        # builds and loads them the first time; False where they cannot be
    torch.ops.patchbench.gelu_stats(z) # then call them through torch.ops (every input is checked there)
"""

from __future__ import annotations

import torch

from patchbench.cpu import build

_FAKES = False


def available() -> bool:
    """True when the operators are built and loaded in this process (the first call builds them)."""
    global _FAKES
    if not build.load():
        return False
    if not _FAKES:
        _register_fakes()
        _FAKES = True
    return True


def _on_cpu(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device.type == "cpu", lambda n=name, d=t.device: f"{op}: {n} must be a CPU tensor, "
                                                                            f"got one on {d}")


def _register_fakes() -> None:
    lib = "patchbench::"

    @torch.library.register_fake(lib + "gelu_stats")
    def _(z):
        _on_cpu("gelu_stats", z=z)
        c = z.shape[1]
        return torch.empty_like(z), z.new_empty(c, dtype=torch.float64), z.new_empty(c, dtype=torch.float64)

    @torch.library.register_fake(lib + "bn_affine")
    def _(y, scale, shift, residual=None):
        _on_cpu("bn_affine", y=y, scale=scale, shift=shift, residual=residual)
        return torch.empty_like(y)

    @torch.library.register_fake(lib + "bn_grad_stats")
    def _(y, grad_out):
        _on_cpu("bn_grad_stats", y=y, grad_out=grad_out)
        c = y.shape[1]
        return y.new_empty(c, dtype=torch.float64), y.new_empty(c, dtype=torch.float64)

    @torch.library.register_fake(lib + "gelu_bn_grad")
    def _(z, y, grad_out, ka, kb, kc):
        _on_cpu("gelu_bn_grad", z=z, y=y, grad_out=grad_out, ka=ka, kb=kb, kc=kc)
        return torch.empty_like(z)

    @torch.library.register_fake(lib + "depthwise_param_grads")
    def _(x, grad_out, kernel_size):
        _on_cpu("depthwise_param_grads", x=x, grad_out=grad_out)
        c = x.shape[1]
        return (x.new_empty((c, 1, kernel_size, kernel_size), dtype=torch.float32),
                x.new_empty(c, dtype=torch.float32))
