"""Throughput, achieved GFLOP/s, a measured matmul ceiling, and reference models measured side by side.

What is measured, exactly:
- A *train step* is forward + cross-entropy + backward + AdamW step (+ zero_grad), on a fixed random
  batch already on the device; an *infer step* is a forward pass under `torch.inference_mode`.
  Data loading is not included (benchmarks/epoch_time.py times whole epochs).
- Images/s is batch / median step time over `repeats` timed steps, after `warmup` untimed ones
  (which also absorb torch.compile's compilation).
- FLOPs are the forward pass's convolutions, linear layers, matrix products and attention as counted
  by `torch.utils.flop_counter` (the counter behind `patchbench models`' MACs, x2), times 3 for a
  train step (backward = input + weight gradients); normalisation, activations and the optimizer
  are not counted. Achieved GFLOP/s = FLOPs per image x
  images/s. The ceiling is a square matmul in the step's compute dtype timed in the same run, so
  `fraction_of_ceiling` says how far the step is from being matmul-bound on this device.
- Ours may run at `auto` settings, resolved as training resolves them: dtype `auto` is bf16 where
  the hardware computes it natively, else fp32; layout and kernels `auto` come from
  patchbench.autotune's probe (cached).
- With a reference (`against`), ours and the reference's steps alternate (A, B, A, B, ...) so that
  load from other processes hits both alike. The reference gets its own best settings: every
  dtype (fp32, bf16, and ours) x layout (NCHW, channels_last) x compile (only if ours compiles) is
  screened, and the fastest is measured against ours. A candidate whose first step takes over `cap`
  times the best first step so far is dropped after that step (and listed), so that a setting the
  hardware runs 10x slower costs one step, not a screening.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from patchbench.cpu.layers import use_fast_kernels
from patchbench.device import device_name, environment, resolve_device, synchronize
from patchbench.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("train", "infer")
AGAINST = ("timm", "torchvision")


@dataclass(frozen=True)
class Settings:
    """How a model is run: compute dtype (autocast below fp32), memory layout, torch.compile.
    `run_bench` also takes dtype and channels_last `auto` for ours (resolved before timing)."""

    dtype: str = "fp32"
    channels_last: bool | str = False
    compile: bool = False

    def __str__(self) -> str:
        return f"{self.dtype}{' channels_last' if self.channels_last else ''}{' compile' if self.compile else ''}"


@dataclass
class Measurement:
    label: str  # "ours" or the reference's name
    model: str
    settings: Settings
    params: int
    step_times_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times_s)


# ----------------------------------------------------------------------------- ceilings


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` on `device` (median of `repeats`): the practical peak.

    In fp32 on the CPU, torch.mm calls MKL's sgemm, which does not use AVX-512 on AMD CPUs (half of what
    the cores do there; docs/PERFORMANCE.md), while convolutions run through oneDNN: the ceiling is the
    faster of the two, so that a fraction of it means what it says."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    runs = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        am, bt = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        runs.append(lambda: torch._C._nn.mkldnn_linear(am, bt, None))  # a @ b through oneDNN
    best = 0.0
    for run in runs:
        times = []
        for i in range(repeats + 1):
            synchronize(device)
            t = time.perf_counter()
            run()
            synchronize(device)
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def flops_per_image(build: Callable[[], nn.Module], img_size: int, mode: str) -> float:
    """FLOPs of one image: the forward pass as counted by torch.utils.flop_counter (on the meta device, so
    nothing is computed), x3 for a train step (backward = input + weight gradients = 2x forward).

    The counter's own backward count is not used: it ignores `groups` in convolution_backward, so a
    depthwise conv's backward would be counted `channels` times over (torch 2.14).
    """
    with torch.device("meta"):
        model = build().eval()
        x = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() * (3 if mode == "train" else 1)


# ----------------------------------------------------------------------------- steps


def make_step(model: nn.Module, settings: Settings, *, mode: str, batch_size: int, img_size: int,
              device: torch.device, num_classes: int) -> Callable[[], None]:
    """A closure running one train (or infer) step of `model` with `settings` on a fixed random batch."""
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dtype = DTYPES[settings.dtype]
    amp = {"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32}
    run = torch.compile(model) if settings.compile else model

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(**amp):
                run(x)
        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one kernel for all parameters
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(**amp):
            logits = run(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Time each step `repeats` times, interleaved (A, B, A, B, ...): load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            t = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    return times


def warm_up(step: Callable[[], None], warmup: int, device: torch.device) -> float:
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- references


def reference_for(model: nn.Module, against: str) -> tuple[str, Callable[[], nn.Module]]:
    """(name, constructor) of the timm/torchvision model with the same parameter shapes as `model`.

    Read from the model's structure, so any registered size maps: ConvMixer <-> timm ConvMixer,
    ViT <-> timm VisionTransformer, ResNet-18 <-> torchvision resnet18. Raises UserError otherwise.
    """
    from patchbench.models.convmixer import ConvMixer
    from patchbench.models.resnet import ResNet
    from patchbench.models.vit import ViT

    num_classes = model.head[-1].out_features if isinstance(model.head, nn.Sequential) else model.head.out_features
    if isinstance(model, ConvMixer) and against == "timm":
        stem, block = model.stem[0], model.blocks[0]
        residual, act = block[0], type(model.stem[1])
        if stem.stride != stem.kernel_size or residual.gain is not None:
            raise UserError("--against timm: this ConvMixer has an overlapping stem or residual gains "
                            "(the study's notebook_convmixer), which timm's ConvMixer has not; bench a convmixer_* model")
        from timm.models.convmixer import ConvMixer as TimmConvMixer

        args = {"dim": stem.out_channels, "depth": len(model.blocks), "kernel_size": residual.fn[0].kernel_size[0],
                    "patch_size": stem.kernel_size[0], "in_chans": stem.in_channels, "num_classes": num_classes, "act_layer": act}
        return "timm ConvMixer", lambda: TimmConvMixer(**args)
    if isinstance(model, ViT) and against == "timm":
        from timm.models.vision_transformer import VisionTransformer

        block = model.blocks[0]
        args = {"img_size": model.default_img_size, "patch_size": model.patch_size,
                    "in_chans": model.patch_embed.in_channels, "num_classes": num_classes,
                    "embed_dim": model.patch_embed.out_channels, "depth": len(model.blocks),
                    "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / block.mlp.fc1.in_features,
                    "qkv_bias": True, "class_token": True, "global_pool": "token"}
        return "timm VisionTransformer", lambda: VisionTransformer(**args)
    if isinstance(model, ResNet) and against == "torchvision":
        depths = [len(stage) for stage in model.blocks]
        if depths != [2, 2, 2, 2] or model.stem.conv.kernel_size != (7, 7) or model.stem.conv.out_channels != 64:
            raise UserError("--against torchvision maps only resnet18 (standard stem, width 64)")
        import torchvision

        return "torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=num_classes)
    raise UserError(f"--against {against}: no equivalent for {type(model).__name__}; "
                    "use convmixer_* or vit_* with --against timm, resnet18 with --against torchvision")


def reference_candidates(ours: Settings, device: torch.device) -> list[Settings]:
    """The settings a reference is screened over, ours first: its best is at least as well equipped as ours."""
    dtypes = ["fp32", "bf16"] + ([ours.dtype] if ours.dtype not in ("fp32", "bf16") else [])
    compiles = [False, True] if ours.compile else [False]
    found = [Settings(d, cl, c) for c in compiles for d in dtypes for cl in (False, True)]
    return sorted(found, key=lambda s: s != ours)


def screen(build: Callable[[], nn.Module], candidates: list[Settings], *, warmup: int, cap: float,
           step_args: dict, log: Callable[[str], None]) -> tuple[dict[Settings, Callable[[], None]], list[str]]:
    """Warm-up steps for each candidate; one whose first step is over `cap` x the best first step is
    dropped after that step. Returns the surviving steps and a line for each dropped candidate."""
    steps, first, dropped = {}, {}, []
    device = step_args["device"]
    for s in candidates:
        step = make_step(build(), s, **step_args)
        first[s] = warm_up(step, 1, device)
        if first[s] > cap * min(first.values()):
            dropped.append(f"[{s}] first step {first[s]:.1f}s > {cap:g}x the best {min(first.values()):.1f}s")
            continue
        warm_up(step, warmup - 1, device)
        steps[s] = step
    for s in list(steps):  # a candidate screened before a much faster one was found
        if first[s] > cap * min(first.values()):
            dropped.append(f"[{s}] first step {first[s]:.1f}s > {cap:g}x the best {min(first.values()):.1f}s")
            del steps[s]
    for line in dropped:
        log(f"  dropped {line}")
    return steps, dropped


# ----------------------------------------------------------------------------- the benchmark


def run_bench(model_name: str, *, img_size: int, batch_size: int, settings: Settings, mode: str = "train",
              against: str | None = None, repeats: int = 5, warmup: int = 2, device: str = "auto",
              fast_kernels: bool | str = True, num_classes: int = 10, cap: float = 3.0, cache_dir=None,
              log: Callable[[str], None] = print) -> dict:
    """Measure `model_name` (and a reference) and return the dict that goes into bench.json."""
    from patchbench.autotune import resolve
    from patchbench.device import resolve_amp
    from patchbench.flops import count_params
    from patchbench.models import create_model

    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if settings.dtype not in (*DTYPES, "auto"):
        raise UserError(f"--dtype {settings.dtype!r} is not one of {', '.join(DTYPES)}, auto")
    if against is not None and against not in AGAINST:
        raise UserError(f"--against {against!r} is not one of {', '.join(AGAINST)}")
    for flag, value in [("--img-size", img_size), ("--batch-size", batch_size), ("--repeats", repeats)]:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if warmup < 1:
        raise UserError(f"--warmup must be >= 1, got {warmup}")
    dev = resolve_device(device)
    torch.manual_seed(0)

    def build():
        return create_model(model_name, num_classes=num_classes, img_size=img_size)

    model = build()
    reference = reference_for(model, against) if against is not None else None  # fail before any timing
    flops = flops_per_image(build, img_size, mode)
    resolved = []
    if settings.dtype == "auto":
        amp, why = resolve_amp("auto", dev)
        settings = dataclasses.replace(settings, dtype={"none": "fp32"}.get(amp, amp))
        resolved.append(f"dtype {why}")
    if "auto" in (settings.channels_last, fast_kernels):
        from patchbench.config import default_cache_dir

        speed = resolve(build, channels_last=settings.channels_last, fast_kernels=fast_kernels, device=dev,
                        batch_size=batch_size, img_size=img_size, amp={"fp32": "none"}.get(settings.dtype, settings.dtype),
                        num_classes=num_classes, setting={"model": model_name, "overrides": {}},
                        cache_dir=cache_dir or default_cache_dir(), log=log)
        settings, fast_kernels = dataclasses.replace(settings, channels_last=speed.choice.channels_last), \
            speed.choice.fast_kernels
        resolved.append(f"layout and kernels auto: {speed.choice} ({speed.how})")
    swapped = use_fast_kernels(model) if fast_kernels and mode == "train" and dev.type == "cpu" else 0
    ours = Measurement("ours", model_name, settings, count_params(model))
    ours.notes += resolved
    if swapped:
        ours.notes.append(f"{swapped} layers swapped for patchbench.cpu's (depthwise conv, GELU -> BatchNorm, gained residual)")
    step_args = {"mode": mode, "batch_size": batch_size, "img_size": img_size, "device": dev, "num_classes": num_classes}
    steps = {"ours": make_step(model, settings, **step_args)}
    log(f"ours: {model_name} [{settings}] warm-up {warm_up(steps['ours'], warmup, dev):.1f}s")

    ref = None
    if reference is not None:
        ref_name, ref_build = reference
        screened, dropped = screen(ref_build, reference_candidates(settings, dev), warmup=warmup, cap=cap,
                                   step_args=step_args, log=log)
        times = time_steps(screened, 2, dev)
        for s in screened:
            log(f"  {ref_name} [{s}]: {statistics.median(times[s]) * 1e3:.0f} ms/step (screening)")
        best = min(screened, key=lambda s: statistics.median(times[s]))
        ref = Measurement(ref_name, ref_name, best, count_params(ref_build()))
        ref.notes.append("best of " + ", ".join(f"[{s}] {statistics.median(times[s]) * 1e3:.0f} ms" for s in screened))
        ref.notes += [f"dropped {line}" for line in dropped]
        if ref.params != ours.params:
            ref.notes.append(f"parameter count differs from ours: {ref.params:,} vs {ours.params:,}")
        steps[ref_name] = screened[best]
        del screened

    times = time_steps(steps, repeats, dev)
    ours.step_times_s = times["ours"]
    if ref is not None:
        ref.step_times_s = times[ref.label]

    dtypes = {settings.dtype} | ({ref.settings.dtype} if ref is not None else set())
    ceilings = {d: matmul_ceiling(dev, DTYPES[d]) for d in sorted(dtypes)}
    result = {
        "model": model_name, "mode": mode, "img_size": img_size, "batch_size": batch_size, "repeats": repeats,
        "warmup": warmup, "device": str(dev), "device_name": device_name(dev),
        "flops_per_image": flops,
        "flops_note": "torch.utils.flop_counter forward FLOPs (conv/linear/matmul/attention)"
                      + (" x3 for forward + backward" if mode == "train" else "") + "; norms, activations, optimizer not counted",
        "matmul_ceiling_gflops": ceilings, "matmul_ceiling_note": "2048x2048x2048 matmul, median of 5, same run",
        "results": [summarise(m, batch_size, flops, ceilings) for m in [ours] + ([ref] if ref else [])],
        "env": {**environment(dev), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                **reference_versions()},
    }
    if ref is not None:
        result["ratio"] = ref.step_s / ours.step_s  # ours / reference in images per second
    return result


def summarise(m: Measurement, batch_size: int, flops: float, ceilings: dict[str, float]) -> dict:
    images_per_s = batch_size / m.step_s
    gflops = flops * images_per_s / 1e9
    return {
        "label": m.label, "model": m.model, "settings": dataclasses.asdict(m.settings), "params": m.params,
        "step_s": m.step_s, "step_times_s": m.step_times_s, "images_per_s": images_per_s,
        "achieved_gflops": gflops, "fraction_of_ceiling": gflops / ceilings[m.settings.dtype], "notes": m.notes,
    }


def reference_versions() -> dict:
    """timm's version when it is installed (the references come from it)."""
    try:
        import timm
    except ImportError:
        return {}
    return {"timm": timm.__version__}


def format_table(result: dict) -> str:
    rows = ["| model | settings | params | step (ms) | images/s | GFLOP/s | of ceiling |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        s = Settings(**r["settings"])
        rows.append(f"| {r['model']} | {s} | {r['params']:,} | {r['step_s'] * 1e3:.0f} | {r['images_per_s']:.1f} "
                    f"| {r['achieved_gflops']:.0f} | {r['fraction_of_ceiling']:.0%} |")
    return "\n".join(rows)
