"""`patchbench bench`: images/s, achieved GFLOP/s and the matmul ceiling; `--against` a reference model."""

from __future__ import annotations

import sys

from patchbench.errors import UserError
from patchbench.values import coerce

DTYPES, MODES, AGAINST = ("fp32", "bf16", "fp16", "auto"), ("train", "infer"), ("timm", "torchvision")
AMP_DTYPES = {"none": "fp32", "bf16": "bf16", "fp16": "fp16", "auto": "auto"}  # train's --amp spelling


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="measure a model's train/infer step, optionally against timm/torchvision",
        description="Time a model's train step (forward + backward + AdamW) or forward pass on a random batch. "
        "Prints images/s (median of --repeats, warm-up excluded), step time, achieved GFLOP/s and its "
        "fraction of a matmul measured in the same run; with --against, the same model from timm or "
        "torchvision at its own best settings, timed interleaved with ours; the last line is ratio=ours/reference.",
    )
    p.add_argument("--model", required=True, help="registered model name (see `patchbench models`)")
    p.add_argument("--img-size", default="160", metavar="N", help="square input side in pixels (default 160)")
    p.add_argument("--batch-size", default="64", metavar="N", help="images per step (default 64)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (autocast below fp32); auto: bf16 where the hardware computes it natively "
                   "(default fp32)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None, help="the same as --dtype, in train's words "
                   "(none = fp32)")
    p.add_argument("--channels-last", nargs="?", const="true", default="false", metavar="true|false|auto",
                   help="channels_last memory layout; auto: whichever trains faster here (the cached probe of "
                   "`train`)")
    p.add_argument("--fast-kernels", default="true", metavar="true|false|auto",
                   help="patchbench.cpu's layers where they fit (CPU training; default true); auto: by the probe")
    p.add_argument("--cap", default="3", metavar="X", help="drop a reference setting whose first step takes over X "
                   "times the best first step (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (references are then tried compiled too)")
    p.add_argument("--mode", choices=list(MODES), default="train")
    p.add_argument("--against", choices=list(AGAINST), default=None, help="reference implementation")
    p.add_argument("--repeats", default="5", metavar="N", help="timed steps per model (median reported; default 5)")
    p.add_argument("--warmup", default="2", metavar="N", help="untimed steps first (compilation happens here; default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", default=None, metavar="N",
                   help="torch CPU threads for both sides (default: torch's; 1 can be faster on a shared CPU)")
    p.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_const", const="false",
                   help="the same as --fast-kernels false")
    p.add_argument("--out", default="bench.json", help="where the results go (JSON)")
    p.set_defaults(func=run)


def command_line(args) -> str:
    """The command that reproduces this measurement, every setting spelled out."""
    words = ["patchbench bench", f"--model {args.model}", f"--img-size {args.img_size}",
             f"--batch-size {args.batch_size}", f"--dtype {args.dtype}", f"--mode {args.mode}",
             f"--channels-last {str(args.channels_last).lower()}", f"--fast-kernels {str(args.fast_kernels).lower()}",
             f"--cap {args.cap:g}",
             f"--repeats {args.repeats}", f"--warmup {args.warmup}", f"--device {args.device}"]
    words += [f"--threads {args.threads}"] * (args.threads is not None)
    words += ["--compile"] * args.compile + [f"--against {args.against}"] * (args.against is not None)
    return " ".join(words + [f"--out {args.out}"])


def _count(args, name: str, lo: int, hi: int) -> int:
    flag = "--" + name.replace("_", "-")
    value = coerce(getattr(args, name), int, flag)
    if not lo <= value <= hi:
        raise UserError(f"{flag} {value}: need a whole number in [{lo}, {hi}]")
    setattr(args, name, value)
    return value


def run(args) -> int:
    from patchbench import rundir
    from patchbench.bench import Settings, format_table, run_bench
    from patchbench.device import check_device_name

    for name, lo, hi in (("img_size", 1, 4096), ("batch_size", 1, 65536), ("repeats", 1, 10_000), ("warmup", 0, 10_000)):
        _count(args, name, lo, hi)
    check_device_name(args.device)
    from patchbench.config import Switch

    if args.dtype is not None and args.amp is not None and args.dtype != AMP_DTYPES[args.amp]:
        raise UserError(f"--dtype {args.dtype} and --amp {args.amp} disagree; give one of them")
    args.dtype = args.dtype or AMP_DTYPES[args.amp or "none"]
    args.channels_last = coerce(args.channels_last, Switch, "--channels-last")
    args.fast_kernels = coerce(args.fast_kernels, Switch, "--fast-kernels")
    args.cap = coerce(args.cap, float, "--cap")
    if args.cap < 1:
        raise UserError(f"--cap {args.cap:g}: need a ratio of at least 1")
    out = rundir.check_output_file(args.out, "--out")  # before minutes of timing, not after
    if args.threads is not None:
        import torch

        torch.set_num_threads(_count(args, "threads", 1, 1024))
    settings = Settings(args.dtype, args.channels_last, args.compile)
    result = run_bench(
        args.model, img_size=args.img_size, batch_size=args.batch_size, settings=settings, mode=args.mode,
        against=args.against, repeats=args.repeats, warmup=args.warmup, device=args.device,
        fast_kernels=args.fast_kernels, cap=args.cap, log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    result["command"] = command_line(args)
    rundir.atomic_write_json(out, result)
    print(f"{result['mode']} step, {result['model']} at {result['img_size']}px, batch {result['batch_size']}, "
          f"{result['device_name']}; median of {result['repeats']} (FLOPs: {result['flops_note']})")
    print(format_table(result))
    for r in result["results"]:
        for note in r["notes"]:
            print(f"{r['label']}: {note}")
    ceilings = ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in result["matmul_ceiling_gflops"].items())
    print(f"matmul ceiling: {ceilings}; results in {args.out}")
    if "ratio" in result:
        print(f"ratio={result['ratio']:.2f}")
    return 0
