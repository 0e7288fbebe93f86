"""`patchbench ablate [--preset ablation] [--mixers ...] [--stems ...] [--seeds 0,1,2] [--budgets 2.5T,10T] [flags] --out STUDY`.

The controlled experiment: one isotropic backbone (patchbench.models.isotropic) with every token
mixer x stem, sized to the same parameter (or MAC) budget, trained x seeds into STUDY/runs/ with
compare's skip/resume rules and per-run locks. The report adds the mixer x stem table, a heatmap,
and each factor's effect averaged over the other with a significance test, in plain words.
"""

from __future__ import annotations

from patchbench.commands.compare import (
    add_study_args,
    exit_code,
    print_result,
    study_inputs,
)
from patchbench.commands.parse import parse_budgets
from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("ablate", help="token mixer x stem on one isotropic backbone, at matched budgets",
                       description="Train every (token mixer, stem) cell of the isotropic backbone x seeds into "
                       "STUDY/runs/ at one parameter (or MAC) budget, then write the report with the mixer x "
                       "stem table, a heatmap and each factor's effect with a significance test.")
    p.add_argument("--mixers", default="conv,attention,mlp,pool,identity", metavar="A,B",
                   help="token mixers (default: all five: conv,attention,mlp,pool,identity)")
    p.add_argument("--stems", default="patch,conv", metavar="A,B", help="stems (default: patch,conv)")
    p.add_argument("--param-budget", metavar="N", help="size every cell to N parameters (±5%%), e.g. 1.0M "
                   "(default: the preset's)")
    p.add_argument("--mac-budget", metavar="N", help="size every cell to N MACs per image instead, e.g. 60M")
    p.add_argument("--budgets", metavar="2T,8T", help="train every cell and seed once at each of these training-"
                   "compute budgets (MACs): equal compute for every cell, at several budgets")
    add_study_args(p, default_seeds="0,1,2")
    p.set_defaults(func=run, preset_default="ablation")


def run(args) -> int:
    from patchbench.commands.parse import parse_budget, parse_names
    from patchbench.study import ablate

    if not args.preset and not args.config:
        args.preset = args.preset_default
    if args.param_budget and args.mac_budget:
        raise UserError("--param-budget and --mac-budget: give one of them")
    result = ablate(parse_names(args.mixers, "--mixers"), parse_names(args.stems, "--stems"), out=args.out,
                    param_budget=parse_budget(args.param_budget, "--param-budget") if args.param_budget else None,
                    mac_budget=parse_budget(args.mac_budget, "--mac-budget") if args.mac_budget else None,
                    budgets=parse_budgets(args.budgets), **study_inputs(args))
    print_result(result)
    return exit_code(result)
