"""The entry points: compare (models x seeds, or x compute budgets), ablate (token mixer x stem) and sweep
(grid cells x seeds); each plans its runs, records study.json, trains what is missing and reports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from patchbench import rundir
from patchbench.compute import macs_tag
from patchbench.config import RunConfig
from patchbench.errors import UserError
from patchbench.models import label
from patchbench.recipes import Recipe
from patchbench.study.budget import (
    match_budget,
    model_macs,
    model_params,
    patch_size_of,
)
from patchbench.study.files import study_amp, write_samples, write_study_json
from patchbench.study.plan import (
    PlannedRun,
    RecipeLayers,
    check_cells,
    grid_cells,
    plan_compare,
    plan_sweep,
    typed_grid,
)
from patchbench.study.runner import run_study, train_work


@dataclass
class StudyResult:
    study: Path
    meta: dict
    outcome: dict[str, list[str]]
    reports: list[Path]
    estimates: dict[str, dict] | None = None  # compare --plan: run name -> `estimate`


def _prepare(cfg: RunConfig, progress: bool):
    from patchbench.data import prepare

    return prepare(cfg.data, progress=progress)


def _study_meta(kind: str, layers: RecipeLayers, models: list[str], seeds: list[int], sample: RunConfig) -> dict:
    meta = {"kind": kind, "preset": sample.preset, "models": models, "seeds": seeds, "data": sample.data.source,
            "config_file": layers.config.where if layers.config else None,
            "overrides": {k: v for k, v in (layers.changes or {}).items() if v} or None}
    if layers.reference:
        meta["reference"] = layers.reference
    return meta

def estimate(cfg: RunConfig, data, *, progress: bool = False) -> dict:
    """What one planned run will do: its steps, epochs and training compute, and its training time on
    this machine, estimated from the speed probe's step time (patchbench.autotune, cached) scaled by
    each size's MACs; evaluation is not included."""
    from patchbench.autotune import time_options
    from patchbench.data import holdout_split
    from patchbench.device import resolve_device
    from patchbench.train import Dist, build_model, check_sizes, plan_run, resolve_speed

    t, num_classes = cfg.train, len(data.classes)
    num_train = len(holdout_split(data.train, cfg.data.holdout, cfg.data.holdout_seed)[0]) if cfg.data.holdout \
        else len(data.train)
    macs_at = check_sizes(cfg, num_classes)
    if num_train < t.batch_size:
        raise UserError(f"--batch-size {t.batch_size}: more than the {num_train} training images; a run needs at "
                        f"least one full batch")
    steps = plan_run(cfg, num_train // t.batch_size, macs_at)
    device = resolve_device(t.device)
    speed = resolve_speed(cfg, Dist(0, 1, 0, device), num_classes, t.batch_size, None, progress)
    biggest = max(cfg.data.train_sizes or (cfg.data.img_size,))
    step_s = speed.step_s.get(str(speed.choice))
    if step_s is None:  # given settings, not probed: time them
        with torch.random.fork_rng():
            step_s = time_options(lambda: build_model(cfg, num_classes), [speed.choice], batch_size=t.batch_size,
                                  img_size=biggest, amp=t.amp, device=device, num_classes=num_classes)[0][speed.choice]
    seconds, begin = 0.0, 0
    for stop, size in steps.phases:
        seconds += (stop - begin) * step_s * macs_at[size] / macs_at[biggest]
        begin = stop
    return {"steps": steps.steps, "epochs": steps.epochs, "train_macs": steps.train_macs,
            "budget_macs": t.compute_budget, "train_seconds": seconds, "amp": t.amp, "speed": str(speed.choice)}


def _execute(study: Path, meta: dict, plan: list[PlannedRun], data, *, work, progress: bool,
             stale_after: float, report_formats, plan_only: bool = False) -> StudyResult:
    meta.update(study_amp(study, plan))
    if plan_only:  # print what would run, write nothing
        return StudyResult(study, meta, {"planned": [p.name for p in plan]}, [],
                           {p.name: estimate(p.config, data, progress=progress) for p in plan})
    for p in plan:
        p.config.validate()
    meta["runs"] = [p.name for p in plan]
    meta = write_study_json(study, meta)
    write_samples(study, data)
    outcome = run_study(study, plan, work=work or train_work(progress), progress=progress,
                        stale_after=stale_after)
    reports = []
    if report_formats:
        from patchbench.report import write_report

        reports = write_report(study, report_formats)
    return StudyResult(study, meta, outcome, reports)


def compare(models: list[str], seeds: list[int], out: str | os.PathLike, *, preset: Recipe | None = None,
            config: Recipe | None = None, changes: dict | None = None, param_budget: int | None = None,
            mac_budget: int | None = None, progress: bool = True, stale_after: float = 600.0,
            report_formats=("md", "html"), work=None, kind: str = "compare", extra_meta: dict | None = None,
            plan_only: bool = False, budgets: list[float] | None = None) -> StudyResult:
    """Train models x seeds into `out` (skipping finished runs), then write the report.

    With a budget (`param_budget`, else `mac_budget`, else the recipe's param_budget) every model is
    sized by its width to within ±5% of it; study.json records the chosen sizes, parameters and MACs.
    `plan_only`: train and write nothing; the result's `estimates` say what each run would do. `budgets`
    (else the recipe's): train every (model, seed) once per training-compute budget (curves over compute)."""
    study = Path(out) if plan_only else rundir.check_study_dir(out, "--out")
    layers = RecipeLayers(preset, config, changes)
    if param_budget and mac_budget:
        raise UserError("--param-budget and --mac-budget: give one of them")
    budget, measure = ((param_budget, "params") if param_budget else (mac_budget, "macs") if mac_budget
                       else (layers.param_budget, "params"))
    base = {m: layers.config_for(m).validate() for m in models}
    data = _prepare(base[models[0]], progress)
    num_classes = len(data.classes)
    chosen, chosen_params, chosen_macs = {}, {}, {}
    for m in models:
        img_size, overrides = base[m].data.img_size, base[m].model.overrides
        size = {"num_classes": num_classes, "img_size": img_size}
        chosen[m] = match_budget(m, budget, **size, base=overrides, measure=measure)[0] if budget else dict(overrides)
        chosen_params[m] = model_params(m, **size, **chosen[m])
        chosen_macs[m] = model_macs(m, **size, **chosen[m])
    meta = {**_study_meta(kind, layers, models, seeds, base[models[0]]),
            "param_budget": budget if measure == "params" else None,
            "mac_budget": budget if measure == "macs" else None, "chosen": chosen, "chosen_params": chosen_params,
            "chosen_macs": chosen_macs, "labels": {m: label(m, chosen[m]) for m in models},
            "img_size": base[models[0]].data.img_size, "num_classes": num_classes,
            "patch_sizes": {m: patch_size_of(m, chosen[m], num_classes=num_classes, img_size=base[m].data.img_size)
                            for m in models}, **(extra_meta or {})}
    from_preset = budgets is None and bool(layers.budgets)
    budgets = layers.budgets if budgets is None else budgets
    if budgets:
        given = (changes or {}).get("train", {})
        if given.get("compute_budget") or "epochs" in given:
            which = "the preset's budgets" if from_preset else "--budgets"
            raise UserError(f"{which} ({', '.join(map(macs_tag, budgets))}) give every run its compute budget; "
                            f"drop --compute-budget / --epochs, or pass --budgets none")
        meta["budgets"] = sorted(budgets)
    plan = plan_compare(models, seeds, layers, chosen, budgets)
    return _execute(study, meta, plan, data, work=work, progress=progress, stale_after=stale_after,
                    report_formats=report_formats, plan_only=plan_only)


def ablate(mixers: list[str], stems: list[str], seeds: list[int], out: str | os.PathLike, **kw) -> StudyResult:
    """The controlled experiment: every (token mixer, stem) cell of the isotropic backbone x seeds, at the
    recipe's (or the given) matched budget; the report adds the mixer x stem table and each factor's effect."""
    from patchbench.models.isotropic import MIXERS, STEMS

    for what, given, known in (("--mixers", mixers, MIXERS), ("--stems", stems, STEMS)):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            raise UserError(f"{what} {','.join(given)}: choose from {', '.join(known)}")
    models = [f"iso_{m}_{s}" for m in mixers for s in stems]
    return compare(models, seeds, out, kind="ablation", extra_meta={"ablation": {"mixers": mixers, "stems": stems}},
                   **kw)


def sweep(model: str, grid: dict[str, list], seeds: list[int], out: str | os.PathLike, *,
          preset: Recipe | None = None, config: Recipe | None = None, changes: dict | None = None,
          progress: bool = True, stale_after: float = 600.0, report_formats=("md", "html"), work=None) -> StudyResult:
    """Train every grid cell (model overrides) x seed into `out`, then write the report with its heatmap."""
    study = rundir.check_study_dir(out, "--out")
    layers = RecipeLayers(preset, config, changes)
    grid = typed_grid(model, grid)
    base = layers.config_for(model).validate()
    data = _prepare(base, progress)
    num_classes, img_size = len(data.classes), base.data.img_size
    check_cells(model, grid_cells(grid), base.model.overrides, num_classes=num_classes, img_size=img_size)
    meta = {**_study_meta("sweep", layers, [model], seeds, base), "param_budget": None, "grid": grid,
            "chosen": {}, "chosen_params": {}, "img_size": img_size, "num_classes": num_classes,
            "patch_sizes": {model: patch_size_of(model, base.model.overrides, num_classes=num_classes,
                                                 img_size=img_size)}}
    plan = plan_sweep(model, grid, seeds, layers)
    return _execute(study, meta, plan, data, work=work, progress=progress, stale_after=stale_after,
                    report_formats=report_formats)
