"""`patchbench sweep --grid 'patch_size=2,4,8 kernel_size=3,5,7,9' --model M --preset P [flags] --out STUDY`.

Each grid cell is a set of model overrides; every (cell, seed) is a run of the study, with compare's
skip/resume rules and per-run locks, so several processes or machines can share one sweep folder.
The report gains a heatmap of final top-1 over the grid. Training and data flags apply to every run.
"""

from __future__ import annotations

from patchbench.commands.compare import (
    add_study_args,
    exit_code,
    print_result,
    study_inputs,
)


def add_parser(sub):
    p = sub.add_parser("sweep", help="train a grid of model overrides x seeds into a study folder",
                       description="Expand --grid into runs of one model (each cell: model overrides), train "
                       "them into STUDY/runs/ like compare does, then write the report with a heatmap.")
    p.add_argument("--grid", required=True, metavar="'K=V1,V2 K2=...'",
                   help="space-separated KEY=V1,V2,... model overrides, e.g. 'patch_size=2,4,8 kernel_size=3,5,7,9'; "
                   "values are checked against the model's signature")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to sweep, e.g. convmixer_256_8")
    add_study_args(p, default_seeds="0")
    p.set_defaults(func=run)


def run(args) -> int:
    from patchbench.commands.parse import parse_grid
    from patchbench.study import sweep

    result = sweep(model=args.model, grid=parse_grid(args.grid), out=args.out, **study_inputs(args))
    print_result(result)
    return exit_code(result)
