"""A study's report as text: markdown (+ PNG figures), a self-contained HTML page, a terminal table.

    write_report("runs/quick")            # -> report.md, report.html, figures/*.png in that folder

A pure function of the study's files (see report/load.py): nothing here imports torch or the
training code, so a report can be made anywhere the files are, and it says the same thing every
time it is made. Runs that are missing, still running, failed or half-written are listed in the
report and left out of the statistics; they never crash it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from patchbench import rundir
from patchbench.compute import macs_tag
from patchbench.errors import UserError
from patchbench.report.figures import (
    budget_curves,
    figure_accuracy_curves,
    figure_accuracy_vs_time,
    figure_budget_curves,
    figure_confusion,
    figure_heatmap,
    figure_loss_curves,
    figure_patch_grid,
    figure_png,
    figure_sweep_heatmap,
    figure_tradeoffs,
    patch_views,
)
from patchbench.report.load import Group, Study, group_runs, load_study
from patchbench.report.stats import (
    MIXER_WORDS,
    STEM_WORDS,
    cell_contrasts,
    cell_model,
    compute_to_reach,
    conclusion,
    curve_crossings,
    effect_line,
    factor_effects,
    factorial_cells,
    holm,
    interval,
    mean_std,
    pct,
    pm,
    reference_rows,
    results_rows,
    t_interval,
    two_way_anova,
    welch_t_test,
)

FORMATS = ("md", "html")

def make_figures(study: Study, groups: list[Group], rows: list[dict]) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) for every figure the study's files allow (a figure function
    returns None when they do not)."""
    figs = [("accuracy", "Validation top-1 per epoch", figure_accuracy_curves(groups)),
            ("accuracy-time", "Validation top-1 against training time", figure_accuracy_vs_time(groups)),
            ("loss", "Train and validation loss per epoch", figure_loss_curves(groups)),
            ("tradeoffs", "Final top-1 against size, compute and speed", figure_tradeoffs(rows))]
    if study.meta.get("budgets"):
        figs.insert(0, ("budget-curves", "Final top-1 against training compute",
                        figure_budget_curves(groups, study.meta.get("labels"))))
    if study.meta.get("grid"):
        figs.append(("sweep", "Sweep: final top-1 over the grid", figure_sweep_heatmap(groups, study.meta["grid"])))
    if study.meta.get("ablation"):
        a = study.meta["ablation"]
        budgets = sorted({g.budget for g in groups if g.budget is not None})
        for b in budgets if len(budgets) > 1 else [None]:  # a heatmap per compute budget in a study of several
            cells = factorial_cells([g for g in groups if b is None or g.budget == b], a["mixers"], a["stems"])
            figs.append((f"ablation-{macs_tag(b)}" if b else "ablation",
                         "Token mixer x stem: final top-1" + (f" at {macs_tag(b)} MACs" if b else ""),
                         figure_heatmap(cells, a["mixers"], a["stems"], "token mixer", "stem")))
    figs.append(("patches", "Val images cut into each model's patches",
                 figure_patch_grid(study.samples, patch_views(groups, study.meta.get("patch_sizes")))))
    figs += [(f"confusion-{_slug(g.label)}", f"Confusion matrix: {g.label}", figure_confusion(g)) for g in groups]
    return [(stem, caption, fig) for stem, caption, fig in figs if fig is not None]


# --------------------------------------------------------------------------------------------------
# Text


def _human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


TABLE_NOTE = ("Final top-1: the last epoch's accuracy on the split named in the table, mean ± sample std over "
              "the n finished seeds. Best-epoch top-1 is the epoch with the lowest loss on that same split: "
              "optimistic (chosen on the split it is measured on), shown only for comparison.")
TABLE_HEADER = ["model", "params", "MACs", "train img/s", "infer img/s", "final top-1 % (mean ± std)", "n",
                "best-epoch top-1 %", "epochs", "res", "split", "wall time/run"]


def table_cells(row: dict) -> list[str]:
    n = f"{row['n']}" + (f" of {row['runs']}" if row["runs"] != row["n"] else "")
    wall = "–" if row["wall_time_s"] is None else f"{row['wall_time_s'] / 60:.1f} min"
    ips = [("–" if row[k] is None else f"{row[k]:,.0f}") for k in ("train_images_per_s", "infer_images_per_s")]
    return [row["label"], "–" if row["params"] is None else f"{row['params']:,}", _human(row["macs"]), *ips,
            pct(row["final_mean"]) + pm(row["final_std"]), n, pct(row["best_mean"]),
            str(row["epochs"] or "–"), f"{row['img_size']}px" if row["img_size"] else "–", row["split"] or "–", wall]


