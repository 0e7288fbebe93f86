"""`patchbench models [NAME ...] [--img-size N] [--json]`: every registered model with params and MACs.

Models are built on PyTorch's "meta" device (shapes only, no memory, no arithmetic), so the table is
instant even for the 50M-parameter ConvMixer at large sizes. Each model is built for the requested size
(`create_model(name, img_size=N)`); a model that cannot take it (e.g. the notebook's ViT, fixed at
32px) is listed with its parameter count at its own size, MACs n/a and the reason.
"""

from __future__ import annotations

import json

from patchbench.config import MAX_SIZE
from patchbench.errors import UserError
from patchbench.values import coerce


def add_parser(sub):
    p = sub.add_parser("models", help="list the registered models with parameter counts and MACs",
                       description="List the registered models with parameter counts (10 classes) and MACs "
                       "(multiply-accumulates of one forward pass on one image) at --img-size.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these models (default: all)")
    p.add_argument("--img-size", default="160", metavar="N",
                   help="square input side in pixels (default: 160, the study's images)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def parse_img_size(text: str) -> int:
    size = coerce(text, int, "--img-size")
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"--img-size must be between 1 and {MAX_SIZE} pixels, got {size}")
    return size


def model_row(name: str, img_size: int) -> dict:
    """Params and MACs of `name` built for `img_size`; `error` says why when it cannot run at that size."""
    import torch

    from patchbench.flops import count_macs, count_params
    from patchbench.models import create_model

    with torch.device("meta"):
        natural = create_model(name)
    row = {"model": name, "params": count_params(natural), "macs": None,
           "default_img_size": natural.default_img_size, "error": None}
    try:
        with torch.device("meta"):
            model = create_model(name, img_size=img_size)
        row["params"] = count_params(model)  # differs from `natural` only for ViTs (position embedding)
        row["macs"] = count_macs(model, img_size)  # the input goes on the model's (meta) device
    except (UserError, ValueError, RuntimeError) as e:  # a size the model cannot take (its constructor says why)
        row["error"] = str(e).splitlines()[0].removeprefix(f"model {name}: ")
    return row


def format_table(rows: list[dict], img_size: int) -> str:
    header = ("model", "params", f"MACs @{img_size}px", "natural size", "note")
    lines = [(r["model"], f"{r['params']:,}", _human(r["macs"]) if r["macs"] is not None else "n/a",
              f"{r['default_img_size']}px", r["error"] or "") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    align = ["<", ">", ">", ">", "<"]

    def fmt(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args) -> int:
    from patchbench.models import list_models, spec

    img_size = parse_img_size(args.img_size)
    for name in args.names:
        spec(name)  # an unknown name: UserError with the closest names
    rows = [model_row(name, img_size) for name in (args.names or list_models())]
    if args.json:
        print(json.dumps({"img_size": img_size, "num_classes": 10, "models": rows}, indent=2))
    else:
        print(format_table(rows, img_size))
        print("params at 10 classes; MACs = multiply-accumulates of one forward pass on one image "
              "(conv, linear, attention)")
    return 0
