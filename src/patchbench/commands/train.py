"""`patchbench train --model NAME --data SRC [--preset P] [--config FILE.toml] [flags] --out RUN_DIR`.

The config is built in layers: the dataclass defaults, the preset (with its per-model settings), the
config file, then the flags given (see patchbench.recipes). `--dump-config` prints the resolved
config as TOML, which `--config` reads back to the same run. `--resume RUN_DIR` continues a run
from its last checkpoint. Runs under torchrun as well: `torchrun --nproc_per_node N -m patchbench train ...`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from patchbench.commands.options import (
    add_progress_flag,
    add_recipe_flags,
    config_file,
    recipe_changes,
)
from patchbench.config import RunConfig, fields_of
from patchbench.errors import UserError
from patchbench.recipes import build_config, get_preset, list_presets, to_toml


def add_parser(sub):
    p = sub.add_parser("train", help="train one model into a run directory",
                       description="Train one model; the run directory records config, metrics, checkpoints, "
                       "TensorBoard events, summary.json and eval.json. Also under torchrun for DDP. Settings "
                       "come from the defaults, then --preset, then --config, then the flags.")
    p.add_argument("--model", help="registered model name (see `patchbench models`)")
    p.add_argument("--preset", help="named recipe (see --list-presets)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--dump-config", action="store_true",
                   help="print the fully resolved config as TOML (what --config reads back) and exit")
    p.add_argument("--resolve", action="store_true",
                   help="with --dump-config: replace every `auto` (amp, channels_last, fast_kernels) by what this "
                   "machine resolves it to (prepares the data and may run the short speed probe)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model constructor (repeatable), e.g. patch_size=4; "
                   "checked against the model's signature")
    add_progress_flag(p)
    add_recipe_flags(p)
    p.set_defaults(func=run)


def describe_presets() -> str:
    lines = []
    for name in list_presets():
        pr = get_preset(name)
        t, d = pr.train_config, pr.data_config
        lines.append(f"{name}: {pr.description}")
        lines.append(f"    models: {', '.join(pr.models)}")
        lines.append(f"    {d.img_size}px (cached at {d.prepare_size}px), {t.epochs} epochs, batch {t.batch_size}, "
                     f"lr {t.lr:g}, wd {t.weight_decay:g}, {t.schedule}"
                     + (f" sized for {t.schedule_epochs} epochs" if t.schedule_epochs else "")
                     + f", amp {t.amp}")
        for model, tables in pr.per_model.items():
            for section in ("train", "data"):
                if tables.get(section):
                    lines.append(f"    {model}: " + ", ".join(f"{k}={v}" for k, v in tables[section].items()))
            if tables.get("overrides"):
                lines.append(f"    {model} built with " + ", ".join(f"{k}={v}" for k, v in tables["overrides"].items()))
    return "\n".join(lines)


def parse_model_args(items: list[str]) -> dict[str, str]:
    """KEY=VALUE items -> {key: text}; the texts are typed by the model's signature (check_overrides)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg {item!r}: need KEY=VALUE, e.g. patch_size=4")
        out[key] = value
    return out


def _resumed_config(args, changes: dict[str, dict]) -> RunConfig:
    """The saved config of --resume RUN_DIR, with the flags that a resumed run may change."""
    from patchbench import rundir

    run = Path(args.resume)
    if not (run / rundir.CONFIG).exists():
        raise UserError(f"--resume {args.resume}: no run there ({run / rundir.CONFIG} is missing); start one with --out")
    doc = rundir.read_config(run)
    doc.pop("env", None), doc.pop("derived", None)
    cfg = RunConfig.from_dict(doc, str(run / rundir.CONFIG))
    from patchbench.config import current_name

    args.model = current_name(args.model, "model") if args.model else args.model
    args.preset = current_name(args.preset, "preset") if args.preset else args.preset
    if args.model and args.model != cfg.model.name:
        raise UserError(f"run dir {args.resume} belongs to another model ({cfg.model.name}, not {args.model}); "
                        f"drop --model or choose another run")
    if args.preset and args.preset != cfg.preset:
        raise UserError(f"--preset {args.preset}: the run in {args.resume} used {cfg.preset}; drop --preset")
    if args.config or args.model_arg:
        raise UserError("--config and --model-arg cannot change a run being resumed; drop them (the run keeps "
                        "its own config.json)")
    for section, values in changes.items():
        for name, value in values.items():
            f = fields_of(section)[name]
            if not f.resumable and getattr(getattr(cfg, section), name) != value:
                raise UserError(f"{f.flag}: cannot change it when resuming {args.resume} (it would not continue "
                                f"the same run); drop it, or start a new run with another --out")
            setattr(getattr(cfg, section), name, value)
    return cfg


def build_run_config(args) -> RunConfig:
    """Defaults <- preset (+ its per-model settings) <- --config <- flags."""
    changes = recipe_changes(args)
    if args.resume:
        return _resumed_config(args, changes).validate()
    from patchbench.models import check_overrides

    config = config_file(args)
    preset = get_preset(args.preset) if args.preset else None
    cfg = build_config(args.model, preset=preset, config=config, changes=changes)
    if args.model_arg:
        cfg.model.overrides = {**cfg.model.overrides,
                               **check_overrides(cfg.model.name, parse_model_args(args.model_arg), "--model-arg")}
    return cfg.validate()


def run(args):
    if args.list_presets:
        print(describe_presets())
        return 0
    cfg = build_run_config(args)
    if args.resolve and not args.dump_config:
        raise UserError("--resolve goes with --dump-config: it prints the config with `auto` resolved for this machine")
    if args.dump_config:
        notes = []
        if args.resolve:
            from patchbench.train import resolve_config

            cfg, notes = resolve_config(cfg, progress=args.progress)
        print("".join(f"# resolved here: {note}\n" for note in notes) + to_toml(cfg), end="")
        return 0
    if not args.resume and not args.out:
        raise UserError("--out RUN_DIR is required: the folder that will hold the run")
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--out {args.out} and --resume {args.resume} differ; give only --resume RUN_DIR")
    from patchbench.train import TrainingDiverged, train_run

    out = args.resume or args.out
    try:
        s = train_run(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, progress=args.progress)
    except TrainingDiverged as e:
        print(f"patchbench train: stopped: {e} (last good checkpoint kept in {out}/checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # the message (when there is one) says a checkpoint was written and how to go on
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"patchbench train: {e or 'interrupted'}", file=sys.stderr)
        return 130
    if s.get("epochs_done") and int(os.environ.get("RANK", "0")) == 0:
        print(f"{s.get('label', s['model'])}: final top-1 {s['final_top1']:.4f} (lowest-loss epoch "
              f"{s['lowest_loss_epoch']}: {s['lowest_loss_top1']:.4f}), {s['params']:,} params, "
              f"{s['wall_time_s']:.1f}s -> {out}")
    return 0
