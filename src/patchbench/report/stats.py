"""The report's numbers: means and spreads over seeds, Welch's t-test, the table rows, the conclusion.

Statistics come from scipy (`scipy.stats.ttest_ind` with `equal_var=False`, Welch's test); the
sample standard deviation uses ddof=1. Accuracies are fractions here, percent only when shown.
"""

from __future__ import annotations

import itertools
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


def lowest_loss_top1(run) -> float | None:
    """Top-1 of the run's epoch with the lowest validation loss (the rule that picks checkpoint/best),
    read from metrics.jsonl, so runs written by any version agree; summary.json's when there are no metrics."""
    rows = [r for r in run.metrics if r.get("val_loss") is not None and r.get("val_top1") is not None]
    if rows:
        return min(rows, key=lambda r: r["val_loss"])["val_top1"]
    return (run.summary or {}).get("lowest_loss_top1")


def highest_top1(run) -> float | None:
    """The highest per-epoch validation top-1 in the run's metrics.jsonl (summary.json's lowest-loss top-1 without)."""
    accs = [r["val_top1"] for r in run.metrics if r.get("val_top1") is not None]
    return max(accs) if accs else (run.summary or {}).get("lowest_loss_top1")


def results_rows(groups: list[Group]) -> list[dict]:
    """One row per configuration: numbers as in the files (means over finished seeds), None when unknown."""
    rows = []
    for g in groups:
        done = g.done
        first = done[0].summary if done else {}
        final_mean, final_std = mean_std(g.finals())
        best_mean, _ = mean_std([b for b in map(lowest_loss_top1, done) if b is not None])
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
    lines = [(f"**{best.label}** has the highest final-epoch top-1: {pct(best_mean)}%"
             f"{pm(best_std)} over n={len(best.done)} seed(s).")]
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
        # the notebook's "best epoch" is its highest val accuracy, so ours is too (not the lowest-loss epoch's)
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


def cell_model(mixer: str, stem: str) -> str:
    """The registered name of the isotropic backbone's (mixer, stem) cell."""
    return f"iso_{mixer}_{stem}"


def factorial_cells(groups: list[Group], rows_: list[str], cols: list[str],
                    name=cell_model) -> dict[tuple[str, str], list[float]]:
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


def interval(e: dict, level: float = 0.95) -> tuple[float, float] | None:
    """The `level` confidence interval of a contrast (t with its df), or None without a standard error."""
    if e.get("se") is None or not e.get("df"):
        return None
    half = float(_scipy.t.ppf(0.5 + level / 2, e["df"])) * e["se"]
    return e["effect"] - half, e["effect"] + half


def effect_line(what: str, diff: float, low: float | None, high: float | None, p: float | None,
                p_name: str = "p") -> str:
    """One effect, short: "what: +5.7 points (95% CI +4.4 to +7.0), Holm p=0.0002"."""
    ci = f" (95% CI {100 * low:+.1f} to {100 * high:+.1f})" if low is not None else " (one seed a cell: no interval)"
    test = f", {p_name}={p:.2g}" if p is not None else ""
    return f"{what}: {100 * diff:+.1f} points{ci}{test}"


# ----------------------------------------------------------------------------- two-way analysis of variance


