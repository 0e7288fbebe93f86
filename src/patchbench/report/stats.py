"""The report's numbers: means and spreads over seeds, Welch's t-test, the table rows, the conclusion.

Statistics come from scipy (`scipy.stats.ttest_ind` with `equal_var=False`, Welch's test); the
sample standard deviation uses ddof=1. Accuracies are fractions here, percent only when shown.
"""

from __future__ import annotations

import math
import warnings

from scipy import stats as _scipy

from patchbench.report.load import Group


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def welch_t_test(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Welch's unequal-variance t-test: (t, degrees of freedom, two-sided p).

    None when a test is impossible: fewer than two values on a side, or no spread on either side.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    if mean_std(a)[1] == 0 and mean_std(b)[1] == 0:
        return None
    with warnings.catch_warnings():  # scipy warns of precision loss when one side's seeds are all equal
        warnings.simplefilter("ignore", RuntimeWarning)
        result = _scipy.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.df), float(result.pvalue)


def best_top1(run) -> float | None:
    """Top-1 of the run's epoch with the lowest validation loss (the rule that picks checkpoint/best),
    read from metrics.jsonl, so runs written by any version agree; summary.json's when there are no metrics."""
    rows = [r for r in run.metrics if r.get("val_loss") is not None and r.get("val_top1") is not None]
    if rows:
        return min(rows, key=lambda r: r["val_loss"])["val_top1"]
    return (run.summary or {}).get("best_top1")


def highest_top1(run) -> float | None:
    """The highest per-epoch validation top-1 in the run's metrics.jsonl (summary.json's best_top1 without)."""
    accs = [r["val_top1"] for r in run.metrics if r.get("val_top1") is not None]
    return max(accs) if accs else (run.summary or {}).get("best_top1")


def results_rows(groups: list[Group]) -> list[dict]:
    """One row per configuration: numbers as in the files (means over finished seeds), None when unknown."""
    rows = []
    for g in groups:
        done = g.done
        first = done[0].summary if done else {}
        final_mean, final_std = mean_std(g.finals())
        best_mean, _ = mean_std([b for b in map(best_top1, done) if b is not None])
        wall, _ = mean_std([r.summary["wall_time_s"] for r in done if r.summary.get("wall_time_s") is not None])
        rows.append({
            "label": g.label, "params": first.get("params"), "macs": first.get("macs"),
            "train_images_per_s": mean_std([r.summary["train_images_per_s"] for r in done
                                            if r.summary.get("train_images_per_s")])[0],
            "infer_images_per_s": mean_std([r.summary["infer_images_per_s"] for r in done
                                            if r.summary.get("infer_images_per_s")])[0],
            "final_mean": final_mean, "final_std": final_std, "n": len(done), "runs": len(g.runs),
            "best_mean": best_mean, "epochs": first.get("epochs"), "img_size": first.get("img_size"),
            "wall_time_s": wall, "split": ",".join(sorted({r.eval_split for r in done})) or None,
        })
    return rows


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def pm(std: float | None) -> str:
    return "" if std is None else f" ± {100 * std:.1f}"


def conclusion(groups: list[Group]) -> list[str]:
    """A few sentences: who wins, by how much, and whether the gap is larger than seed-to-seed noise."""
    scored = [(mean_std(g.finals()), g) for g in groups if g.done]
    scored.sort(key=lambda s: -s[0][0])
    if not scored:
        return ["No run has finished yet, so there is nothing to compare."]
    (best_mean, best_std), best = scored[0]
    lines = [f"**{best.label}** has the highest final-epoch top-1: {pct(best_mean)}%"
             f"{pm(best_std)} over n={len(best.done)} seed(s)."]
    if len(scored) == 1:
        return lines
    best_vals = best.finals()
    for (mean, std), g in scored[1:]:
        vals = g.finals()
        gap = 100 * (best_mean - mean)
        spread = max([s for s in (best_std, std) if s is not None], default=None)
        text = f"It beats {g.label} ({pct(mean)}%{pm(std)}, n={len(vals)}) by {gap:.1f} points"
        if spread is None:
            text += "; with one seed on a side there is no seed-to-seed spread to compare with and no test is possible."
        else:
            ratio = gap / (100 * spread) if spread > 0 else math.inf
            relation = "more than" if ratio > 1.25 else "less than" if ratio < 0.8 else "about the same as"
            text += f", {relation} the larger seed-to-seed standard deviation ({100 * spread:.1f} points)"
            test = welch_t_test(best_vals, vals)
            if test is None:
                text += "; Welch's t-test needs at least two seeds on each side, with some spread."
            else:
                t, df, p = test
                verdict = "significant" if p < 0.05 else "not significant"
                text += f"; Welch's t-test: t={t:.2f}, df={df:.1f}, p={p:.3g} ({verdict} at the 5% level)."
        lines.append(text)
    return lines


