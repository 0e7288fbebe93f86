"""A preset's models on this machine: train images/s at every setting, what `auto` picks, the ceilings.

For each model of the preset (sized to its parameter budget, as `compare` sizes it) a train step
(forward, cross-entropy, backward, AdamW; a fixed random batch) is timed at every combination of
precision {fp32, bf16} x layout {NCHW, channels_last} x patchbench's CPU operators {off, on} (on only
where a kernel fits the model). Each setting's first step screens it: one over --cap times the best
first step is dropped (shown as "dropped"). The survivors are timed in --rounds interleaved rounds
(median); the old preset's setting is always timed. Then:

- `auto`: what a new study resolves here: amp=auto (bf16 only where the CPU computes it natively),
  layout and kernels from patchbench.autotune's probe (run afresh, not from the cache), looked up in
  this run's table;
- `old preset`: the settings the preset used before `auto` (bf16 + channels_last + kernels for the
  conv families, fp32 NCHW for the ViT);
- ratios: auto / fastest (1.00 = auto picked the best), auto / old preset.

Ceilings: a 2048^3 matmul in fp32 through torch (MKL's sgemm on x86), in fp32 through oneDNN, and in
bf16 (oneDNN), in GFLOP/s: on AMD CPUs MKL's sgemm does not use AVX-512, and oneDNN's fp32 matmul
(the library behind torch's convolutions) shows what the cores can do.

    .venv/bin/python benchmarks/cpu_settings.py                       # the fair preset, 128px, batch 64
    .venv/bin/python benchmarks/cpu_settings.py --models resnet18 --rounds 5
    .venv/bin/python benchmarks/cpu_settings.py --emulate-avx2   # an AVX-512 CPU posing as AVX2-only

--emulate-avx2 reruns the script with oneDNN and ATen capped at AVX2 (ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY), patchbench's operators on their AVX2 code (PATCHBENCH_CPU_ISA) and the CPU's AVX-512 and AMX
flags hidden from patchbench (so amp=auto sees no native bf16). An emulation, not an AVX2 CPU: MKL
(fp32 torch.mm) and the memory system stay this machine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import patchbench.device
from patchbench.autotune import resolve
from patchbench.bench import Settings, make_step, screen, time_steps
from patchbench.cpu.layers import use_fast_kernels
from patchbench.device import NATIVE_BF16_FLAGS, cpu_name, resolve_amp
from patchbench.models import create_model, label
from patchbench.recipes import get_preset
from patchbench.study import match_budget

CPU = torch.device("cpu")
OLD_PRESET = {"vit": Settings("fp32", False)}  # the fair preset before `auto`; every other family:
OLD_CONV = Settings("bf16", True)  # bf16 autocast, channels_last, kernels on


def ceilings(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul: fp32 via torch.mm (MKL), fp32 via oneDNN, bf16 via torch.mm (oneDNN)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs = {"fp32 torch.mm": lambda: a @ b, "bf16 torch.mm": lambda: a16 @ b16}
    a16, b16 = a.bfloat16(), b.bfloat16()
    if torch.backends.mkldnn.is_available():
        am, bm = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        runs["fp32 oneDNN"] = lambda: torch._C._nn.mkldnn_linear(am, bm, None)  # x @ w.T, w = b.T
    out = {}
    for name, fn in runs.items():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
    return out


def family(model: str) -> str:
    return model.split("_")[0].rstrip("0123456789")


def bench_model(name: str, overrides: dict, args) -> dict:
    def build():
        return create_model(name, num_classes=10, img_size=args.img_size, **overrides)

    kernels_apply = use_fast_kernels(build()) > 0
    grid = [(Settings(d, cl), k) for d in ("fp32", "bf16") for cl in (False, True)
            for k in ((False, True) if kernels_apply else (False,))]
    step_args = {"mode": "train", "batch_size": args.batch_size, "img_size": args.img_size, "device": CPU, "num_classes": 10}
    # screen() builds a model per candidate; each grid entry carries its kernel switch in the builder
    steps, dropped = {}, []
    for kernels in sorted({k for _, k in grid}):
        def build_k(kernels=kernels):
            m = build()
            if kernels:
                use_fast_kernels(m)
            return m
        got, _lost = screen(build_k, [s for s, k in grid if k == kernels], warmup=1, cap=args.cap,
                           step_args=step_args, log=lambda line, kernels=kernels: print(f"  {name} kernels {'on' if kernels else 'off'}:"
                                                                        f"{line}", file=sys.stderr))
        steps.update({(s, kernels): step for s, step in got.items()})
        dropped += [(s, kernels) for s, k in grid if k == kernels and s not in got]
    old = (OLD_PRESET.get(family(name), OLD_CONV), family(name) != "vit" and kernels_apply)
    if old not in steps:  # timed even when the screen dropped it: the ratio against it is a target
        model = build()
        if old[1]:
            use_fast_kernels(model)
        steps[old] = make_step(model, old[0], **step_args)
        dropped.remove(old)
    times = time_steps(steps, args.rounds, CPU)
    rate = {key: args.batch_size / statistics.median(t) for key, t in times.items()}
    amp, _ = resolve_amp("auto", CPU)
    with tempfile.TemporaryDirectory() as cache:  # a fresh probe, as a new machine would run it
        speed = resolve(build, channels_last="auto", fast_kernels="auto", device=CPU, batch_size=args.batch_size,
                        img_size=args.img_size, amp=amp, num_classes=10, setting={"model": name, **overrides},
                        cache_dir=Path(cache))
    auto = (Settings("bf16" if amp == "bf16" else "fp32", speed.choice.channels_last), speed.choice.fast_kernels)
    return {"label": label(name, overrides), "grid": grid, "rate": rate, "dropped": dropped, "auto": auto,
            "old": old, "choice": speed.choice}


def cell(result: dict, key) -> str:
    if key in result["rate"]:
        return f"{result['rate'][key]:.1f}"
    return "dropped" if key in result["dropped"] else "–"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fair")
    p.add_argument("--models", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cap", type=float, default=4.0)
    p.add_argument("--emulate-avx2", action="store_true", help="pose as an AVX2-only CPU (see the docstring)")
    args = p.parse_args()
    if args.emulate_avx2:
        emulated = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PATCHBENCH_CPU_ISA": "avx2"}
        if any(os.environ.get(k) != v for k, v in emulated.items()):  # torch reads these when it loads
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **emulated})
        real = patchbench.device.cpu_features()
        hidden = " ".join(f for f in real.split() if not f.startswith(("avx512", "amx")))
        patchbench.device.cpu_features = lambda: hidden
        print("emulating an AVX2-only CPU: " + ", ".join(f"{k}={v}" for k, v in emulated.items())
              + "; AVX-512/AMX flags hidden")
    preset = get_preset(args.preset)
    models = args.models.split(",") if args.models else preset.models
    flags = [f for f in patchbench.device.cpu_features().split()
             if f in ("avx2", "avx512f", *NATIVE_BF16_FLAGS) or f.startswith("amx")]
    print(f"CPU: {cpu_name()}; flags: {' '.join(flags)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("matmul 2048^3 (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings().items()))
    print(f"train step, batch {args.batch_size} at {args.img_size}px, images/s (median of {args.rounds} interleaved "
          f"rounds; a setting whose first step is over {args.cap:g}x the best is dropped)\n")
    kinds = [(Settings(d, cl), k) for d in ("fp32", "bf16") for cl in (False, True) for k in (False, True)]
    head = [f"{s.dtype} {'CL' if s.channels_last else 'NCHW'}{' +k' if k else ''}" for s, k in kinds]
    print("| model | " + " | ".join(head) + " | auto | auto / fastest | auto / old preset |")
    print("|---|" + "---:|" * (len(head) + 3))
    for name in models:
        overrides = preset.model_overrides(name)
        if preset.inherited("param_budget"):
            overrides, _ = match_budget(name, preset.inherited("param_budget"), num_classes=10,
                                        img_size=args.img_size, base=overrides)
        r = bench_model(name, overrides, args)
        auto = r["rate"].get(r["auto"])
        best = max(r["rate"].values())
        old = r["rate"].get(r["old"])
        shown_auto = f"{auto:.1f} ({r['auto'][0].dtype}, {r['choice']})" if auto else f"not timed ({r['choice']})"
        print(f"| {r['label']} | " + " | ".join(cell(r, k) for k in kinds) + f" | {shown_auto} | "
              + (f"{auto / best:.2f}" if auto else "–") + " | "
              + (f"{auto / old:.2f}" if auto and old else "old setting dropped" if auto else "–") + " |", flush=True)
    print("\n+k: patchbench.cpu's operators on (only where a kernel fits); CL: channels_last; old preset: bf16 CL +k for the "
          "conv families, fp32 NCHW for the ViT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
