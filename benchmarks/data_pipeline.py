"""Images/s over one training epoch: the study's ImageFolder + PIL pipeline vs patchbench's loader.

(a) torchvision ImageFolder + PIL transforms (RandomResizedCrop, flip, ToTensor, Normalize),
    DataLoader with 2 worker processes, batch 64: what the study ran, decoding every JPEG every epoch.
(b) patchbench: the images decoded once (`prepare`, timed separately, a one-off), then `Loader`
    cropping, flipping and normalising whole batches on the device.
On the CPU, (b) crops with torch's uint8 antialiased resize per sample, chunks of samples over torch's
thread count of Python threads, and the Loader sets glibc's malloc thresholds once so that freed
batches are reused (process-wide: the baseline's later rounds, and its forked workers, run under the same
setting). Both use the same crop scale/ratio and produce the same float32 (64, 3, 160, 160) batches; (b) is
timed twice: NCHW memory (the Loader's default, what `ratio=` compares) and `channels_last=True`
(the same values in NHWC memory, what a channels_last model such as the study160 preset's wants).

    .venv/bin/python benchmarks/data_pipeline.py                  # ../shared/datasets/imagenette2-160.tgz
    .venv/bin/python benchmarks/data_pipeline.py --data FOLDER    # any train/ val/ image folder
    .venv/bin/python benchmarks/data_pipeline.py --repeat 3       # take turns 3 times, keep each one's best

Without the archive (and no --data), a generated folder of random JPEGs stands in. The last line
is `ratio=<ours / baseline>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_ARCHIVE, generated_folder  # benchmarks/common.py
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from patchbench.config import DataConfig
from patchbench.cpu.memory import keep_freed_memory
from patchbench.data import Loader, prepare, resolve_source


def time_epoch(batches, device: torch.device, max_batches: int | None) -> tuple[int, float]:
    """Images and seconds for one pass, from asking for the first batch to having the last."""
    start = time.perf_counter()
    n = 0
    for i, (x, y) in enumerate(batches):
        n += len(y)
        if max_batches is not None and i + 1 >= max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="dataset source (default: the shared imagenette2-160.tgz "
                   "if present, else a generated folder)")
    p.add_argument("--md5", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where patchbench augments (default: cuda if available)")
    p.add_argument("--repeat", type=int, default=1, help="epochs per pipeline, taken in turns; the table "
                   "shows each one's fastest (default: 1)")
    p.add_argument("--max-batches", type=int, default=None, help="stop each pipeline after this many "
                   "batches (a quick check; default: the whole epoch)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: need at least 1 epoch per pipeline")

    with tempfile.TemporaryDirectory() as tmp:
        source, generated = args.data, False
        if source is None:
            generated = not SHARED_ARCHIVE.exists()
            source = str(generated_folder(Path(tmp) / "gen", train=60, val=10) if generated else SHARED_ARCHIVE.resolve())
        cache_dir = args.cache_dir or (tmp if generated else None)  # a generated folder's cache goes with it
        cfg = DataConfig(source=source, md5=args.md5, cache_dir=cache_dir, prepare_size=args.img_size,
                         img_size=args.img_size, scale=(0.35, 1.0))
        device = torch.device(args.device)

        root = resolve_source(cfg.source, cache_dir=cfg.cache_dir, md5=cfg.md5)
        start = time.perf_counter()
        data = prepare(cfg)
        prep_s = time.perf_counter() - start
        prep_note = "cache reused" if data.reused else "decoded now"

        baseline_tf = T.Compose([
            T.RandomResizedCrop(args.img_size, scale=cfg.scale, ratio=cfg.ratio),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ])
        folder = datasets.ImageFolder(str(root / "train"), transform=baseline_tf)
        baseline = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              drop_last=True)
        ours = Loader(data.train, cfg, batch_size=args.batch_size, train=True, device=device, seed=0)
        ours_cl = Loader(data.train, cfg, batch_size=args.batch_size, train=True, device=device, seed=0,
                         channels_last=True)
        # the pipelines take turns, `repeat` rounds, and each keeps its fastest epoch: on a CPU shared
        # with other jobs a single pass mostly measures how busy the machine was at that moment
        runs = {"a": [], "b": [], "c": []}
        for _ in range(args.repeat):
            runs["a"].append(time_epoch(baseline, torch.device("cpu"), args.max_batches))
            runs["b"].append(time_epoch(ours, device, args.max_batches))
            runs["c"].append(time_epoch(ours_cl, device, args.max_batches))
        (n_a, s_a), (n_b, s_b), (n_c, s_c) = (min(runs[k], key=lambda r: r[1] / r[0]) for k in "abc")

    rate_a, rate_b, rate_c = n_a / s_a, n_b / s_b, n_c / s_c
    print(f"data: {source} ({len(data.train):,} train images, {args.img_size}px, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, fastest of {args.repeat} epoch(s) each)")
    if device.type == "cpu":
        print("patchbench's CPU path: torch's per-sample uint8 antialiased resize"
              + f"; malloc reuse of freed batches: {'on' if keep_freed_memory() else 'off'}")
    print("| pipeline | device | images | seconds | images/s |")
    print("|---|---|---:|---:|---:|")
    print(f"| ImageFolder + PIL, {args.workers} workers (the study's) | cpu | {n_a:,} | {s_a:.1f} | {rate_a:,.0f} |")
    print(f"| patchbench Loader (uint8 cache, batched augment) | {device} | {n_b:,} | {s_b:.1f} | {rate_b:,.0f} |")
    print(f"| patchbench Loader, channels_last=True | {device} | {n_c:,} | {s_c:.1f} | {rate_c:,.0f} |")
    print(f"| patchbench prepare, one-off ({prep_note}) | cpu | {len(data.train) + len(data.val):,} "
          f"| {prep_s:.1f} | |")
    print(f"ratio_channels_last={rate_c / rate_a:.2f}")
    print(f"ratio={rate_b / rate_a:.2f}")


if __name__ == "__main__":
    main()
