"""Training throughput on a quiet machine and beside one competing CPU-bound process, side by side.

For each thread policy -- the default (adaptive: patchbench.cpu.threads.ThreadTuner picks 1 thread or all
cores, whichever trains faster right now), a fixed 2 threads (the old default) and a fixed 1 thread --
one epoch of the `notebook` recipe's notebook_resnet9 (32px, batch 16) is trained through `train_run`, first
on the quiet machine, then with a busy-loop process started beside it. The table gives the training
images/s of each (from metrics.jsonl, evaluation excluded) and the busy/quiet ratio; the last line
is the default policy's busy/quiet ratio.

    .venv/bin/python benchmarks/busy_machine.py                # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/busy_machine.py --model notebook_vit --steps 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SHARED_ARCHIVE, generated_folder

from patchbench.recipes import get_preset
from patchbench.train import train_run

POLICIES = {"adaptive (default)": None, "fixed 2 threads": 2, "fixed 1 thread": 1}


def images_per_s(cfg, out: Path) -> float:
    train_run(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["train_images_per_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="notebook_resnet9")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="train on (1 - this) of the train split to shorten the epoch (default: all of it)")
    p.add_argument("--data", default=None, help="archive or folder (default: ../shared's Imagenette, else generated)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="busy-"))
    source = args.data or (str(SHARED_ARCHIVE) if SHARED_ARCHIVE.exists() else
                           str(generated_folder(tmp / "images", train=200, val=10, size=160)))
    base = get_preset("notebook").config_for(args.model)
    base.data.source, base.data.holdout, base.train.epochs = source, args.holdout, 1
    print(f"data: {source}; one epoch of notebook/{args.model} per row (batch {base.train.batch_size}, "
          f"{base.data.img_size}px); busy = one `while True: pass` process beside it")
    results = {}
    for label, threads in POLICIES.items():
        for busy in (False, True):
            cfg = get_preset("notebook").config_for(args.model)
            cfg.data, cfg.train.epochs, cfg.train.threads = base.data, 1, threads
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                results[label, busy] = images_per_s(cfg, tmp / f"{list(POLICIES).index(label)}-{busy}")
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print("| thread policy | quiet img/s | busy img/s | busy / quiet |\n|---|---:|---:|---:|")
    for label in POLICIES:
        quiet, busy = results[label, False], results[label, True]
        print(f"| {label} | {quiet:.0f} | {busy:.0f} | {busy / quiet:.2f} |")
    default = next(iter(POLICIES))
    print(f"ratio_fixed2={results['fixed 2 threads', True] / results['fixed 2 threads', False]:.2f}")
    print(f"ratio={results[default, True] / results[default, False]:.2f}")


if __name__ == "__main__":
    main()
