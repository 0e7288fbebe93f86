"""`patchbench predict CHECKPOINT IMAGE...`: the top-k classes of each image with probabilities.

The checkpoint's JSON carries the model, the class names and the eval transform, so nothing else
is needed (no config, no dataset).
"""

from __future__ import annotations

import json

from patchbench.errors import UserError
from patchbench.values import coerce


def add_parser(sub):
    p = sub.add_parser("predict", help="classify image files with a trained checkpoint",
                       description="Classify image files with a run directory's or checkpoint's weights.")
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", default="5", metavar="K", help="classes to show per image (default 5)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args):
    from patchbench.device import check_device_name
    from patchbench.evaluate import predict

    topk = coerce(args.topk, int, "--topk")
    if not 1 <= topk <= 100_000:
        raise UserError(f"--topk {topk}: need a whole number >= 1")
    check_device_name(args.device)
    results = predict(args.checkpoint, args.images, topk=topk, device=args.device)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['prob']:6.2f}%  {t['class']}")
    return 0
