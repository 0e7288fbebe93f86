"""The report's figures: one pure function each, run groups in, a matplotlib Figure out.

No pyplot and no global state: each function builds its own `Figure` (rendered by the Agg canvas
when saved), so figures can be made in threads, tests can inspect them, and nothing leaks between
reports. Accuracies come in as fractions and are drawn in percent.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from patchbench.compute import macs_tag
from patchbench.report.load import Group, Run


def _curves(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, values (n_runs, n_epochs)) over the epochs every run has."""
    series = [[m[key] for m in r.metrics if m.get(key) is not None] for r in runs]
    n = min((len(s) for s in series), default=0)
    if n == 0:
        return None
    return np.arange(1, n + 1), np.array([s[:n] for s in series], dtype=float)


def _band(ax, epochs, values, label, color, scale=1.0):
    mean = values.mean(0) * scale
    ax.plot(epochs, mean, color=color, label=f"{label} (n={len(values)})", marker="o", markersize=3)
    if len(values) > 1:
        ax.fill_between(epochs, values.min(0) * scale, values.max(0) * scale, color=color, alpha=0.2)


def _label_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _colors(n: int) -> list:
    return [f"C{i % 10}" for i in range(n)]


def figure_accuracy_curves(groups: list[Group]) -> Figure:
    """Val top-1 per epoch: the mean over seeds, with a band from the lowest to the highest seed."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for g, color in zip(groups, _colors(len(groups))):
        c = _curves(g.done, "val_top1")
        if c:
            _band(ax, *c, g.label, color, scale=100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label_axes(ax, "epoch", "val top-1 (%)", "Validation accuracy (line: mean over seeds; band: min to max)")
    fig.tight_layout()
    return fig


def budget_curves(groups: list[Group]) -> dict[str, list[tuple[float, list[float]]]]:
    """{model: [(budget, final top-1 of each finished seed), ...] in increasing budget} of a budget study."""
    out: dict[str, list[tuple[float, list[float]]]] = {}
    for g in sorted((g for g in groups if g.budget is not None and g.done), key=lambda g: g.budget):
        out.setdefault(g.model, []).append((g.budget, g.finals()))
    return out


def figure_budget_curves(groups: list[Group], labels: dict[str, str] | None = None) -> Figure | None:
    """Final top-1 against training compute (log scale) per model: the mean over seeds, a band from the lowest
    to the highest seed; None unless some model has finished runs at two budgets or more."""
    curves = {m: c for m, c in budget_curves(groups).items() if len(c) >= 2}
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for (model, points), color in zip(curves.items(), _colors(len(curves))):
        x = np.array([b for b, _ in points])
        mean = np.array([np.mean(v) for _, v in points]) * 100
        n = min(len(v) for _, v in points)
        ax.plot(x, mean, color=color, marker="o", markersize=4, label=f"{(labels or {}).get(model, model)} (n={n})")
        ax.fill_between(x, [min(v) * 100 for _, v in points], [max(v) * 100 for _, v in points], color=color,
                        alpha=0.2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos=None: macs_tag(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({b for c in curves.values() for b, _ in c}))
    _label_axes(ax, "training compute (MACs: 3 x forward x images)", "final val top-1 (%)",
                "Accuracy against training compute (line: mean over seeds; band: min to max)")
    fig.tight_layout()
    return fig


def figure_accuracy_vs_time(groups: list[Group]) -> Figure | None:
    """Val top-1 against training time (the epochs' summed wall time, minutes), one line per seed: what
    each recipe reaches for the time it took, when recipes run different numbers of epochs."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    drawn = False
    for g, color in zip(groups, _colors(len(groups))):
        for i, run in enumerate(g.done):
            rows = [m for m in run.metrics if m.get("val_top1") is not None and m.get("epoch_time_s") is not None]
            if rows:
                minutes = np.cumsum([m["epoch_time_s"] for m in rows]) / 60
                ax.plot(minutes, [100 * m["val_top1"] for m in rows], color=color, alpha=0.8, marker="o",
                        markersize=2, label=g.label if i == 0 else None)
                drawn = True
    if not drawn:
        return None
    _label_axes(ax, "training time (min, epochs incl. evaluation)", "val top-1 (%)",
                "Validation accuracy against training time (one line per seed)")
    fig.tight_layout()
    return fig


def figure_loss_curves(groups: list[Group]) -> Figure:
    """Train and val loss per epoch, side by side, mean over seeds with a min-max band."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("train_loss", "val_loss"), ("train loss", "val loss")):
        for g, color in zip(groups, _colors(len(groups))):
            c = _curves(g.done, key)
            if c:
                _band(ax, *c, g.label, color)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")  # one diverging epoch must not flatten every other curve
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        _label_axes(ax, "epoch", title, title.capitalize())
    fig.tight_layout()
    return fig


TRADEOFF_AXES = [("params", "parameters"), ("macs", "MACs per image"),
                 ("infer_images_per_s", "inference images/s")]


def _human_tick(value: float, _pos=None) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def figure_tradeoffs(rows: list[dict]) -> Figure:
    """Final top-1 (mean, error bar = std over seeds) against params, MACs and inference throughput.

    An x axis spanning more than 10x is logarithmic (and says so), a narrower one linear."""
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, xlabel) in zip(axes, TRADEOFF_AXES):
        xs = []
        for row, color in zip(rows, _colors(len(rows))):
            if row["final_mean"] is None or not row.get(key):
                continue
            xs.append(row[key])
            ax.errorbar(row[key], 100 * row["final_mean"], yerr=100 * (row["final_std"] or 0), fmt="o",
                        color=color, capsize=3, label=row["label"])
        log = bool(xs) and max(xs) > 10 * min(xs)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
        ax.xaxis.set_major_formatter(FuncFormatter(_human_tick))
        ax.margins(x=0.15)
        ax.set_xlabel(xlabel + (" (log)" if log else ""))
        ax.set_title(f"accuracy vs {xlabel}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("final val top-1 (%)")
    fig.tight_layout()
    return fig


def figure_confusion(group: Group) -> Figure | None:
    """Confusion matrix summed over the group's seeds, each row as % of that true class."""
    evals = [r.eval for r in group.done if r.eval and r.eval.get("confusion")]
    if not evals:
        return None
    conf = np.sum([np.array(e["confusion"], dtype=float) for e in evals], axis=0)
    rows = 100 * conf / np.maximum(conf.sum(1, keepdims=True), 1)
    classes = evals[0].get("classes") or [str(i) for i in range(len(conf))]
    fig = Figure(figsize=(1.0 + 0.55 * len(classes), 0.8 + 0.5 * len(classes)))
    ax = fig.add_subplot()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 50 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{group.label}: confusion (% of row, n={len(evals)})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def patch_views(groups: list[Group], known: dict[str, int | None] | None = None) -> dict[tuple[int, int], list[str]]:
    """(patch_size, img_size) -> labels of the configurations that cut images that way.

    A run's patch size is its model override, else summary.json's, else `known[model]` (study.json's
    "patch_sizes", recorded by compare)."""
    views: dict[tuple[int, int], list[str]] = {}
    for g in groups:
        run = (g.done or g.runs)[0]
        patch = run.patch_size or (known or {}).get(g.model)
        if patch and run.img_size:
            views.setdefault((int(patch), int(run.img_size)), []).append(g.label)
    return dict(sorted(views.items()))


def figure_patch_grid(samples: dict, views: dict[tuple[int, int], list[str]], max_images: int = 4) -> Figure | None:
    """A few val images (rows) as each model sees them, cut into its patches (columns: patch sizes)."""
    if samples is None or not views:
        return None
    images, labels, classes = samples["images"][:max_images], samples["labels"], samples["classes"]
    fig = Figure(figsize=(2.2 * len(views) + 0.6, 2.2 * len(images) + 0.4))
    axes = np.array(fig.subplots(len(images), len(views), squeeze=False))
    for col, ((patch, size), users) in enumerate(views.items()):
        for row, img in enumerate(images):
            ax = axes[row, col]
            ax.imshow(img, extent=(0, size, size, 0), interpolation="nearest")  # image drawn at the model's size
            ticks = np.arange(0, size + 1, patch)
            ax.vlines(ticks, 0, size, colors="white", linewidth=0.6, alpha=0.8)
            ax.hlines(ticks, 0, size, colors="white", linewidth=0.6, alpha=0.8)
            ax.set_xlim(0, size)
            ax.set_ylim(size, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"patch {patch} at {size}px\n({(size // patch) ** 2} patches)\n" + ", ".join(users),
                             fontsize=7)
            if col == 0:
                ax.set_ylabel(str(classes[labels[row]]), fontsize=8)
    fig.tight_layout()
    return fig


def figure_sweep_heatmap(groups: list[Group], grid: dict[str, list]) -> Figure | None:
    """Mean final top-1 over a 1- or 2-key grid (rows: first key, columns: second key)."""
    keys = list(grid)
    if not 1 <= len(keys) <= 2:
        return None
    rows_k, cols_k = keys[0], keys[1] if len(keys) == 2 else None
    row_vals, col_vals = grid[rows_k], grid[cols_k] if cols_k else [None]
    cells = {(r, c): [] for r in row_vals for c in col_vals}
    for g in groups:
        rv, cv = g.overrides.get(rows_k), g.overrides.get(cols_k) if cols_k else None
        if (rv, cv) in cells:
            cells[rv, cv] += g.finals()
    return figure_heatmap(cells, row_vals, col_vals, rows_k, cols_k or "")


def figure_heatmap(cells: dict[tuple, list[float]], row_vals: list, col_vals: list, row_name: str,
                   col_name: str, title: str = "final val top-1 (%), mean over seeds") -> Figure:
    """Mean of each (row, column) cell's values in percent, with n; empty cells say "missing"."""
    acc = np.full((len(row_vals), len(col_vals)), np.nan)
    counts = np.zeros_like(acc, dtype=int)
    for i, r in enumerate(row_vals):
        for j, c in enumerate(col_vals):
            vals = cells.get((r, c), [])
            if vals:
                acc[i, j], counts[i, j] = 100 * sum(vals) / len(vals), len(vals)
    fig = Figure(figsize=(1.6 + 1.1 * len(col_vals), 1.2 + 0.8 * len(row_vals)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto")
    for i in range(len(row_vals)):
        for j in range(len(col_vals)):
            text = "missing" if np.isnan(acc[i, j]) else f"{acc[i, j]:.1f}\nn={counts[i, j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if np.isnan(acc[i, j]) or acc[i, j] > np.nanmean(acc) else "white")
    ax.set_yticks(range(len(row_vals)), [str(v) for v in row_vals])
    ax.set_ylabel(row_name)
    ax.set_xticks(range(len(col_vals)), [str(v) if v is not None else "" for v in col_vals])
    ax.set_xlabel(col_name)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
