"""One training epoch of the `notebook` recipe: the study's pipeline vs patchbench's, end to end.

(a) the study's notebook: torchvision ImageFolder + PIL RandomResizedCrop(32, scale=(0.8, 0.99),
    ratio=(1, 1)) + flip + ToTensor + Normalize (CIFAR-10 statistics), DataLoader with 2 worker
    processes, batch 16, notebook_convmixer in fp32 (NCHW), AdamW + OneCycleLR, a plain loop.
(b) patchbench: the images decoded once into the uint8 cache (`prepare`, a one-off, reported
    separately), `Loader` cropping/flipping/normalising whole batches on the device, and the
    trainer's own pieces (`build_model`, `create_optimizer`, `lr_at`/`set_lr`, `autocast`), with
    the fast settings below: bf16 autocast, channels_last, patchbench.cpu's operators.
    The step is train.train_one_epoch's: forward, cross-entropy, zero_grad, backward, AdamW step.
(d) with --fp32: (b) in fp32 (channels_last and patchbench's CPU operators: the same function as the
    notebook's, what the `notebook` preset trains notebook_convmixer with).

(b) and (d) run as the trainer does on the CPU, glibc's malloc keeping freed memory
(`patchbench.cpu.memory.keep_freed_memory`). What each of patchbench's CPU measures gains on its
own is measured by benchmarks/cpu_levers.py.

Both train the same model (notebook_convmixer, 961,814 parameters) on the same 32px crops of the same
160px images, 591 batches of 16 per epoch on Imagenette-160.

    .venv/bin/python benchmarks/epoch_time.py                   # whole epoch of each (minutes)
    .venv/bin/python benchmarks/epoch_time.py --max-steps 100   # 100 timed steps each, extrapolated

The two sides run in one process, one step of (a) then one of (b), each timed from asking for its
batch to the end of its step (load from other processes hits both alike; (a)'s worker processes
keep decoding during (b)'s steps, which favours (a)). With --max-steps, each side first runs
--warmup untimed steps (worker start-up, first-call costs), then times --max-steps steps; the epoch
time is (seconds per step) x (steps per epoch), labelled as extrapolated. Without the shared archive (and no --data) a generated folder of random JPEGs stands
in. The last line is `ratio=<(a) epoch time / (b) epoch time>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import SHARED_ARCHIVE, generated_folder  # benchmarks/common.py
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from patchbench.cpu.layers import use_fast_kernels
from patchbench.cpu.memory import keep_freed_memory
from patchbench.data import Loader, prepare, resolve_source
from patchbench.device import autocast
from patchbench.models import create_model
from patchbench.optim import create_optimizer, lr_at, set_lr, total_steps
from patchbench.recipes import get_preset
from patchbench.train import build_model


def run_interleaved(sides: dict, warmup: int, max_steps: int | None) -> dict:
    """Alternate one step of each side (A, B, A, B, ...), each timed from asking for its batch to the end
    of its step, so that load from other processes hits both alike. `sides`: name -> (batches, step,
    steps per epoch). All steps are timed (max_steps None: the whole epoch, start-up included), or
    `max_steps` after `warmup` untimed ones, extrapolated to the epoch."""
    iterators = {name: iter(batches) for name, (batches, _, _) in sides.items()}
    seconds = {name: 0.0 for name in sides}
    images = {name: 0 for name in sides}
    steps = min(n for _, _, n in sides.values())
    last = steps if max_steps is None else min(steps, warmup + max_steps)
    for i in range(last):
        for name, (_, step, _) in sides.items():
            start = time.perf_counter()
            x, y = next(iterators[name])
            step(x, y)
            if max_steps is None or i >= warmup:
                seconds[name] += time.perf_counter() - start
                images[name] += len(y)
    rows = {}
    for name, (_, _, per_epoch) in sides.items():
        timed = last if max_steps is None else last - warmup
        epoch = seconds[name] if max_steps is None else seconds[name] / timed * per_epoch
        rows[name] = {"steps": timed, "seconds": seconds[name], "epoch_s": epoch,
                      "images_per_s": images[name] / seconds[name]}
    return rows


def study_side(root: Path, cfg, num_classes: int, args):
    """(a): the notebook's data pipeline, model and loop."""
    tf = T.Compose([
        T.RandomResizedCrop(cfg.data.img_size, scale=cfg.data.scale, ratio=cfg.data.ratio),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(cfg.data.mean, cfg.data.std),
    ])
    folder = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = DataLoader(folder, batch_size=cfg.train.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=False)
    model = create_model("notebook_convmixer", num_classes=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.train.lr, epochs=100,
                                                    steps_per_epoch=len(loader))
    model.train()

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    return loader, step, len(loader)


