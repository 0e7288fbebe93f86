"""`patchbench train --model NAME --data SRC [--preset P] [flags] --out RUN_DIR` (and `--resume RUN_DIR`).

The config is built in three layers: the dataclass defaults, then the preset (with its per-model
settings), then the flags given. Flags are parsed here as text and converted with one-line errors
naming the flag. Runs under torchrun as well: `torchrun --nproc_per_node N -m patchbench train ...`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from patchbench.config import AMPS, INITS, SCHEDULES, ModelConfig, RunConfig, get_preset, list_presets, replace
from patchbench.commands.values import number, whole_number
from patchbench.errors import UserError


def _optional_float(flag):
    def parse(text):
        return None if text.lower() in ("none", "off", "0") else number(flag)(text)
    return parse


def _pair(flag):
    def parse(text):
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"{flag} {text!r}: need two numbers MIN,MAX (e.g. 0.35,1)") from None
        return (lo, hi)
    return parse


def _choice(flag, choices):
    def parse(text):
        if text not in choices:
            raise UserError(f"{flag} {text!r}: choose one of {', '.join(choices)}")
        return text
    return parse


# (flag, config section, field, converter, help)
FLAGS = [
    ("--epochs", "train", "epochs", whole_number("--epochs"), "epochs to train"),
    ("--batch-size", "train", "batch_size", whole_number("--batch-size"), "global batch size (split over DDP ranks)"),
    ("--lr", "train", "lr", number("--lr"), "peak learning rate"),
    ("--weight-decay", "train", "weight_decay", number("--weight-decay"),
     "AdamW weight decay (never on norms, biases, gains, cls token, position embedding)"),
    ("--schedule", "train", "schedule", _choice("--schedule", SCHEDULES),
     "onecycle (torch OneCycleLR shape) | piecewise (ConvMixer: 0 -> max at 40%% -> max/20 at 80%% -> 0) | constant"),
    ("--schedule-epochs", "train", "schedule_epochs", whole_number("--schedule-epochs"),
     "size the schedule for this many epochs (default: exactly the run)"),
    ("--pct-start", "train", "pct_start", number("--pct-start"), "onecycle warm-up fraction"),
    ("--label-smoothing", "train", "label_smoothing", number("--label-smoothing"), "cross-entropy label smoothing"),
    ("--grad-clip", "train", "grad_clip", _optional_float("--grad-clip"), "max global gradient norm (none: off)"),
    ("--ema", "train", "ema_decay", _optional_float("--ema"), "EMA decay of the weights, e.g. 0.999 (none: off)"),
    ("--amp", "train", "amp", _choice("--amp", AMPS), "mixed precision: none | bf16 | fp16"),
    ("--init", "train", "init", _choice("--init", INITS), "default | kaiming (the notebook's init)"),
    ("--seed", "train", "seed", whole_number("--seed"), "seeds Python, NumPy, torch and the loader"),
    ("--device", "train", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--log-every", "train", "log_every", whole_number("--log-every"), "steps between progress/TensorBoard updates"),
    ("--threads", "train", "threads", whole_number("--threads"), "torch CPU threads per process (default: torch's)"),
    ("--img-size", "data", "img_size", whole_number("--img-size"), "input size the model sees"),
    ("--prepare-size", "data", "prepare_size", whole_number("--prepare-size"), "size the images are decoded/cached at"),
    ("--scale", "data", "scale", _pair("--scale"), "random-resized-crop area range MIN,MAX"),
    ("--ratio", "data", "ratio", _pair("--ratio"), "random-resized-crop aspect range MIN,MAX"),
    ("--eval-crop", "data", "eval_crop", number("--eval-crop"), "evaluation centre crop (fraction of the side)"),
    ("--cache-dir", "data", "cache_dir", str, "dataset cache folder (default ~/.cache/patchbench)"),
    ("--md5", "data", "md5", str, "expected MD5 of a local --data archive"),
]
SWITCHES = [  # on/off flags: --x / --no-x
    ("--channels-last", "train", "channels_last", "channels_last memory format"),
    ("--compile", "train", "compile", "torch.compile the model"),
    ("--deterministic", "train", "deterministic", "deterministic algorithms (exact resume on CPU)"),
    ("--sync-bn", "train", "sync_bn", "SyncBatchNorm across DDP ranks (GPU)"),
    ("--cycle-momentum", "train", "cycle_momentum", "onecycle also cycles Adam's beta1 (torch's default)"),
    ("--hflip", "data", "hflip", "random horizontal flips"),
    ("--fast-kernels", "train", "fast_kernels", "CPU: patchbench.kernels for ConvMixer's depthwise conv and GELU->BN"),
]


def add_parser(sub):
    import argparse

    p = sub.add_parser("train", help="train one model into a run directory",
                       description="Train one model; the run directory records config, metrics, checkpoints, "
                       "TensorBoard events, summary.json and eval.json. Also under torchrun for DDP.")
    p.add_argument("--model", help="registered model name (see `patchbench models`)")
    p.add_argument("--data", help="dataset: registered name, archive (.tgz/.tar/.zip) or image folder")
    p.add_argument("--preset", help="named recipe (see --list-presets)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model constructor (repeatable), e.g. patch_size=4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    for flag, _, _, _, help_ in FLAGS:
        p.add_argument(flag, default=None, metavar="V", help=help_)
    for flag, _, _, help_ in SWITCHES:
        p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_)
    p.set_defaults(func=run)


def describe_presets() -> str:
    lines = []
    for name in list_presets():
        pr = get_preset(name)
        t, d = pr.train, pr.data
        lines.append(f"{name}: {pr.description}")
        lines.append(f"    models: {', '.join(pr.models)}")
        lines.append(f"    {d.img_size}px (cached at {d.prepare_size}px), {t.epochs} epochs, batch {t.batch_size}, "
                     f"lr {t.lr:g}, wd {t.weight_decay:g}, {t.schedule}"
                     + (f" sized for {t.schedule_epochs} epochs" if t.schedule_epochs else "")
                     + f", amp {t.amp}")
        for model, changes in pr.per_model.items():
            lines.append(f"    {model}: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        for model, kw in pr.model_overrides.items():
            lines.append(f"    {model} built with " + ", ".join(f"{k}={v}" for k, v in kw.items()))
    return "\n".join(lines)


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg {item!r}: need KEY=VALUE, e.g. patch_size=4")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_config(args) -> RunConfig:
    """Defaults <- preset (+ its per-model settings) <- flags."""
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.exists():
            raise UserError(f"--resume {args.resume}: no run there ({saved} is missing); start one with --out")
        doc = json.loads(saved.read_text())
        doc.pop("env", None), doc.pop("derived", None)
        cfg = RunConfig.from_dict(doc)
        if args.model and args.model != cfg.model.name:
            raise UserError(f"run dir {args.resume} belongs to another model ({cfg.model.name}, not {args.model}); "
                            f"drop --model or choose another run")
        if args.preset and args.preset != cfg.preset:
            raise UserError(f"--preset {args.preset}: the run in {args.resume} used {cfg.preset}; drop --preset")
    else:
        if not args.model:
            raise UserError("--model is required (see `patchbench models`), or --resume RUN_DIR")
        if not args.data:
            raise UserError("--data is required: a registered dataset name, an archive or an image folder")
        if not args.out:
            raise UserError("--out RUN_DIR is required: the folder that will hold the run")
        if args.preset:
            cfg = get_preset(args.preset).config_for(args.model)
        else:
            cfg = RunConfig(model=ModelConfig(name=args.model))
    if args.data:
        cfg.data = replace(cfg.data, source=args.data)
    if args.model_arg:
        cfg.model.overrides = {**cfg.model.overrides, **parse_model_args(args.model_arg)}
    changes = {"train": {}, "data": {}}
    for flag, section, field, convert, _ in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            changes[section][field] = convert(value)
    for flag, section, field, _ in SWITCHES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            changes[section][field] = value
    cfg.train = replace(cfg.train, **changes["train"])
    cfg.data = replace(cfg.data, **changes["data"])
    return cfg.validate()


def run(args):
    if args.list_presets:
        print(describe_presets())
        return 0
    from patchbench.train import TrainingDiverged, train_run

    cfg = build_config(args)
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--out {args.out} and --resume {args.resume} differ; give only --resume RUN_DIR")
    out = args.resume or args.out
    try:
        s = train_run(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"patchbench train: stopped: {e} (last good checkpoint kept in {out}/checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # the message (when there is one) says a checkpoint was written and how to go on
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"patchbench train: {e or 'interrupted'}", file=sys.stderr)
        return 130
    if s.get("epochs_done") and int(os.environ.get("RANK", "0")) == 0:
        print(f"{s['model']}: final top-1 {s['final_top1']:.4f} (best {s['best_top1']:.4f} at epoch {s['best_epoch']}), "
              f"{s['params']:,} params, {s['wall_time_s']:.1f}s -> {out}")
    return 0
