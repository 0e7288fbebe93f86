"""`patchbench compare --preset P [--models a,b] [--seeds 0,1,2] [flags] --out STUDY`.

Trains every (model, seed) of the study as STUDY/runs/<model>-s<seed>, skipping finished runs and
resuming interrupted ones, then writes STUDY/report.md and report.html (see patchbench.study).
Every training and data flag of `train` is accepted and applies to every run.
"""

from __future__ import annotations

from patchbench.commands import parse
from patchbench.commands.options import (
    add_progress_flag,
    add_recipe_flags,
    config_file,
    recipe_changes,
)
from patchbench.errors import UserError
from patchbench.recipes import get_preset
from patchbench.values import coerce


def add_parser(sub):
    p = sub.add_parser("compare", help="train models x seeds into a study folder, then write its report",
                       description="Train every (model, seed) of a preset into STUDY/runs/ (finished runs are "
                       "skipped, interrupted ones resumed), then write STUDY/report.md and report.html. "
                       "Training and data flags apply to every run and are recorded in study.json.")
    add_study_args(p, default_seeds="0,1,2")
    p.add_argument("--models", metavar="A,B,C", help="comma-separated model names (default: the preset's)")
    p.add_argument("--param-budget", metavar="N", help="size each model's width to N parameters (±5%%), "
                   "e.g. 1.0M; the chosen widths are stored in study.json and stated in the report")
    p.add_argument("--mac-budget", metavar="N", help="size each model's width to N MACs per image instead "
                   "(±5%%), e.g. 100M (--param-budget and --mac-budget size the model; --compute-budget sets how "
                   "long each run trains)")
    p.add_argument("--budgets", metavar="5T,10T", help="train every (model, seed) once at each of these "
                   "training-compute budgets (MACs, SI suffixes), for accuracy-against-compute curves (default: the "
                   "preset's budgets, if any; none: train without them)")
    p.add_argument("--plan", action="store_true", help="print each run's steps, training compute and estimated "
                   "training time on this machine, then exit without training (the study folder is not written; "
                   "the data cache is prepared and the speed probe may be cached, as training would)")
    p.set_defaults(func=run)


def add_study_args(p, default_seeds: str | None) -> None:
    """Arguments shared by compare, sweep, ablate and tune (which has no --seeds: its search fixes them)."""
    p.add_argument("--preset", metavar="P", help="training recipe (`patchbench train --list-presets`); "
                   "optional with a --config that names one")
    if default_seeds is not None:
        p.add_argument("--seeds", default=default_seeds, metavar="0,1,2", help=f"seeds (default: {default_seeds})")
    p.add_argument("--out", required=True, metavar="STUDY", help="study folder (created; re-use it to resume)")
    p.add_argument("--lock-timeout", default="600", metavar="S",
                   help="a run lock whose heartbeat is older than S seconds is stale and taken over (default 600)")
    p.add_argument("--format", default="md,html", metavar="md,html", help="report formats (default: md,html)")
    p.add_argument("--no-report", action="store_true", help="only train; make the report later with "
                   "`patchbench report STUDY`")
    add_progress_flag(p)
    add_recipe_flags(p, exclude=("seed",))


def study_inputs(args) -> dict:
    """The recipe layers and study options common to compare, sweep and ablate, parsed and checked."""
    from patchbench.commands.parse import parse_seeds

    lock_timeout = coerce(args.lock_timeout, float, "--lock-timeout")
    if lock_timeout <= 0:
        raise UserError(f"--lock-timeout {args.lock_timeout}: need a positive number of seconds")
    config = config_file(args)
    preset = get_preset(args.preset) if args.preset else None
    if preset is None and config is None:
        raise UserError("--preset is required (see `patchbench train --list-presets`), or a --config recipe")
    inputs = {"preset": preset, "config": config, "changes": recipe_changes(args, exclude=("seed",)),
              "progress": args.progress, "stale_after": lock_timeout, "report_formats": report_formats(args)}
    if hasattr(args, "seeds"):
        inputs["seeds"] = parse_seeds(args.seeds)
    return inputs


def report_formats(args):
    from patchbench.report import parse_formats

    return () if args.no_report else parse_formats(args.format)


def exit_code(result) -> int:
    """2 when a run could not go on (bad input, a damaged checkpoint, a full disk), 1 when one diverged, else 0."""
    return 2 if result.outcome.get("stopped") else 1 if result.outcome["failed"] else 0


def print_result(result) -> None:
    o = result.outcome
    print(f"{result.study}: {len(o['trained'])} run(s) trained, {len(o['done'])} already finished, "
          f"{len(o['held'])} held by other workers, {len(o['failed'])} failed, {len(o.get('stopped', []))} stopped")
    for name in o["failed"]:
        print(f"  failed: {name} (see runs/{name}/summary.json; delete the folder to try again)")
    for line in o.get("stopped", []):
        print(f"  stopped: {line}")
    for path in result.reports:
        print(f"wrote {path}")


def print_plan(result) -> None:
    """compare --plan: one line per run, then the total."""
    print(f"{result.study}: {len(result.estimates)} run(s), precision {result.meta.get('amp')} "
          f"({result.meta.get('amp_rule')}); training time estimated from a few timed steps on this machine")
    print("| run | steps | epochs | train compute (MACs) | of the budget | layout, kernels | est. training time |")
    print("|---|---:|---:|---:|---:|---|---:|")
    total = 0.0
    for name, e in result.estimates.items():
        share = f"{e['train_macs'] / e['budget_macs']:.1%}" if e["budget_macs"] else "–"
        time_s = e["train_seconds"]
        total += time_s
        shown = f"{time_s / 60:.1f} min"
        print(f"| {name} | {e['steps']:,} | {e['epochs']} | {e['train_macs']:.3g} | {share} | {e['speed']} | {shown} |")
    print(f"total estimated training time: {total / 3600:.2f} h (evaluation after each epoch not included)")


def study_models(args, inputs: dict) -> list[str]:
    """--models, else the config file's models, else its (or --preset's) preset's."""
    from patchbench.commands.parse import parse_names
    from patchbench.config import current_name

    preset, config = inputs["preset"], inputs["config"]
    base = preset or (get_preset(config.preset) if config and config.preset else None)
    models = [current_name(m, "model") for m in parse_names(args.models, "--models")] if args.models else \
        list((config.models if config and config.models else None) or (base.models if base else []))
    if not models:
        raise UserError("no models: pass --models a,b,c (the recipe lists none)")
    return models


def run(args) -> int:
    from patchbench.commands.parse import parse_budget
    from patchbench.study import compare

    inputs = study_inputs(args)
    models = study_models(args, inputs)
    result = compare(models=models, out=args.out,
                     param_budget=parse_budget(args.param_budget) if args.param_budget else None,
                     mac_budget=parse_budget(args.mac_budget, "--mac-budget") if args.mac_budget else None,
                     plan_only=args.plan, budgets=parse.parse_budgets(args.budgets), **inputs)
    if args.plan:
        print_plan(result)
        return 0
    print_result(result)
    return exit_code(result)
