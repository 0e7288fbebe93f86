"""`patchbench eval RUN_DIR|CHECKPOINT [--data SRC] [--split val|holdout]`: loss, top-1/top-5, per-class
accuracy, confusion matrix.

Deterministic: the whole split, in order, with the run's centre-crop transform.
"""

from __future__ import annotations

import json
import sys

from patchbench.errors import UserError
from patchbench.values import coerce


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a run's (or checkpoint's) weights on a val split",
                       description="Evaluate the weights of a run directory (its checkpoint/last) or of a "
                       "checkpoint file on the full val split: loss, top-1, top-5, per-class accuracy and "
                       "the confusion matrix (rows = true class).")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--data", help="dataset to evaluate on (default: the one the run trained on)")
    p.add_argument("--cache-dir", help="dataset cache folder (default: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", default="128", metavar="N", help="evaluation batch size (default 128)")
    p.add_argument("--split", default="val", choices=("val", "holdout"),
                   help="val (default), or holdout: the part of train a --holdout run validated on")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    p.set_defaults(func=run)


def run(args):
    from patchbench import rundir
    from patchbench.device import check_device_name
    from patchbench.evaluate import evaluate_run

    batch_size = coerce(args.batch_size, int, "--batch-size")
    if not 1 <= batch_size <= 65536:
        raise UserError(f"--batch-size {batch_size}: need a whole number in [1, 65536]")
    check_device_name(args.device)
    output = rundir.check_output_file(args.output, "--output") if args.output else None
    result = evaluate_run(args.path, args.data, device=args.device, batch_size=batch_size,
                          cache_dir=args.cache_dir, progress=sys.stderr.isatty(), split=args.split)
    text = json.dumps(result, indent=1)
    if output:
        rundir.atomic_write_text(output, text)
    if args.json:
        print(text)
        return 0
    print(f"{result['checkpoint']} on {result['split']}: {result['images']} images  loss {result['loss']:.4f}  "
          f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%")
    width = max(len(c) for c in result["classes"])
    for name, acc in zip(result["classes"], result["per_class_top1"]):
        print(f"  {name:<{width}}  {'n/a' if acc is None else f'{100 * acc:6.2f}%'}")
    return 0