def two_way_anova(cells: dict[tuple, list[float]], rows_: list[str], cols: list[str]) -> dict | None:
    """The two-way ANOVA with interaction of a balanced design (every cell the same n >= 2): for the row
    factor, the column factor and their interaction, the sum of squares, df, mean square, F and p, and the
    error (within-cell) line. None when the design is not balanced, has one value a cell (no error term) or
    one level of a factor."""
    ns = {len(cells[r, c]) for r in rows_ for c in cols}
    if len(rows_) < 2 or len(cols) < 2 or len(ns) != 1 or ns.pop() < 2:
        return None  # one level of a factor, or no error term: nothing to test
    n, a, b = len(cells[rows_[0], cols[0]]), len(rows_), len(cols)
    cell = {(r, c): sum(cells[r, c]) / n for r in rows_ for c in cols}
    row = {r: sum(cell[r, c] for c in cols) / b for r in rows_}
    col = {c: sum(cell[r, c] for r in rows_) / a for c in cols}
    grand = sum(row.values()) / a
    ss = {"rows": b * n * sum((row[r] - grand) ** 2 for r in rows_),
          "cols": a * n * sum((col[c] - grand) ** 2 for c in cols),
          "interaction": n * sum((cell[r, c] - row[r] - col[c] + grand) ** 2 for r in rows_ for c in cols),
          "error": sum((v - cell[r, c]) ** 2 for r in rows_ for c in cols for v in cells[r, c])}
    df = {"rows": a - 1, "cols": b - 1, "interaction": (a - 1) * (b - 1), "error": a * b * (n - 1)}
    mse = ss["error"] / df["error"]
    out = {"n": n, "error": {"ss": ss["error"], "df": df["error"], "ms": mse}}
    for key in ("rows", "cols", "interaction"):
        ms = ss[key] / df[key]
        f = ms / mse if mse > 0 else math.inf
        out[key] = {"ss": ss[key], "df": df[key], "ms": ms, "f": f,
                    "p": float(_scipy.f.sf(f, df[key], df["error"])) if mse > 0 else 0.0}
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times (m - i), made
    non-decreasing, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def cell_contrasts(cells: dict[tuple, list[float]], pairs: list[tuple[tuple, tuple]], mse: float, df: int,
                   level: float = 0.95) -> list[dict]:
    """Cell a minus cell b for each pair, with the ANOVA's error mean square as the variance: the difference,
    its standard error, a `level` confidence interval (t with the error df), the two-sided p and Holm's
    adjusted p over the pairs."""
    out = []
    t_crit = float(_scipy.t.ppf(0.5 + level / 2, df))
    for a, b in pairs:
        diff = sum(cells[a]) / len(cells[a]) - sum(cells[b]) / len(cells[b])
        se = math.sqrt(mse * (1 / len(cells[a]) + 1 / len(cells[b])))
        t = diff / se if se > 0 else math.inf
        out.append({"a": a, "b": b, "diff": diff, "se": se, "low": diff - t_crit * se, "high": diff + t_crit * se,
                    "t": t, "df": df, "p": float(2 * _scipy.t.sf(abs(t), df)) if se > 0 else 0.0})
    for c, adj in zip(out, holm([c["p"] for c in out])):
        c["p_holm"] = adj
    return out


# ----------------------------------------------------------------------------- curves over compute budgets


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The `level` confidence interval of the mean of `values` (Student's t, n - 1 df); None below n = 2."""
    if len(values) < 2:
        return None
    mean, std = mean_std(values)
    half = float(_scipy.t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def compute_to_reach(budgets: list[float], accs: list[float], threshold: float) -> tuple[str, float | None]:
    """Where one seed's accuracy over increasing `budgets` first reaches `threshold`, interpolated linearly in
    log-compute between the two budgets around the crossing. ("at", compute), ("below", budgets[0]) when the
    smallest budget already reaches it (the crossing lies below the range: not extrapolated), or
    ("not reached", None)."""
    pairs = sorted(zip(budgets, accs))
    if pairs[0][1] >= threshold:
        return "below", pairs[0][0]
    for (b0, a0), (b1, a1) in itertools.pairwise(pairs):
        if a0 < threshold <= a1:
            f = (threshold - a0) / (a1 - a0)
            return "at", math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))
    return "not reached", None


def curve_crossings(budgets: list[float], a: list[float], b: list[float]) -> list[tuple[float, float]]:
    """The budget intervals (lo, hi) between which the mean curves `a` and `b` change order."""
    diffs = [x - y for x, y in zip(a, b)]
    return [(budgets[i], budgets[i + 1]) for i in range(len(diffs) - 1) if diffs[i] * diffs[i + 1] < 0]
