"""What the strongest augmentation recipe costs, as a fraction of a ConvMixer-256/12 train step (160px).

Three things are timed in one process, interleaved (A, B, C, A, B, C, ...), on the real Imagenette
cache (a generated folder when ../shared is absent):
  (a) a training batch of the Loader with the plain recipe: random-resized-crop + flip + normalise;
  (b) the same batch with the strongest recipe of patchbench: RandAugment (2 ops, magnitude 9),
      random erasing (p 0.25) and mixup/cutmix (the trainer's MixupCutmix), everything the model
      gets to see made on the training device;
  (c) a ConvMixer-256/12 (k7 p7) train step at 160px, bf16 + channels_last with patchbench's CPU operators
      (patchbench's fastest CPU settings; fp32 would make the fraction smaller).
The printed ratios: `aug_ratio` = (b) / (c), the whole batch preparation against the step, and
`extra_ratio` = ((b) - (a)) / (c), what the strong recipe adds.

    .venv/bin/python benchmarks/augment_cost.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_ARCHIVE, generated_folder

from patchbench.bench import Settings, make_step
from patchbench.config import DataConfig
from patchbench.cpu.layers import use_fast_kernels
from patchbench.data import Loader, prepare
from patchbench.data.mix import MixupCutmix
from patchbench.models import create_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--rounds", type=int, default=7, help="timed repetitions of each (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data", default=None, help="archive or folder (default: ../shared's Imagenette, else generated)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = args.data or (str(SHARED_ARCHIVE) if SHARED_ARCHIVE.exists() else None)
    tmp = tempfile.TemporaryDirectory()
    if source is None:
        source = str(generated_folder(Path(tmp.name) / "images", train=40, val=4, size=args.img_size))
    base = {"source": source, "cache_dir": str(Path(tmp.name) / "cache") if args.data is None and not
                SHARED_ARCHIVE.exists() else None, "img_size": args.img_size, "prepare_size": args.img_size}
    plain_cfg = DataConfig(**base)
    strong_cfg = DataConfig(**base, auto_augment="randaugment", randaugment_ops=2, randaugment_magnitude=9,
                            random_erasing=0.25, mixup=0.8, cutmix=1.0)
    data = prepare(plain_cfg, progress=False)
    plain = Loader(data.train, plain_cfg, batch_size=args.batch_size, train=True, channels_last=True)
    strong = Loader(data.train, strong_cfg, batch_size=args.batch_size, train=True, channels_last=True)
    mixer = MixupCutmix(strong_cfg, len(data.classes), 0.1, seed=0)
    batches = {"plain": iter(plain), "strong": iter(strong)}

    def batch(kind: str):
        def run():
            x, y = next(batches[kind])
            if kind == "strong":
                mixer(x, y, 0, 0)
        return run

    model = create_model("convmixer_256_12", img_size=args.img_size)
    use_fast_kernels(model)
    step = make_step(model, Settings("bf16", True, False), mode="train", batch_size=args.batch_size,
                     img_size=args.img_size, device=torch.device("cpu"), num_classes=10)
    jobs = {"(a) plain batch": batch("plain"), "(b) strongest recipe batch": batch("strong"),
            "(c) ConvMixer-256/12 train step": step}
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            tick = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - tick)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"data: {source}; batch {args.batch_size} at {args.img_size}px, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} interleaved rounds")
    print("| job | median (ms) | min (ms) |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {1e3 * med[name]:.1f} | {1e3 * min(values):.1f} |")
    a, b, c = med.values()
    print(f"extra_ratio={(b - a) / c:.3f}")
    print(f"aug_ratio={b / c:.3f}")


if __name__ == "__main__":
    main()