def patchbench_side(data, cfg, args):
    """(b): prepared cache + Loader + the trainer's pieces, fast settings."""
    t = cfg.train
    device = torch.device(args.device)
    loader = Loader(data.train, cfg.data, batch_size=t.batch_size, train=True, device=device, seed=t.seed)
    model = build_model(cfg, len(data.classes))
    if args.fast_kernels:
        use_fast_kernels(model)
    model.to(device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
    optimizer = create_optimizer(model, t)
    step_model = torch.compile(model) if t.compile else model
    total = total_steps(t, len(loader))
    model.train()
    counter = iter(range(10**9))

    def step(x, y):
        lr, beta1 = lr_at(next(counter), total, t)
        set_lr(optimizer, lr, beta1)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, t.amp):
            logits = step_model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return loader, step, len(loader)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="dataset source (default: the shared imagenette2-160.tgz "
                   "if present, else a generated folder)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--workers", type=int, default=2, help="(a)'s DataLoader worker processes (the study's: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(b)'s device")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16", help="(b)'s autocast dtype")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="(b) in NCHW")
    p.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false",
                   help="(b) without patchbench.cpu's operators (use_fast_kernels)")
    p.add_argument("--compile", action="store_true", help="(b) with torch.compile")
    p.add_argument("--max-steps", type=int, default=None, help="time this many steps of each and "
                   "extrapolate to the epoch (default: the whole epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before --max-steps")
    p.add_argument("--only", choices=["a", "b"], default=None, help="run one side only (no ratio)")
    p.add_argument("--fp32", action="store_true", help="also (d): (b) in fp32 (the notebook preset's own settings)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process, both "
                   "sides (default: torch's); (a)'s 2 DataLoader workers come on top")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()

    with tempfile.TemporaryDirectory() as tmp:
        source, generated = args.data, False
        if source is None:
            generated = not SHARED_ARCHIVE.exists()
            source = str(generated_folder(Path(tmp) / "gen", train=40, val=4) if generated else SHARED_ARCHIVE.resolve())
        cfg = get_preset("notebook").config_for("notebook_convmixer")
        cache_dir = args.cache_dir or (tmp if generated else None)
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, source=source, cache_dir=cache_dir),
            train=dataclasses.replace(cfg.train, amp=args.amp, channels_last=args.channels_last, compile=args.compile))
        root = resolve_source(cfg.data.source, cache_dir=cfg.data.cache_dir)
        start = time.perf_counter()
        data = prepare(cfg.data, progress=False)
        prep_s = time.perf_counter() - start

        sides = {}
        if args.only != "b":
            sides["a"] = study_side(root, cfg, len(data.classes), args)
        if args.only != "a":
            sides["b"] = patchbench_side(data, cfg, args)
        if args.fp32:
            sides["d"] = patchbench_side(data, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="none")),
                                         args)
        rows = run_interleaved(sides, args.warmup, args.max_steps)

    steps = len(data.train) // cfg.train.batch_size
    how = (f"{args.max_steps} timed steps of each after {args.warmup} warm-up, extrapolated" if args.max_steps
           else "whole epoch") + ", steps of (a) and (b) interleaved"
    t = cfg.train
    settings_b = (f"{t.amp if t.amp != 'none' else 'fp32'}{', channels_last' if t.channels_last else ''}"
                  f"{', CPU operators' if args.fast_kernels else ''}{', compile' if t.compile else ''}")
    print(f"notebook recipe: notebook_convmixer, batch {t.batch_size}, {cfg.data.img_size}px crops of "
          f"{cfg.data.prepare_size}px images; {source} ({len(data.train):,} train images, {steps} steps/epoch); "
          f"{how}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| pipeline | settings | timed steps | seconds | images/s | epoch (s) |")
    print("|---|---|---:|---:|---:|---:|")
    names = {"a": ("(a) the study's: ImageFolder + PIL, DataLoader 2 workers, plain loop", "fp32, NCHW"),
             "b": ("(b) patchbench: uint8 cache + Loader + trainer pieces", settings_b),
             "d": ("(d) (b) in fp32: the notebook's function, the notebook preset's settings",
                   settings_b.replace(t.amp, "fp32")),
}
    for key, r in rows.items():
        print(f"| {names[key][0]} | {names[key][1]} | {r['steps']} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['epoch_s']:.0f} |")
    print(f"| patchbench prepare (one-off, {'cache reused' if data.reused else 'decoded now'}) | | | "
          f"{prep_s:.1f} | | |")
    if "d" in rows and "a" in rows:
        print(f"ratio_fp32={rows['a']['epoch_s'] / rows['d']['epoch_s']:.2f}")
    if "a" in rows and "b" in rows:
        print(f"ratio={rows['a']['epoch_s'] / rows['b']['epoch_s']:.2f}")


if __name__ == "__main__":
    main()
