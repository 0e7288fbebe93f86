"""What each of patchbench's CPU measures gains, against PyTorch's defaults and against an earlier build.

The measures (patchbench.cpu): the operators in the model (depthwise weight gradient, GELU ->
BatchNorm fused, the gained residual folded in), the malloc policy, the thread tuner. A workload is
the trainer's train step on real batches: the Loader over the prepared split (crop, flip,
normalise), forward, cross-entropy, backward, AdamW. Each side runs in its own child process (the
malloc policy is process-wide), timing --steps steps after --warmup; the sides take turns in
--rounds rounds (the order rotates each round) and each side's figure is the median of its rounds.
Sides:

- all on: what the trainer does on this CPU;
- one measure off at a time, and the operators on their AVX2 or portable code instead of the best
  this CPU has (PATCHBENCH_CPU_ISA);
- all off: PyTorch's ops, glibc's malloc, a fixed thread count (channels_last and the precision
  stay the workload's);
- --against DIR: all on with the patchbench source tree DIR (e.g. a git worktree of an earlier
  commit), to check a change of the code did not cost speed; and that tree with its loader's C crop
  kernel turned off, where it has one (earlier versions cropped with it; torch's crop replaced it).

It prints a table of images/s and, per side, `ratio_<side>=<all on / side>` (above 1: the measure
pays; for the last side, `against / side`). Run it on a quiet machine: another busy process makes
the figures meaningless.

    .venv/bin/python benchmarks/cpu_levers.py --data ../shared/datasets/imagenette2-160.tgz
    .venv/bin/python benchmarks/cpu_levers.py --workload notebook --against /tmp/base/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# workload -> (preset, model, model overrides, train overrides)
OLD_NAMES = {"notebook": "seed", "notebook_convmixer": "seed_convmixer"}  # in source trees before the renaming
WORKLOADS = {
    "budget": ("budget", "convmixer_256_12", {"dim": 240, "patch_size": 8, "kernel_size": 7},
               {"amp": "none", "channels_last": True}),
    "notebook": ("notebook", "notebook_convmixer", {}, {"amp": "auto", "channels_last": True}),
}
MEASURES = ("operators", "malloc", "tuner")
SIDES = {  # name -> (key of its ratio line, measures off, environment, use --against's source)
    "all on": ("all_on", (), {}, False),
    "operators off": ("operators", ("operators",), {}, False),
    "operators on AVX2 code": ("operators_avx2", (), {"PATCHBENCH_CPU_ISA": "avx2"}, False),
    "operators on portable code": ("operators_generic", (), {"PATCHBENCH_CPU_ISA": "generic"}, False),
    "malloc policy off": ("malloc", ("malloc",), {"PATCHBENCH_MALLOC": "default"}, False),
    "thread tuner off": ("tuner", ("tuner",), {}, False),
    "all off": ("all_off", MEASURES, {"PATCHBENCH_MALLOC": "default"}, False),
    "all on, the --against code": ("against", (), {}, True),
    "the --against code, its crop kernel off": ("against_crop", ("crop",), {}, True),
}


def child(args) -> None:
    """One side: time the workload's train steps with `args.off` measures off; print images/s as JSON."""
    import dataclasses
    import functools
    import time

    import torch
    import torch.nn.functional as F

    from patchbench.data import Loader, augment, prepare
    from patchbench.device import autocast, resolve_amp
    from patchbench.optim import create_optimizer
    from patchbench.train import build_model
    try:  # this source tree, or one from before patchbench.cpu and patchbench.recipes
        from patchbench.cpu.layers import use_fast_kernels
        from patchbench.cpu.memory import keep_freed_memory
        from patchbench.cpu.threads import ThreadTuner
        from patchbench.recipes import get_preset
    except ImportError:
        from patchbench.kernels import use_fast_kernels
        from patchbench.threads import ThreadTuner

        from patchbench.config import get_preset
        from patchbench.device import keep_freed_memory

    off = set(args.off.split(",")) if args.off else set()
    from patchbench.models import list_models

    preset, model_name, model_args, train_args = WORKLOADS[args.workload]
    if model_name not in list_models():
        preset, model_name = OLD_NAMES.get(preset, preset), OLD_NAMES.get(model_name, model_name)
    cfg = get_preset(preset).config_for(model_name, **model_args)
    amp = train_args["amp"]
    if amp == "auto":  # (precision, why)
        amp = resolve_amp(amp, torch.device("cpu"))[0]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=args.data),
                              train=dataclasses.replace(cfg.train, amp=amp, channels_last=train_args["channels_last"]))
    keep_freed_memory()  # a no-op where PATCHBENCH_MALLOC=default opts out
    if "crop" in off:  # a source tree with a C crop kernel: its torch path instead
        augment._crop_resize_cpu = functools.partial(augment._crop_resize_cpu, kernel=False)
    data = prepare(cfg.data, progress=False)
    model = build_model(cfg, len(data.classes))
    swapped = 0 if "operators" in off else use_fast_kernels(model)
    model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
    optimizer = create_optimizer(model, cfg.train)
    loader = Loader(data.train, cfg.data, batch_size=cfg.train.batch_size, train=True, device="cpu", seed=0)
    loader.set_epoch(0, img_size=cfg.data.img_size)
    tuner = None if "tuner" in off else ThreadTuner()
    model.train()
    batches, seconds, images = iter(loader), 0.0, 0
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        if tuner:
            tuner.step_begins()
        x, y = next(batches)
        x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
        with autocast(torch.device("cpu"), amp):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if tuner:
            tuner.step_ends()
        if i >= args.warmup:
            seconds += time.perf_counter() - start
            images += len(y)
    crop = "torch's ops (the C kernel turned off)" if "crop" in off else loader.crop_path()
    print(json.dumps({"images_per_s": images / seconds, "swapped": swapped, "amp": amp,
                      "threads": torch.get_num_threads(), "crop": crop}))


