"""A/B of ConvMixer train steps: timm's and ours, plain and with patchbench.cpu's operators, several settings.

Each variant is a train step (forward + cross-entropy + backward + AdamW) of ConvMixer-256/12, k7,
p7 at 160px on a fixed random batch. All variants live in one process and are timed interleaved
(A, B, C, A, B, C, ...) so that load from other processes hits all of them alike; the table gives
median and min step times and each variant's speed relative to the first.

Variant names: `timm` | `ours` (create_model, plain) | `fast` (ours + use_fast_kernels), then any of
`-bf16` (autocast), `-cl` (channels_last), `-compile` (torch.compile).

    .venv/bin/python benchmarks/convmixer_step.py timm-cl timm-bf16-cl fast-bf16-cl --rounds 7
    .venv/bin/python benchmarks/convmixer_step.py timm-cl fast-cl --batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timm.models.convmixer import ConvMixer as TimmConvMixer

from patchbench.bench import Settings, make_step, time_steps, warm_up
from patchbench.cpu.layers import use_fast_kernels
from patchbench.models import create_model


def build(variant: str, args) -> tuple[torch.nn.Module, Settings]:
    kind, *opts = variant.split("-")
    unknown = set(opts) - {"bf16", "cl", "compile"}
    if kind not in ("timm", "ours", "fast") or unknown:
        raise SystemExit(f"bad variant {variant!r}: (timm|ours|fast)[-bf16][-cl][-compile]")
    if kind == "timm":
        model = TimmConvMixer(dim=256, depth=12, kernel_size=7, patch_size=7, num_classes=10)
    else:
        model = create_model("convmixer_256_12", img_size=args.img_size)
        if kind == "fast":
            use_fast_kernels(model)
    return model, Settings("bf16" if "bf16" in opts else "fp32", "cl" in opts, "compile" in opts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")

    steps = {}
    for variant in args.variants:
        model, settings = build(variant, args)
        steps[variant] = make_step(model, settings, mode="train", batch_size=args.batch_size,
                                   img_size=args.img_size, device=device, num_classes=10)
        print(f"{variant}: warm-up {warm_up(steps[variant], args.warmup, device):.1f}s", flush=True)
    times = time_steps(steps, args.rounds, device)

    first = statistics.median(times[args.variants[0]])
    print(f"ConvMixer-256/12 k7 p7, {args.img_size}px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print("| variant | median step (ms) | min (ms) | images/s | speed vs first |")
    print("|---|---:|---:|---:|---:|")
    for variant in args.variants:
        med = statistics.median(times[variant])
        print(f"| {variant} | {med * 1e3:.0f} | {min(times[variant]) * 1e3:.0f} | {args.batch_size / med:.1f} "
              f"| {first / med:.2f}x |")


if __name__ == "__main__":
    main()
