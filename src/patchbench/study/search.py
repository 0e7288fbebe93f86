"""Equal tuning effort: the same search for every family, on a holdout carved out of train.

    result = tune(["convmixer_256_12", "vit_tiny_6l8h", "resnet18"], "studies/tuning", preset=get_preset("budget"))
    result.meta["tune"]["choice"]   # {model: {"lr", "weight_decay", "patch_size"?}}

The recipe declares the search (`[tune]`: log-ranges of `lr` and `weight_decay`, a list of
`patch_size`s, the number of `trials`, the `compute_budget` every trial trains for and the `holdout`
fraction). Every family then gets the same search:

1. `trials` runs at points of one scrambled Sobol sequence in the unit square, the same points for
   every family, mapped onto its log-ranges of learning rate and weight decay; models that take a
   patch size cycle through the declared ones (ConvMixer and the ViT alike, or neither when none is
   declared); every model is sized to the recipe's parameter budget at its patch size. Each trial is
   scored by its final top-1 on a seeded class-stratified holdout of train, never on val.
2. A family whose best trial lies in the outer eighth of a range (in log space) has that range widened
   on that side by half its width; then every family runs `trials // 2` more trials at the sequence's
   next points, in its own ranges, so that every family gets the same number of trials. At most
   `MAX_WIDENINGS` such rounds.
3. Each family's best two trials run again with a second seed; the choice is the one with the higher
   mean holdout top-1 over both seeds, and is meant to be used at every budget.

With `shared = true` the same search chooses one learning rate and weight decay for all the models
together, every trial ranked by its mean over them: one recipe for every cell of an ablation.

Every trial is a run directory of the study (compare's skip/resume rules and locks); running the
command again redoes nothing that finished and takes the same decisions from the same results.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from patchbench import rundir
from patchbench.errors import UserError
from patchbench.models import arguments, label
from patchbench.recipes import Recipe
from patchbench.study.budget import match_budget, model_params
from patchbench.study.files import study_amp, write_samples, write_study_json
from patchbench.study.plan import PlannedRun, RecipeLayers
from patchbench.study.runner import run_study, train_work
from patchbench.study.studies import StudyResult, _prepare, _study_meta

MAX_WIDENINGS = 2
EDGE = 1 / 8  # a best value this close to a range's end (fraction of its log-width) widens the range
SEQUENCE = 256  # Sobol points drawn once; a search uses them in order


def sobol_points(seed: int) -> list[tuple[float, float]]:
    from scipy.stats import qmc

    return [tuple(map(float, p)) for p in qmc.Sobol(d=2, scramble=True, seed=seed).random(SEQUENCE)]


def log_value(unit: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + unit * (math.log(hi) - math.log(lo)))


def log_position(value: float, lo: float, hi: float) -> float:
    return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))


def widen(ranges: dict[str, list[float]], best: dict) -> dict[str, list[float]]:
    """`ranges` with each one whose best value lies in its outer eighth widened on that side by half its
    (log) width; the same ranges when no optimum is on an edge."""
    out = {}
    for key, (lo, hi) in ranges.items():
        p, ratio = log_position(best[key], lo, hi), math.sqrt(hi / lo)
        out[key] = [lo / ratio, hi] if p < EDGE else [lo, hi * ratio] if p > 1 - EDGE else [lo, hi]
    return out


def check_space(space: dict, where: str) -> dict:
    """The recipe's [tune] table, checked: log-ranges, patch sizes, trials, budget, holdout."""
    from patchbench.values import SI, coerce

    known = {"lr", "weight_decay", "patch_size", "trials", "compute_budget", "holdout", "holdout_seed", "seed",
             "shared"}
    unknown = sorted(set(space) - known)
    if unknown:
        raise UserError(f"{where}: unknown [tune] key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for key in ("lr", "weight_decay"):
        lo, hi = coerce(space.get(key), tuple[float, float], f"{where}: [tune] {key}")
        if not 0 < lo < hi:
            raise UserError(f"{where}: [tune] {key} = [{lo:g}, {hi:g}]: need 0 < low < high (a log-range)")
        out[key] = [lo, hi]
    out["patch_size"] = coerce(space.get("patch_size", []), list[int], f"{where}: [tune] patch_size")
    out["trials"] = coerce(space.get("trials", 8), int, f"{where}: [tune] trials")
    if not 2 <= out["trials"] <= 64:
        raise UserError(f"{where}: [tune] trials = {out['trials']}: need 2 to 64 trials per family")
    out["compute_budget"] = coerce(space.get("compute_budget", "10T"), SI, f"{where}: [tune] compute_budget")
    out["holdout"] = coerce(space.get("holdout", 0.15), float, f"{where}: [tune] holdout")
    if not 0.05 <= out["holdout"] <= 0.5:
        raise UserError(f"{where}: [tune] holdout = {out['holdout']:g}: need a fraction of train in [0.05, 0.5]")
    out["holdout_seed"] = coerce(space.get("holdout_seed", 0), int, f"{where}: [tune] holdout_seed")
    out["seed"] = coerce(space.get("seed", 0), int, f"{where}: [tune] seed")
    out["shared"] = coerce(space.get("shared", False), bool, f"{where}: [tune] shared")
    if out["shared"] and out["patch_size"]:
        raise UserError(f"{where}: [tune] shared = true chooses one learning rate and weight decay for every model; "
                        f"it searches no patch size (drop patch_size)")
    return out


def _score(study: Path, name: str) -> float | None:
    """A trial's holdout final top-1; -inf for a diverged one; None while it has not finished."""
    path = study / rundir.RUNS / name
    status = rundir.run_status(path)
    if status == rundir.FAILED:
        return -math.inf
    if status != rundir.FINISHED:
        return None
    return rundir.read_summary(path / rundir.SUMMARY)["final_top1"]


def tune(models: list[str], out: str | os.PathLike, *, preset: Recipe | None = None, config: Recipe | None = None,
         changes: dict | None = None, param_budget: int | None = None, progress: bool = True,
         stale_after: float = 600.0, report_formats=("md", "html"), work=None) -> StudyResult:
    """Run the search (module docstring) for every model into the study `out`, round by round; returns
    when it is decided (study.json's tune.choice) or when a round could not finish (run it again)."""
    study = rundir.check_study_dir(out, "--out")
    layers = RecipeLayers(preset, config, changes)
    recipe = config if config is not None and config.inherited("tune") else preset
    space_doc = recipe.inherited("tune") if recipe is not None else None
    if not space_doc:
        raise UserError("the recipe declares no [tune] search (lr and weight_decay log-ranges, trials, ...); "
                        "use --preset budget or a --config with a [tune] table")
    space = check_space(space_doc, recipe.where)
    budget = param_budget or layers.param_budget
    search = RecipeLayers(preset, config, {**(changes or {}),
                                     "data": {**(changes or {}).get("data", {}), "holdout": space["holdout"],
                                              "holdout_seed": space["holdout_seed"]},
                                     "train": {**(changes or {}).get("train", {}),
                                               "compute_budget": space["compute_budget"]}})
    base = {m: search.config_for(m).validate() for m in models}
    data = _prepare(base[models[0]], progress)
    num_classes, points = len(data.classes), sobol_points(space["seed"])
    sized: dict[tuple[str, int | None], dict] = {}

    def overrides_for(model: str, patch: int | None) -> dict:
        if (model, patch) not in sized:
            own = dict(base[model].model.overrides, **({"patch_size": patch} if patch else {}))
            img = base[model].data.img_size
            sized[model, patch] = match_budget(model, budget, num_classes=num_classes, img_size=img,
                                               base=own)[0] if budget else own
        return sized[model, patch]

    def trial(model: str, index: int, ranges: dict, round_: int, seed: int = 0,
              again: dict | None = None) -> tuple[dict, PlannedRun]:
        """Trial `index` of `model` at its Sobol point in `ranges` (or `again`'s values, with another seed)."""
        u_lr, u_wd = points[index]
        patches = space["patch_size"] if "patch_size" in arguments(model) else []
        patch = patches[index % len(patches)] if patches else None
        lr, wd = (again["lr"], again["weight_decay"]) if again else \
            (log_value(u_lr, *ranges["lr"]), log_value(u_wd, *ranges["weight_decay"]))
        entry = {"model": model, "trial": index, "round": round_, "seed": seed, "lr": lr, "weight_decay": wd,
                 **({"patch_size": patch} if patch else {})}
        overrides = overrides_for(model, patch)
        cfg = search.config_for(model, seed, overrides)
        cfg.train = dataclasses.replace(cfg.train, lr=entry["lr"], weight_decay=entry["weight_decay"])
        entry["label"] = label(model, overrides)
        return entry, PlannedRun(f"{model}-t{index:02d}-s{seed}", cfg)

    meta = {**_study_meta("tune", layers, models, [0, 1], base[models[0]]), "param_budget": budget,
            "img_size": base[models[0]].data.img_size, "num_classes": num_classes,
            "chosen": {}, "chosen_params": {}, "labels": {}, "patch_sizes": {}}
    ranges = {m: [{k: list(space[k]) for k in ("lr", "weight_decay")}] for m in models}
    entries: dict[str, dict] = {}
    plan: list[PlannedRun] = []
    outcome: dict[str, list[str]] = {"trained": [], "done": [], "held": [], "failed": [], "stopped": []}

    def run_round(new: list[tuple[dict, PlannedRun]]) -> bool:
        """Train a round's runs; True when every one of them has finished (or diverged)."""
        for entry, p in new:
            entries[p.name] = entry
            plan.append(p)
        meta.update(study_amp(study, plan))
        for _, p in new:
            p.config.validate()
        meta["runs"] = [p.name for p in plan]
        meta["tune"] = {"space": space, "ranges": ranges, "trials": entries, "choice": None}
        write_study_json(study, meta)
        got = run_study(study, [p for _, p in new], work=work or train_work(progress), progress=progress,
                        stale_after=stale_after)
        for key in outcome:
            outcome[key] += got[key]
        return all(_score(study, p.name) is not None for _, p in new)

    def score(model: str, index: int, seeds=(0,)) -> float:
        """A trial's holdout top-1 (its mean over `seeds`); with a shared search, the mean over every model."""
        names = [f"{m}-t{index:02d}-s{s}" for m in (models if space["shared"] else [model]) for s in seeds]
        return sum(_score(study, name) for name in names) / len(names)

    def best_of(model: str, n: int = 1) -> list[dict]:
        """`model`'s n best seed-0 trials (ranked over every model with a shared search)."""
        done = [e for e in entries.values() if e["model"] == model and e["seed"] == 0]
        return sorted(done, key=lambda e: -score(model, e["trial"]))[:n]

    n, index = space["trials"], 0
    complete = run_round([trial(m, i, ranges[m][-1], 1, 0) for m in models for i in range(n)])
    index = n
    for widening in range(MAX_WIDENINGS):
        if not complete:
            break
        wider = {m: widen(ranges[m][-1], best_of(m)[0]) for m in models}
        if all(wider[m] == ranges[m][-1] for m in models):
            break
        for m in models:
            ranges[m].append(wider[m])
        extra = n // 2
        complete = run_round([trial(m, index + i, ranges[m][-1], widening + 2, 0) for m in models
                              for i in range(extra)])
        index += extra
    choice = {}
    if complete:
        reruns = []
        for m in models:
            reruns += [trial(m, e["trial"], {}, e["round"], seed=1, again=e) for e in best_of(m, n=2)]
        complete = run_round(reruns)
    if complete:
        for m in models:
            mean = {e["trial"]: score(m, e["trial"], seeds=(0, 1))
                    for e in entries.values() if e["model"] == m and e["seed"] == 1}
            pick = max(mean, key=mean.get)
            e = entries[f"{m}-t{pick:02d}-s1"]
            choice[m] = {"lr": e["lr"], "weight_decay": e["weight_decay"], "mean_holdout_top1": mean[pick],
                         "trial": pick, **({"patch_size": e["patch_size"]} if "patch_size" in e else {})}
        meta["tune"]["choice"] = choice
        meta["chosen"] = {m: overrides_for(m, choice[m].get("patch_size")) for m in models}
        meta["labels"] = {m: label(m, meta["chosen"][m]) for m in models}
        meta["chosen_params"] = {m: model_params(m, num_classes=num_classes, img_size=base[m].data.img_size,
                                                 **meta["chosen"][m]) for m in models}
        write_study_json(study, meta)
    write_samples(study, data)
    reports = []
    if report_formats:
        from patchbench.report import write_report

        reports = write_report(study, report_formats)
    return StudyResult(study, meta, outcome, reports)


def choice_toml(choice: dict, shared: bool = False) -> str:
    """The choice as recipe tables to copy into a preset: one [train] table for a shared search (the one recipe
    of every model), else a table per model."""
    if shared:
        c = next(iter(choice.values()))
        return f"[train]\nlr = {c['lr']:.4g}\nweight_decay = {c['weight_decay']:.4g}\n"
    lines = []
    for model, c in choice.items():
        lines += [f"[per_model.{model}.train]", f"lr = {c['lr']:.4g}", f"weight_decay = {c['weight_decay']:.4g}"]
        if "patch_size" in c:
            lines += [f"[per_model.{model}.overrides]", f"patch_size = {c['patch_size']}"]
        lines.append("")
    return "\n".join(lines)