def run_side(args, name: str, here: Path) -> dict:
    _, off, env, against = SIDES[name]
    source = Path(args.against) if against else here
    cmd = [sys.executable, __file__, "--child", "--workload", args.workload, "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--off", ",".join(off)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PATCHBENCH_MALLOC",
                                                                      "PATCHBENCH_CPU_ISA"))}
    done = subprocess.run(cmd, env={**base, **env, "PYTHONPATH": str(source)}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"cpu_levers.py: the side '{name}' failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="budget")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
                                         / "imagenette2-160.tgz"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", default=None, help="a patchbench source folder (its src/) to time all on")
    p.add_argument("--sides", default=None, help="comma-separated keys of the sides to time besides all_on "
                   f"(default: all; keys: {', '.join(k for k, *_ in SIDES.values())})")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--off", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    here = Path(__file__).resolve().parents[1] / "src"
    sides = [s for s in SIDES if args.against or not SIDES[s][3]]
    against_augment = Path(args.against) / "patchbench" / "data" / "augment.py" if args.against else None
    if against_augment is None or "kernel=True" not in against_augment.read_text():  # no C crop kernel there
        sides = [s for s in sides if SIDES[s][0] != "against_crop"]
    if args.sides:
        keep = {"all_on", *args.sides.split(",")}
        sides = [s for s in sides if SIDES[s][0] in keep]
    rates: dict[str, list[float]] = {s: [] for s in sides}
    info: dict[str, dict] = {}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for name in order:
            info[name] = run_side(args, name, here)
            rates[name].append(info[name]["images_per_s"])
        print(f"round {r + 1}: " + ", ".join(f"{s} {rates[s][-1]:.1f}" for s in sides), file=sys.stderr, flush=True)
    import torch

    from patchbench.device import environment

    env = environment()
    preset, model, model_args, _ = WORKLOADS[args.workload]
    print(f"workload {args.workload}: {model}({', '.join(f'{k}={v}' for k, v in model_args.items())}) with the "
          f"{preset} preset, precision {info['all on']['amp']}, channels_last, {args.steps} timed train steps "
          f"after {args.warmup}, median of {args.rounds} rounds; CPU {env['cpu']} ({env['cpu_flags']}), torch "
          f"{torch.__version__}, {info['all on']['threads']} threads, git {env['git_commit'][:10]}"
          f"{' (dirty)' if env['git_dirty'] else ''}")
    print("| side | images/s | rounds | layers swapped | crop |")
    print("|---|---:|---|---:|---|")
    median = {s: statistics.median(v) for s, v in rates.items()}
    for s in sides:
        print(f"| {s} | {median[s]:.1f} | {', '.join(f'{v:.1f}' for v in rates[s])} | {info[s]['swapped']} | "
              f"{info[s]['crop']} |")
    for s in sides[1:]:
        base = "all on, the --against code" if SIDES[s][0] == "against_crop" else "all on"
        print(f"ratio_{SIDES[s][0]}={median[base] / median[s]:.2f}")


if __name__ == "__main__":
    main()
