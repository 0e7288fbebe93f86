"""`patchbench compare --preset P [--models a,b] [--seeds 0,1,2] [--data SRC] [--param-budget 1.0M] --out STUDY`.

Trains every (model, seed) of the study as STUDY/runs/<model>-s<seed>, skipping finished runs and
resuming interrupted ones, then writes STUDY/report.md and report.html (see patchbench.compare).
"""

from __future__ import annotations

from patchbench.config import get_preset
from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("compare", help="train models x seeds into a study folder, then write its report",
                       description="Train every (model, seed) of a preset into STUDY/runs/ (finished runs are "
                       "skipped, interrupted ones resumed), then write STUDY/report.md and report.html.")
    add_study_args(p, default_seeds="0,1,2")
    p.add_argument("--models", metavar="A,B,C", help="comma-separated model names (default: the preset's)")
    p.add_argument("--param-budget", metavar="N", help="size each model's width to N parameters (±5%%), "
                   "e.g. 1.0M; the chosen widths are stored in study.json and stated in the report")
    p.set_defaults(func=run)


def add_study_args(p, default_seeds: str) -> None:
    """Arguments shared by compare and sweep."""
    p.add_argument("--preset", required=True, metavar="P", help="training recipe (see config.py): seed, "
                   "study160, quick, smoke")
    p.add_argument("--seeds", default=default_seeds, metavar="0,1,2", help=f"seeds (default: {default_seeds})")
    p.add_argument("--data", metavar="SRC", help="dataset name, archive (.tgz/.zip) or folder "
                   "(default: the preset's, imagenette-160)")
    p.add_argument("--out", required=True, metavar="STUDY", help="study folder (created; re-use it to resume)")
    p.add_argument("--lock-timeout", type=float, default=600.0, metavar="S",
                   help="a run lock whose heartbeat is older than S seconds is stale and taken over (default 600)")
    p.add_argument("--format", default="md,html", metavar="md,html", help="report formats (default: md,html)")
    p.add_argument("--no-report", action="store_true", help="only train; make the report later with "
                   "`patchbench report STUDY`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def report_formats(args):
    from patchbench.report import parse_formats

    return () if args.no_report else parse_formats(args.format)


def print_result(result) -> None:
    o = result.outcome
    print(f"{result.study}: {len(o['trained'])} run(s) trained, {len(o['done'])} already finished, "
          f"{len(o['held'])} held by other workers, {len(o['failed'])} failed")
    for name in o["failed"]:
        print(f"  failed: {name} (see runs/{name}/summary.json; delete the folder to try again)")
    for path in result.reports:
        print(f"wrote {path}")


def run(args) -> int:
    from patchbench.compare import compare, parse_budget, parse_names, parse_seeds

    if args.lock_timeout <= 0:
        raise UserError(f"--lock-timeout must be a positive number of seconds, got {args.lock_timeout}")
    preset = get_preset(args.preset)
    models = parse_names(args.models, "--models") if args.models else list(preset.models)
    result = compare(preset, models, parse_seeds(args.seeds), args.out, source=args.data,
                     param_budget=parse_budget(args.param_budget) if args.param_budget else None,
                     progress=not args.quiet, stale_after=args.lock_timeout, report_formats=report_formats(args))
    print_result(result)
    return 1 if result.outcome["failed"] else 0
