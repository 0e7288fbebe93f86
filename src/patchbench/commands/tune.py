"""`patchbench tune [--preset budget] [--models a,b,c] [flags] --out STUDY`: the same search for every family.

Runs the recipe's [tune] search (patchbench.study.search): for every model the same Sobol trials of learning
rate and weight decay (and patch size, for the models that take one) at the search's compute
budget, scored on a holdout of train; ranges widened where an optimum lies on their edge, with the
same number of trials for every family; the best two re-run with a second seed. Prints the choice as
recipe tables: one per model, or with `shared = true` one recipe for them all (ranked by their mean). Every trial is a run of the study: running it again resumes what is missing.
"""

from __future__ import annotations

from patchbench.commands.compare import (
    add_study_args,
    print_result,
    study_inputs,
    study_models,
)
from patchbench.errors import UserError


def add_parser(sub):
    p = sub.add_parser("tune", help="the same hyper-parameter search for every family, on a holdout of train",
                       description="Run the recipe's [tune] search for every model into STUDY/runs/ (holdout "
                       "of train, never val), then print each family's choice and write the report.")
    p.add_argument("--models", metavar="A,B,C", help="comma-separated model names (default: the preset's)")
    p.add_argument("--param-budget", metavar="N", help="size each model to N parameters (±5%%) at each patch "
                   "size (default: the preset's)")
    add_study_args(p, default_seeds=None)
    p.set_defaults(func=run, preset_default="budget")


def run(args) -> int:
    from patchbench.commands.parse import parse_budget
    from patchbench.study.search import choice_toml, tune

    if not args.preset and not args.config:
        args.preset = args.preset_default
    inputs = study_inputs(args)
    given = inputs["changes"].get("train", {})
    if "epochs" in given or "compute_budget" in given:
        raise UserError("tune trains every trial for its search's compute_budget ([tune] in the recipe); drop "
                        "--epochs / --compute-budget")
    models = study_models(args, inputs)
    result = tune(models, args.out, param_budget=parse_budget(args.param_budget) if args.param_budget else None,
                  **inputs)
    print_result(result)
    choice = result.meta["tune"]["choice"]
    if choice:
        shared = result.meta["tune"]["space"].get("shared")
        print("the choice, as recipe tables (holdout top-1: the mean of two seeds"
              + (" and of every model: one recipe for all):" if shared else "):"))
        print(choice_toml(choice, shared))
    else:
        print("the search is not finished (a round has runs held by other workers, or unfinished); run the same "
              "command again")
    return 2 if result.outcome.get("stopped") else 0