def model_lines(meta: dict, groups: list[Group]) -> list[str]:
    """Which configuration each model ran with, its parameters and MACs; with a matched budget, how
    close each came to it."""
    budget, macs_budget = meta.get("param_budget"), meta.get("mac_budget")
    chosen = meta.get("chosen") or {g.model: g.overrides for g in groups}
    labels = {**{g.model: g.runs[0].label for g in groups if g.runs}, **(meta.get("labels") or {})}
    params_of = {g.model: (g.done[0].summary.get("params") if g.done else None) for g in groups}
    lines = ([f"Parameter budget {_human(budget)} (±5%), each family sized by its width:"] if budget else
             [f"MAC budget {_human(macs_budget)} per image (±5%), each family sized by its width:"] if macs_budget else [])
    for model, overrides in chosen.items():
        params = (meta.get("chosen_params") or {}).get(model) or params_of.get(model)
        macs = (meta.get("chosen_macs") or {}).get(model)
        size = "" if params is None else f" → {params:,} params"
        if budget and params is not None:
            size += f" ({100 * (params - budget) / budget:+.1f}%)"
        if macs is not None:
            size += f", {_human(macs)} MACs" + (f" ({100 * (macs - macs_budget) / macs_budget:+.1f}%)" if macs_budget else "")
        args = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "its defaults"
        lines.append(f"{labels.get(model, model)}: {args}{size}")
    lines += provenance_lines(groups, labels)
    return lines


def provenance_lines(groups: list[Group], labels: dict[str, str] | None = None) -> list[str]:
    """How each model's runs computed: the precision, the crop implementation and patchbench.cpu's
    layers, as their config.json records them (runs of earlier versions recorded none); said once for
    every run when all computed alike, else once per model."""
    seen: dict[str, set[str]] = {}
    for g in groups:
        for run in g.runs:
            derived = (run.config or {}).get("derived") or {}
            if "crop" in derived:
                amp = ((run.config or {}).get("train") or {}).get("amp")
                seen.setdefault(g.model, set()).add(f"precision {'fp32' if amp == 'none' else amp}; crops: "
                                                    f"{derived['crop']}; CPU operators: {derived.get('kernels', '?')}")
    alike = set().union(*seen.values())
    if len(seen) > 1 and len(alike) == 1 and set(seen) == {g.model for g in groups if g.runs}:
        return [f"Every run computed with: {alike.pop()}"]
    return [f"{(labels or {}).get(model, model)} computed with: {what}" for model, whats in seen.items()
            for what in sorted(whats)]


