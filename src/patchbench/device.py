"""Devices in one place: names (`auto | cpu | cuda | cuda:N`), mixed precision, the CPU's identity.

Used by train, evaluate and bench (and, for the name check alone, by config). Only the functions
that need torch import it, so checking a device name costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import re

from patchbench.errors import UserError

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bf16 dot-product instructions


def check_device_name(name: str, flag: str = "--device") -> str:
    """`name` if it is a device name patchbench understands, else UserError naming `flag`."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"{flag} {name!r}: use {DEVICE_NAMES}")
    return name


def resolve_device(name: str, local_rank: int = 0, flag: str = "--device"):
    """auto | cpu | cuda | cuda:N -> a torch.device that exists here (UserError otherwise).

    `auto` is the GPU of this process's `local_rank` when CUDA is available, else the CPU; a bare
    `cuda` is the GPU of `local_rank` (torchrun's LOCAL_RANK), so every process takes its own.
    """
    import torch

    check_device_name(name, flag)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    index = local_rank if name == "cuda" else int(name[5:])
    if index >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(f"cuda:{index}")


def amp_dtype(amp: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device, amp: str):
    """Mixed precision for the forward pass when `amp` is bf16/fp16; a no-op context for `none`."""
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(amp))


def native_bf16(device, flags: str | None = None) -> str | None:
    """Why `device` computes bf16 natively (the CPU flag, or the GPU's name), or None where it does not.

    A CPU without AMX or AVX512-BF16 emulates bf16 matmuls and convolutions, many times slower than
    fp32 (docs/PERFORMANCE.md). `flags` replaces the CPU's own flags (tests)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    have = set((cpu_features() if flags is None else flags).split())
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in have), None)


def resolve_amp(amp: str, device, flags: str | None = None) -> tuple[str, str]:
    """(the precision to train in, why): `auto` is bf16 where `device` computes it natively, else none
    (fp32); any other value is kept as given."""
    if amp != "auto":
        return amp, "given"
    why = native_bf16(device, flags)
    return ("bf16", f"auto: native bf16 ({why})") if why else ("none", "auto: no native bf16, fp32")


def synchronize(device) -> None:
    """Wait for queued work on an asynchronous accelerator; a no-op on the CPU."""
    import torch

    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize(device)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_name() -> str:
    info = cpu_info()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_features() -> str:
    """The CPU's feature flags (what speed settings and probes are keyed by)."""
    info = cpu_info()
    return info.get("flags") or info.get("Features") or f"{platform.machine()} {platform.processor()}"


def git_state() -> tuple[str | None, bool | None]:
    """(the commit patchbench runs from, whether its tracked files differ from it); (None, None) outside git."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        if commit is None:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], check=False, cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def environment(device=None, world_size: int = 1) -> dict:
    """What a measurement or a run ran on: the software's versions and git state, the processor (model and
    the vector flags that decide speed), the device and threads."""
    import numpy as np
    import torch
    import torchvision

    import patchbench

    commit, dirty = git_state()
    flags = [f for f in cpu_features().split() if f in ("avx2", "avx512f", *NATIVE_BF16_FLAGS) or f.startswith("amx")]
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "patchbench": patchbench.__version__,
           "python": platform.python_version(), "numpy": np.__version__, "git_commit": commit, "git_dirty": dirty,
           "cpu": cpu_name(), "cpu_flags": " ".join(flags), "world_size": world_size,
           "threads": torch.get_num_threads()}
    if device is not None:
        env["device"] = f"{device} ({device_name(device)})"
    return env


def device_name(device) -> str:
    """A human name: the GPU's model, or the CPU's model and torch's thread count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"