def reference_rows(reference: dict | None, groups: list[Group]) -> list[dict]:
    """Each referenced model's published final (and best-epoch) top-1 against ours (the mean over seeds of
    the final and of the highest epoch): the difference of the finals, and
    whether the published number lies inside the range of our seeds and within 2 points of our mean."""
    rows = []
    for model, ref in (reference or {}).items():
        if model == "source" or not isinstance(ref, dict):
            continue
        done = [r for g in groups if g.model == model for r in g.done]
        finals = [r.summary["final_top1"] for r in done]
        mean, std = mean_std(finals)
        # the notebook's "best epoch" is its highest val accuracy, so ours is too (not best_top1's lowest loss)
        best, _ = mean_std([b for b in map(highest_top1, done) if b is not None])
        row = {"model": model, "ref_final": ref.get("final"), "ref_best": ref.get("best"), "mean": mean, "std": std,
               "n": len(finals), "min": min(finals, default=None), "max": max(finals, default=None), "best": best}
        if mean is not None and ref.get("final") is not None:
            row["gap"] = mean - ref["final"]
            row["inside"] = row["min"] <= ref["final"] <= row["max"]
            row["within_2"] = abs(row["gap"]) <= 0.02
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# The factorial ablation: mixer x stem


MIXER_WORDS = {"conv": "depthwise convolution", "attention": "attention", "mlp": "a token-mixing MLP",
               "pool": "average pooling", "identity": "no token mixing"}
STEM_WORDS = {"patch": "the patch stem (a strided conv)", "conv": "the convolutional stem"}


def factorial_cells(groups: list[Group], rows_: list[str], cols: list[str],
                    name=lambda r, c: f"iso_{r}_{c}") -> dict[tuple[str, str], list[float]]:
    """Final top-1 of every seed of each (row level, column level) cell, found by model name."""
    by_model = {g.model: g.finals() for g in groups}
    return {(r, c): by_model.get(name(r, c), []) for r in rows_ for c in cols}


def pooled_variance(cells: dict[tuple, list[float]]) -> tuple[float | None, int]:
    """The within-cell (seed-to-seed) variance pooled over the cells, and its degrees of freedom."""
    ss = sum(sum((v - sum(vals) / len(vals)) ** 2 for v in vals) for vals in cells.values() if vals)
    df = sum(len(vals) - 1 for vals in cells.values() if vals)
    return (ss / df if df > 0 else None), df


def contrast(cells: dict[tuple, list[float]], a: list[tuple], b: list[tuple]) -> dict | None:
    """The mean over k of (cell a[k] - cell b[k]) with its standard error from the pooled seed variance,
    a t-test against 0 (df: the pooled variance's) and its two-sided p; None when a cell is empty."""
    if any(not cells[c] for c in (*a, *b)):
        return None
    k = len(a)
    means = {c: sum(cells[c]) / len(cells[c]) for c in (*a, *b)}
    effect = sum(means[x] - means[y] for x, y in zip(a, b)) / k
    var, df = pooled_variance(cells)
    if var is None:
        return {"effect": effect, "se": None, "df": 0, "t": None, "p": None}
    se = math.sqrt(var * sum(1 / len(cells[x]) + 1 / len(cells[y]) for x, y in zip(a, b)) / k ** 2)
    t = effect / se if se > 0 else math.inf
    p = float(2 * _scipy.t.sf(abs(t), df)) if se > 0 else 0.0
    return {"effect": effect, "se": se, "df": df, "t": t, "p": p}


def factor_effects(cells: dict[tuple, list[float]], mixers: list[str], stems: list[str],
                   baseline_mixer: str = "attention", baseline_stem: str = "patch") -> list[dict]:
    """Each mixer against `baseline_mixer` averaged over the stems, and each stem against `baseline_stem`
    averaged over the mixers (main effects of the two-factor design)."""
    out = []
    for m in mixers:
        if m != baseline_mixer and baseline_mixer in mixers:
            c = contrast(cells, [(m, s) for s in stems], [(baseline_mixer, s) for s in stems])
            if c:
                out.append({"factor": "mixer", "level": m, "baseline": baseline_mixer, **c})
    for s in stems:
        if s != baseline_stem and baseline_stem in stems:
            c = contrast(cells, [(m, s) for m in mixers], [(m, baseline_stem) for m in mixers])
            if c:
                out.append({"factor": "stem", "level": s, "baseline": baseline_stem, **c})
    return out


def effect_sentence(e: dict, setting: str) -> str:
    """One effect in plain words, e.g. "replacing attention with depthwise convolution changes top-1 by ..."."""
    words = MIXER_WORDS if e["factor"] == "mixer" else STEM_WORDS
    over = "averaged over the stems" if e["factor"] == "mixer" else "averaged over the mixers"
    size = f"{100 * e['effect']:+.1f}"
    if e["se"] is None:
        stat = f"{size} points ({over}; one seed per cell, so no test)"
    else:
        verdict = "significant" if e["p"] < 0.05 else "not significant"
        stat = (f"{size} ± {100 * e['se']:.1f} points (± standard error, {over}; t-test on the pooled seed "
                f"variance: t={e['t']:.2f}, df={e['df']}, p={e['p']:.2g}, {verdict} at the 5% level)")
    return f"{setting}, replacing {words[e['baseline']]} with {words[e['level']]} changes top-1 by {stat}."