def reference_section(meta: dict, groups: list[Group]) -> list[tuple[str, list[str]]]:
    """"Against the reference": the published numbers (study.json's reference) next to ours."""
    rows = reference_rows(meta.get("reference"), groups)
    if not rows:
        return []
    lines = [f"Reference: {meta['reference'].get('source', 'published figures')}.", "",
             ("| model | reference final % (best) | ours final % (mean ± std) | n | ours min–max | ours highest epoch % "
             "| ours − reference | reference inside our range | within ±2 points |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{pct(r['ref_final'])} ({pct(r['ref_best'])})"
        rng = "–" if r["min"] is None else f"{pct(r['min'])}–{pct(r['max'])}"
        gap = "–" if "gap" not in r else f"{100 * r['gap']:+.1f}"
        yes = {True: "yes", False: "no"}
        lines.append(f"| {r['model']} | {ref} | {pct(r['mean'])}{pm(r['std'])} | {r['n']} | {rng} | {pct(r['best'])} "
                     f"| {gap} | {yes.get(r.get('inside'), '–')} | {yes.get(r.get('within_2'), '–')} |")
    return [("Against the reference", lines)]


def ablation_section(study: Study, groups: list[Group]) -> list[tuple[str, list[str]]]:
    """The setting once, then at each compute budget (one block when the study has one): the mixer x stem
    table and the analysis of variance with the effects it supports; across budgets, whether the order of
    the mixers changes and how each cell fits against val."""
    a = study.meta.get("ablation")
    if not a:
        return []
    mixers, stems = a["mixers"], a["stems"]
    budgets = sorted({g.budget for g in groups if g.budget is not None})
    at = {b: [g for g in groups if g.budget == b] for b in budgets} if len(budgets) > 1 else {None: groups}
    lines = [ablation_setting(study, groups, a), ""]
    cells_at = {}
    for b, mine in at.items():
        cells_at[b] = factorial_cells(mine, mixers, stems)
        if b is not None:
            epochs = sorted({r.summary.get("epochs") for g in mine for r in g.done} - {None})
            span = f" ({epochs[0]}-{epochs[-1]} epochs)" if len(epochs) > 1 else \
                f" ({epochs[0]} epochs)" if epochs else ""
            lines += [f"#### At {macs_tag(b)} MACs of training{span}", ""]
        lines += [*mixer_stem_table(cells_at[b], mixers, stems), "", *factorial_analysis(cells_at[b], mixers, stems), ""]
    if len(cells_at) > 1:
        lines += mixer_ranking(cells_at, mixers, stems)
        models = list(study.meta.get("models") or sorted({g.model for g in groups}))
        lines += fit_lines(groups, models, budgets, study.meta.get("labels") or {})
    return [("Token mixer x stem", lines[:-1] if lines[-1] == "" else lines)]


STEM_LEGEND = {"patch": "a strided conv (the linear patch embedding)",
               "conv": "a convolutional tokenizer (3x3 convs and max pooling)"}


def ablation_setting(study: Study, groups: list[Group], a: dict) -> str:
    """The setting of a mixer x stem study, said once: size, data, resolution, training length, split, seeds,
    each stem's MACs per image, and what the mixer and stem names mean."""
    meta = study.meta
    runs = [r for g in groups for r in g.done]
    size = (f"{meta['param_budget'] / 1e6:.2g}M parameters" if meta.get("param_budget") else
            f"{meta['mac_budget'] / 1e6:.3g}M MACs" if meta.get("mac_budget") else "their sizes")
    data = Path(meta["data"]).name if meta.get("data") else "the data"  # the archive's name, not its path
    compute = sorted({r.summary.get("budget_macs") for r in runs} - {None})
    epochs = sorted({r.summary.get("epochs") for r in runs} - {None})
    off = [abs(r.summary["train_macs"] / r.summary["budget_macs"] - 1) for r in runs
           if r.summary.get("train_macs") and r.summary.get("budget_macs")]
    length = (f"every cell trained for {' and for '.join(macs_tag(c) for c in compute)} MACs (a cell that costs more "
              "per image trains fewer steps" + (f"; every run within ±{100 * max(off):.1g}% of its budget" if off else "")
              + ")" if compute else f"{'/'.join(map(str, epochs)) or '?'} epochs")
    ns = sorted({len(g.finals()) for g in groups if g.finals()})
    macs = meta.get("chosen_macs") or {}
    per_stem = []
    for s in a["stems"]:
        mine = sorted({f"{macs[cell_model(m, s)] / 1e6:.0f}" for m in a["mixers"] if cell_model(m, s) in macs}, key=float)
        if mine:
            per_stem.append(f"{'-'.join(dict.fromkeys([mine[0], mine[-1]]))}M with the {s} stem")
    legend = ("Mixers: " + ", ".join(f"{k} = {MIXER_WORDS[k]}" for k in a["mixers"] if MIXER_WORDS.get(k, k) != k)
              + "; stems: " + ", ".join(f"{k} = {STEM_LEGEND[k]}" for k in a["stems"] if k in STEM_LEGEND) + ".")
    return (f"Setting: {size} a cell, {data}, {meta.get('img_size')}px, {length}; final top-1 on the "
            f"{runs[0].eval_split if runs else 'val'} split, n={'/'.join(map(str, ns))} seed(s) a cell"
            + (f"; MACs per image {' and '.join(per_stem)}" if per_stem else "")
            + f". {legend} Differences are in points of top-1, with 95% confidence intervals.")


def mixer_stem_table(cells: dict[tuple, list[float]], mixers: list[str], stems: list[str]) -> list[str]:
    """Final top-1 % of every cell (mean ± std, n), with the mean over the other factor in the margins."""
    def avg(values):
        means = [mean_std(v)[0] for v in values]
        return pct(sum(means) / len(means)) if all(m is not None for m in means) else "–"

    cell = {k: "–" if not v else f"{pct(mean_std(v)[0])}{pm(mean_std(v)[1])} (n={len(v)})" for k, v in cells.items()}
    return [("Final top-1 % (mean ± std over seeds), rows: token mixer, columns: stem; the margins are means over "
            "the other factor."), "", "| mixer | " + " | ".join(stems) + " | mean |", "|---|" + "---|" * (len(stems) + 1),
            *[f"| {m} | " + " | ".join(cell[m, s] for s in stems) + f" | {avg([cells[m, s] for s in stems])} |"
              for m in mixers],
            "| mean | " + " | ".join(avg([cells[m, s] for m in mixers]) for s in stems) + " | |"]


def mixer_ranking(cells_at: dict[float, dict[tuple, list[float]]], mixers: list[str], stems: list[str]) -> list[str]:
    """Whether the order of the mixers by mean final top-1 changes between the budgets: per stem, and over
    the stems."""
    def order(means: dict[str, float]) -> str:
        return " > ".join(sorted(means, key=lambda m: -means[m]))

    def means_at(cells, these):  # the mixers every budget has finished runs of
        return {m: sum(mean_std(cells[m, s])[0] for s in these) / len(these) for m in mixers
                if all(c[m, s] for c in cells_at.values() for s in these)}

    lines = [("Order of the mixers by mean final top-1 (an order of means: mixers closer than the intervals above "
             "are not told apart):"), ""]
    for what, these in [*((f"{s} stem", [s]) for s in stems), ("mean over the stems", stems)]:
        orders = {b: order(means_at(cells, these)) for b, cells in cells_at.items()}
        if len(set(orders.values())) == 1:
            lines.append(f"- {what}: {next(iter(orders.values()))} at every budget")
        else:
            lines.append(f"- {what}: changes, " + "; ".join(f"{macs_tag(b)}: {o}" for b, o in orders.items()))
    return lines


def budget_section(study: Study, groups: list[Group]) -> list[tuple[str, list[str]]]:
    """A study over compute budgets: the table at every budget (mean ± std, 95% interval, n), which family is
    best at each (Welch's t-tests against it, Holm-corrected), each family's compute to reach 75% and 80%
    (per seed, interpolated in log-compute, never extrapolated), and where the mean curves cross."""
    budgets = study.meta.get("budgets")
    if not budgets or study.meta.get("ablation"):  # an ablation reads its budgets cell by cell
        return []
    curves = budget_curves(groups)
    labels = study.meta.get("labels") or {}
    models = [m for m in study.meta.get("models", []) if m in curves] or list(curves)
    at = {(m, b): v for m, pts in curves.items() for b, v in pts}

    def cell(values):
        if not values:
            return "–"
        mean, std = mean_std(values)
        ci = t_interval(values)
        return f"{pct(mean)}{pm(std)}" + (f" ({pct(ci[0])}–{pct(ci[1])})" if ci else "") + f", n={len(values)}"

    lines = [("Final top-1 % on the evaluation split at each training-compute budget: mean ± std over seeds "
             "(95% confidence interval), n seeds."), "", *budget_table(at, models, budgets, labels, cell), ""]
    for b in budgets:
        scored = sorted(((mean_std(at[m, b])[0], m) for m in models if at.get((m, b))), reverse=True)
        if not scored:
            continue
        best = scored[0][1]
        tests = [(m, welch_t_test(at[best, b], at[m, b])) for _, m in scored[1:]]
        ps = holm([t[2] for _, t in tests if t is not None])
        parts, k = [], 0
        for m, t in tests:
            gap = 100 * (mean_std(at[best, b])[0] - mean_std(at[m, b])[0])
            if t is None:
                parts.append(f"{labels.get(m, m)} by {gap:.1f} points (no test: too few seeds)")
            else:
                verdict = "significant" if ps[k] < 0.05 else "not significant"
                parts.append(f"{labels.get(m, m)} by {gap:.1f} points (Holm p={ps[k]:.2g}, {verdict})")
                k += 1
        lines.append(f"- At {macs_tag(b)}: **{labels.get(best, best)}** is highest"
                     + (", above " + "; ".join(parts) if parts else "") + ".")
    lines += ["", ("Training compute to reach a final top-1 (per seed, interpolated linearly in log-compute between "
              "the budgets around the crossing; mean and 95% interval over seeds):"), ""]
    for threshold in (0.75, 0.80):
        for m in models:
            seeds: dict[int, list[tuple[float, float]]] = {}
            for g in groups:
                if g.model == m and g.budget is not None:
                    for r in g.done:
                        seeds.setdefault(r.seed, []).append((g.budget, r.summary["final_top1"]))
            found = [compute_to_reach([b for b, _ in pts], [a for _, a in pts], threshold)
                     for pts in seeds.values() if len(pts) == len(budgets)]
            if not found:
                continue
            kinds = {kind for kind, _ in found}
            name = f"{labels.get(m, m)}, {pct(threshold)}%"
            if kinds == {"at"}:
                values = [c for _, c in found]
                ci = t_interval(values)
                span = f" (95% CI {macs_tag(max(ci[0], 1))}–{macs_tag(ci[1])})" if ci else ""
                lines.append(f"- {name}: {macs_tag(sum(values) / len(values))}{span}, n={len(values)}")
            elif kinds == {"not reached"}:
                lines.append(f"- {name}: not reached in range (up to {macs_tag(max(budgets))})")
            elif kinds == {"below"}:
                lines.append(f"- {name}: reached at the smallest budget already ({macs_tag(min(budgets))})")
            else:
                reached = sum(kind != "not reached" for kind, _ in found)
                lines.append(f"- {name}: reached by {reached} of {len(found)} seeds in range")
    if lines[-1] == "":
        lines.append("- not yet: no seed has finished every budget")
    crossings = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            common = [x for x in budgets if at.get((a, x)) and at.get((b, x))]
            means_a = [mean_std(at[a, x])[0] for x in common]
            means_b = [mean_std(at[b, x])[0] for x in common]
            crossings += [f"{labels.get(a, a)} and {labels.get(b, b)} change order between {macs_tag(lo)} and "
                          f"{macs_tag(hi)}" for lo, hi in curve_crossings(common, means_a, means_b)]
    lines += ["", "Where the mean curves cross: " + ("; ".join(crossings) + "." if crossings
                                                      else "nowhere in this range.")]
    return [("Across compute budgets", lines + fit_lines(groups, models, budgets, labels))]


def fit_lines(groups: list[Group], models: list[str], budgets: list[float], labels: dict[str, str]) -> list[str]:
    """Under- or overfitting read like with like: at the last epoch, top-1 on a fixed subset of train scored
    as val is (eval mode, the evaluation crop, no augmentation or label smoothing: `fit_top1`) beside val
    top-1, mean over the seeds that recorded both; nothing when no run recorded a fit."""
    pairs: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for g in groups:
        for r in g.done:
            last = next((m for m in reversed(r.metrics) if m.get("val_top1") is not None), {})
            if last.get("fit_top1") is not None and g.budget is not None:
                pairs.setdefault((g.model, g.budget), []).append((last["fit_top1"], last["val_top1"]))
    if not pairs:
        return []

    def cell(values):
        if not values:
            return "–"
        fit, val = (sum(v[i] for v in values) / len(values) for i in (0, 1))
        return f"{pct(fit)} / {pct(val)} ({100 * (fit - val):+.1f})"

    return ["", ("Fit against generalisation at the last epoch: top-1 % on a fixed subset of train scored as val "
                 "is (eval mode, no augmentation, no label smoothing) / val top-1 % (the gap), mean over seeds:"), "",
            *budget_table(pairs, models, budgets, labels, cell)]


def budget_table(values: dict[tuple[str, float], list], models: list[str], budgets: list[float],
                 labels: dict[str, str], cell) -> list[str]:
    """A markdown table with a row per model and a column per budget: `cell` of the values at (model, budget)."""
    return ["| model | " + " | ".join(macs_tag(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets),
            *[f"| {labels.get(m, m)} | " + " | ".join(cell(values.get((m, b), [])) for b in budgets) + " |"
              for m in models]]


def tuning_section(study: Study) -> list[tuple[str, list[str]]]:
    """A tuning study (patchbench tune): each family's trials, best first, its ranges round by round, the
    re-runs with a second seed and the choice."""
    t = study.meta.get("tune")
    if not t:
        return []
    space = t["space"]
    scores = {r.name: r.summary.get("final_top1") for r in study.runs if r.finished}
    failed = {r.name for r in study.runs if r.status == "failed"}
    lines = [("One search for all the models together (a shared recipe, every trial ranked by its mean over them): "
              if space.get("shared") else "The same search for every family: ")
             + f"{space['trials']} trials over log-ranges of learning rate and "
             f"weight decay" + (f" and patch sizes {', '.join(map(str, space['patch_size']))} (models that take one)"
                                if space.get("patch_size") else "")
             + f", each trained for {space['compute_budget'] / 1e12:g}T MACs and scored by its final top-1 on a "
             f"{space['holdout']:.0%} class-stratified holdout of train (seed {space['holdout_seed']}); while a "
             "family's best value lay in the outer eighth of a range (at most twice), that range was widened by "
             f"half its width and every family ran {space['trials'] // 2} more trials; the best two re-ran with "
             "seed 1.", ""]
    for model in study.meta.get("models", []):
        mine = {name: e for name, e in t["trials"].items() if e["model"] == model}
        if not mine:
            continue
        rounds = t["ranges"].get(model, [])
        lines += [f"### {model}", "", "Ranges (lr; weight decay) by round: " + "; ".join(
            f"round {i + 1}: {r['lr'][0]:.3g}-{r['lr'][1]:.3g}; {r['weight_decay'][0]:.3g}-{r['weight_decay'][1]:.3g}"
            for i, r in enumerate(rounds)) + ".", "",
            "| run | round | seed | lr | weight decay | patch | holdout top-1 % |", "|---|---|---|---|---|---|---|"]
        def key(name):
            return -(scores.get(name) if scores.get(name) is not None else -1)
        for name in sorted(mine, key=key):
            e = mine[name]
            score = "diverged" if name in failed else pct(scores[name]) if name in scores else "not finished"
            lines.append(f"| {name} | {e['round']} | {e['seed']} | {e['lr']:.3g} | {e['weight_decay']:.3g} "
                         f"| {e.get('patch_size', '–')} | {score} |")
        c = (t.get("choice") or {}).get(model)
        over = "every model and seeds 0 and 1 (a shared recipe)" if space.get("shared") else "seeds 0 and 1"
        lines += ["", f"Choice: trial {c['trial']} (lr {c['lr']:.3g}, weight decay {c['weight_decay']:.3g}"
                  + (f", patch {c['patch_size']}" if "patch_size" in c else "")
                  + f"), mean holdout top-1 over {over} {pct(c['mean_holdout_top1'])}%." if c
                  else "Choice: not made yet (the search has not finished).", ""]
    return [("Tuning", lines)]


def factorial_analysis(cells: dict[tuple, list[float]], mixers: list[str], stems: list[str],
                       baseline_mixer: str = "attention", baseline_stem: str = "patch") -> list[str]:
    """The two-way ANOVA (mixer, stem, their interaction) and the effects it supports: per stem and per
    mixer when the interaction is significant, else averaged over the other factor; Holm-corrected."""
    anova = two_way_anova(cells, mixers, stems)
    if anova is None:  # unbalanced or one seed a cell: main effects alone
        out = [("No analysis of variance (it needs the same number of seeds, at least two, in every cell); "
               "main effects, averaged over the other factor:"), ""]
        effects = factor_effects(cells, mixers, stems, baseline_mixer, baseline_stem)
        return out + [f"- {effect_line(main_effect_what(e), e['effect'], *(interval(e) or (None, None)), e['p'])}"
                      for e in effects]
    pts = 1e4  # fractions^2 -> points^2
    out = ["| source | SS (points²) | df | F | p |", "|---|---|---|---|---|"]
    for key, name in (("rows", "mixer"), ("cols", "stem"), ("interaction", "mixer x stem")):
        a = anova[key]
        out.append(f"| {name} | {a['ss'] * pts:.1f} | {a['df']} | {a['f']:.2f} | {a['p']:.2g} |")
    out += [f"| within cells | {anova['error']['ss'] * pts:.1f} | {anova['error']['df']} | | |", ""]
    mse, df = anova["error"]["ms"], anova["error"]["df"]
    inter = anova["interaction"]
    if inter["p"] < 0.05:
        # a column per comparison: each mixer against the baseline mixer within a stem, each stem against
        # the baseline stem within a mixer
        columns = [(f"vs {baseline_mixer}, {s} stem", lambda m, s=s: ((m, s), (baseline_mixer, s)))
                   for s in stems if baseline_mixer in mixers]
        columns += [(f"{s} stem vs {baseline_stem} stem", lambda m, s=s: ((m, s), (m, baseline_stem)))
                    for s in stems if s != baseline_stem]
        pairs = [key(m) for _, key in columns for m in mixers if key(m)[0] != key(m)[1]]
        found = {(c["a"], c["b"]): c for c in cell_contrasts(cells, pairs, mse, df)}
        out += [(f"The mixer x stem interaction is significant (F={inter['f']:.2f}, p={inter['p']:.2g}), so the "
                 f"effects are per stem and per mixer: points [95% CI], Holm p over these {len(pairs)} comparisons."),
                "", "| mixer | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
        for m in mixers:
            row = [found.get(key(m)) for _, key in columns]
            out.append(f"| {m} | " + " | ".join("–" if c is None else f"{100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, "
                                                f"{100 * c['high']:+.1f}], p={c['p_holm']:.2g}" for c in row) + " |")
        return out
    out += [(f"The mixer x stem interaction is not significant (F={inter['f']:.2f}, p={inter['p']:.2g}): main effects, "
            "averaged over the other factor (p Holm-corrected over these comparisons):"), ""]
    effects = factor_effects(cells, mixers, stems, baseline_mixer, baseline_stem)
    for e, p_holm in zip(effects, holm([e["p"] for e in effects])):
        out.append(f"- {effect_line(main_effect_what(e), e['effect'], *interval(e), p_holm, 'Holm p')}")
    return out


def main_effect_what(e: dict) -> str:
    words = MIXER_WORDS if e["factor"] == "mixer" else STEM_WORDS
    return f"{words[e['level']]} vs {words[e['baseline']]}"


def notes_section(meta: dict) -> list[tuple[str, list[str]]]:
    """Notes written into study.json by hand or by a recipe (e.g. why a result differs from a reference)."""
    notes = meta.get("notes") or []
    return [("Notes", [f"- {n}" for n in notes])] if notes else []


def problem_lines(study: Study) -> list[str]:
    lines = list(study.problems)
    for run in study.runs:
        lines += [f"{run.name}: {p}" for p in run.problems]
    return lines


SPLITS = {"val": "the val split (held out from training and tuning)",
          "holdout": "a holdout carved out of train (--holdout; the val split was not used)"}


def setup_line(study: Study) -> str:
    """Data, recipe, the settings given on top of it, seeds, the split every number comes from, wall time."""
    meta = study.meta
    overrides = meta.get("overrides") or {}
    given = ", ".join(f"{k}={v}" for section in overrides.values() for k, v in section.items())
    splits = sorted({r.eval_split for r in study.runs if r.finished})
    wall = sum(r.summary.get("wall_time_s") or 0 for r in study.runs if r.finished)
    parts = [f"preset `{meta['preset']}`" if meta.get("preset") else None,
             f"config file `{meta['config_file']}`" if meta.get("config_file") else None,
             f"settings given for every run: {given}" if given else None,
             f"data `{meta['data']}`" if meta.get("data") else None,
             f"seeds {', '.join(map(str, meta['seeds']))}" if meta.get("seeds") else None,
             f"{len(study.runs)} run directories",
             "every accuracy is measured on " + " and ".join(SPLITS.get(s, s) for s in splits) if splits else None,
             f"{wall / 3600:.1f} h of training in all (the sum of the finished runs' wall times)" if wall else None]
    return "Study: " + "; ".join(p for p in parts if p) + "."


@dataclass
class Report:
    title: str
    setup: str
    table: list[list[str]]
    conclusion: list[str]
    models: list[str]  # each model's configuration (and its matched budget)
    problems: list[str]
    figures: list[tuple[str, str, bytes]]  # (file stem, caption, PNG bytes)
    configs: list[tuple[str, str]]  # (run name, config.json text)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # (title, markdown lines)


def build_report(study: Study) -> Report:
    groups = group_runs(study.runs)
    rows = results_rows(groups)
    figures = []
    for stem, caption, fig in make_figures(study, groups, rows):
        figures.append((stem, caption, figure_png(fig)))
    configs = [(r.name, json.dumps(r.config, indent=2, sort_keys=True) if r.config else "(no config.json)")
               for r in study.runs]
    where = "'Token mixer x stem'" if study.meta.get("ablation") else "'Across compute budgets'"
    across = [(f"Models are compared at equal training compute in {where} below; the table above has a row per "
               "model and budget.")] if study.meta.get("budgets") else None
    return Report(title=f"patchbench report: {study.path.name}", setup=setup_line(study),
                  table=[table_cells(r) for r in rows], conclusion=across or conclusion(groups),
                  models=model_lines(study.meta, groups) if not study.meta.get("grid") else [],
                  problems=problem_lines(study), figures=figures, configs=configs,
                  sections=budget_section(study, groups) + ablation_section(study, groups) + tuning_section(study)
                  + reference_section(study.meta, groups) + notes_section(study.meta))


def markdown_table(table: list[list[str]]) -> list[str]:
    """The results table as markdown lines (what report.md shows, and the README copies)."""
    def md_row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [md_row(TABLE_HEADER), md_row(["---"] * len(TABLE_HEADER)), *map(md_row, table)]


# A study's summary in the README: `<!-- table: results/NAME -->`, the lines (none yet: an empty block), then
# `<!-- end table -->`. Groups: the study's path, the lines. scripts/readme_tables.py rewrites the blocks
# and tests/test_readme.py checks them, both with this pattern.
README_BLOCK = re.compile(r"<!-- table: (results/[\w.-]+) -->\n(.*?)\n?<!-- end table -->", re.DOTALL)


def study_summary(path: str | os.PathLike) -> list[str]:
    """The markdown results table of the study at `path` and its conclusion (for an ablation: the mixer x stem
    table and each factor's effect; with a reference: the table against it too), without drawing any figure."""
    study = load_study(path)
    groups = group_runs(study.runs)
    table = markdown_table([table_cells(r) for r in results_rows(groups)])
    ablation = ablation_section(study, groups)
    if ablation:  # at several budgets (groups carry one then), the cell tables alone: report.md has the rows
        return ablation[0][1] if any(g.budget is not None for g in groups) else [*table, "", *ablation[0][1]]
    budgets = budget_section(study, groups)
    if budgets:  # a row per model and budget is report.md's; a page shows the table across budgets
        return budgets[0][1]
    reference = [line for _, lines in reference_section(study.meta, groups) for line in ["", *lines]]
    return [*table, "", *[f"- {line}" for line in conclusion(groups)], *reference]


def to_markdown(report: Report) -> str:
    """Markdown that shows the PNGs written beside it in figures/."""
    out = [f"# {report.title}", "", report.setup, "", "## Results", "", *markdown_table(report.table), "",
           TABLE_NOTE, "", "## Conclusion", "", *[f"- {line}" for line in report.conclusion], ""]
    for title, lines in report.sections:
        out += [f"## {title}", "", *lines, ""]
    if report.models:
        out += ["## Models", "", *[f"- {line}" for line in report.models], ""]
    if report.problems:
        out += ["## Missing or partial runs", "", *[f"- {line}" for line in report.problems], ""]
    out += ["## Figures", ""]
    for stem, caption, _ in report.figures:
        out += [f"### {caption}", "", f"![{caption}](figures/{stem}.png)", ""]
    out += ["## Run configurations", ""]
    for name, text in report.configs:
        out += [f"<details><summary>{name}</summary>", "", "```json", text, "```", "", "</details>", ""]
    return "\n".join(out)


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}li{margin:0.3em 0}"""


def _inline(text: str) -> str:
    """The few markdown marks the text uses, as HTML: **bold** and `code`."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_block(lines: list[str]) -> str:
    """HTML for a section's markdown lines: paragraphs, "- " lists and "|" tables."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            head, *body = rows
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def to_html(report: Report) -> str:
    """One self-contained page: figures are embedded as base64 PNGs."""
    e, inline = html.escape, _inline

    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in report.table)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{e(report.title)}</h1>", f"<p>{inline(report.setup)}</p>",
           "<h2>Results</h2>", f"<table id='results'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
           f"<p>{e(TABLE_NOTE)}</p>",
           "<h2>Conclusion</h2><ul>", *[f"<li>{inline(line)}</li>" for line in report.conclusion], "</ul>"]
    for title, lines in report.sections:
        out += [f"<h2>{e(title)}</h2>", markdown_block(lines)]
    if report.models:
        out += ["<h2>Models</h2><ul>", *[f"<li>{e(line)}</li>" for line in report.models], "</ul>"]
    if report.problems:
        out += ["<h2>Missing or partial runs</h2><ul id='problems'>",
                *[f"<li>{e(line)}</li>" for line in report.problems], "</ul>"]
    out.append("<h2>Figures</h2>")
    for stem, caption, png in report.figures:
        data = base64.b64encode(png).decode("ascii")
        out.append(f"<h3>{e(caption)}</h3><img id='fig-{e(stem)}' alt='{e(caption)}' "
                   f"src='data:image/png;base64,{data}'>")
    out.append("<h2>Run configurations</h2>")
    for name, text in report.configs:
        out.append(f"<details><summary>{e(name)}</summary><pre>{e(text)}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


def save_report(report: Report, folder: Path, formats=FORMATS) -> list[Path]:
    """Write report.md (+ figures/*.png) and/or report.html into `folder`; returns the paths."""
    written = []
    if "md" in formats:
        fig_dir = rundir.make_dir(folder / rundir.FIGURES)
        for stem, _, png in report.figures:
            rundir.atomic_write_bytes(fig_dir / f"{stem}.png", png)
        written.append(rundir.atomic_write_text(folder / rundir.REPORT_MD, to_markdown(report)))
    if "html" in formats:
        written.append(rundir.atomic_write_text(folder / rundir.REPORT_HTML, to_html(report)))
    return written


def write_report(study_dir: str | os.PathLike, formats=FORMATS) -> list[Path]:
    """Read the study folder and write its report into it; returns the paths written."""
    study = load_study(study_dir)
    return save_report(build_report(study), study.path, formats)


def to_text(report: Report) -> str:
    """The table and the conclusion for a terminal."""
    cells = [TABLE_HEADER, *report.table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", *[re.sub(r"\*\*", "", line) for line in report.conclusion]]
    if report.problems:
        lines += ["", f"{len(report.problems)} problem(s) with runs; see the report's 'Missing or partial runs'"]
    return "\n".join(lines)
