"""A study's report: a pure function of its run directories (markdown + self-contained HTML + PNGs).

    write_report("runs/quick")            # -> report.md, report.html, figures/*.png in that folder

Everything here is read from the files a run directory holds (config.json, metrics.jsonl,
summary.json, eval.json; see docs/ARCHITECTURE.md) plus the study's study.json and samples.npz.
Nothing imports the training code, so a report can be made anywhere the files are, and it says the
same thing every time it is made. Runs that are missing, still running, failed or half-written are
listed in the report and left out of the statistics; they never crash it.

Runs are grouped into *configurations* (model name + model overrides); the seeds of a configuration
give the mean, the sample standard deviation and n. Accuracies are fractions in the files and
percent here. The figures are drawn in patchbench.report_figures, one function each.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from patchbench.errors import UserError
from patchbench.report_figures import (figure_accuracy_curves, figure_confusion, figure_loss_curves,
                                       figure_patch_grid, figure_png, figure_sweep_heatmap, figure_tradeoffs,
                                       patch_views)

FORMATS = ("md", "html")


# --------------------------------------------------------------------------------------------------
# Reading run and study directories


@dataclass
class Run:
    """What one run directory holds; `problems` says what was missing or unreadable."""

    name: str
    path: Path
    config: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    summary: dict | None = None
    eval: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "no summary")

    @property
    def finished(self) -> bool:
        return self.status == "finished" and self.summary.get("final_top1") is not None

    @property
    def model(self) -> str:
        return ((self.config or {}).get("model") or {}).get("name") or (self.summary or {}).get("model") or "?"

    @property
    def overrides(self) -> dict:
        return ((self.config or {}).get("model") or {}).get("overrides") or {}

    @property
    def seed(self) -> int | None:
        return ((self.config or {}).get("train") or {}).get("seed")

    @property
    def img_size(self) -> int | None:
        return (self.summary or {}).get("img_size") or ((self.config or {}).get("data") or {}).get("img_size")

    @property
    def patch_size(self) -> int | None:
        """The model override if given, else what train recorded in summary.json (None: no patches)."""
        return self.overrides.get("patch_size") or (self.summary or {}).get("patch_size")


@dataclass
class Group:
    """One configuration (model + overrides) over its seeds."""

    label: str
    model: str
    overrides: dict
    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.finished]


@dataclass
class Study:
    path: Path
    meta: dict  # study.json ({} when the folder is a plain collection of run directories)
    runs: list[Run]
    samples: dict | None  # samples.npz: images (N, S, S, 3) uint8, labels (N,), classes (C,)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} is unreadable ({type(e).__name__}); ignored")
        return None


def read_metrics(path: Path, problems: list[str]) -> list[dict]:
    """metrics.jsonl as a list of epochs; a half-written line (a crash mid-write) is noted and skipped."""
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            problems.append(f"metrics.jsonl line {i} is not valid JSON (truncated?); ignored")
    return rows


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    run = Run(name=path.name, path=path)
    run.config = _read_json(path / "config.json", run.problems)
    run.metrics = read_metrics(path / "metrics.jsonl", run.problems)
    run.summary = _read_json(path / "summary.json", run.problems)
    run.eval = _read_json(path / "eval.json", run.problems)
    if run.config is None:
        run.problems.append("no config.json")
    if run.summary is None:
        run.problems.append("no summary.json (not started, or stopped before its first epoch)")
    elif run.status != "finished":
        done, total = run.summary.get("epochs_done"), run.summary.get("epochs")
        why = f": {run.summary['error']}" if run.summary.get("error") else ""
        run.problems.append(f"status {run.status}, {done} of {total} epochs done{why}")
    elif run.eval is None:
        run.problems.append("no eval.json (no confusion matrix)")
    return run


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("config.json", "summary.json", "metrics.jsonl"))


def load_study(path: str | os.PathLike) -> Study:
    """A study folder (study.json + runs/*), a folder of run directories, or a single run directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"study folder {path} does not exist; run `patchbench compare --out {path}` first")
    problems: list[str] = []
    meta = _read_json(path / "study.json", problems) or {}
    if (path / "runs").is_dir():
        run_dirs = sorted(p for p in (path / "runs").iterdir() if p.is_dir())
    elif _is_run_dir(path):
        run_dirs = [path]
    else:
        run_dirs = sorted(p for p in path.iterdir() if _is_run_dir(p))
    if not run_dirs:
        raise UserError(f"no run directories in {path}; expected {path}/runs/<run>/ with config.json")
    runs = [load_run(p) for p in run_dirs]
    present = {r.name for r in runs}
    for name in meta.get("runs", []):
        if name not in present:
            problems.append(f"run {name} was planned but has no directory (not started yet)")
    samples = None
    if (path / "samples.npz").exists():
        try:
            with np.load(path / "samples.npz", allow_pickle=False) as z:
                samples = {k: z[k] for k in ("images", "labels", "classes")}
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"samples.npz is unreadable ({type(e).__name__}); no patch-grid figure")
    return Study(path=path, meta=meta, runs=runs, samples=samples, problems=problems)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs of the same model and overrides form a group; labels are the model name, plus the overrides
    that tell apart groups of the same model (a sweep's cells)."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.model, json.dumps(run.overrides, sort_keys=True))
        groups.setdefault(key, Group(label=run.model, model=run.model, overrides=run.overrides, runs=[]))
        groups[key].runs.append(run)
    by_model: dict[str, list[Group]] = {}
    for g in groups.values():
        by_model.setdefault(g.model, []).append(g)
    for same in by_model.values():
        if len(same) > 1:
            keys = sorted({k for g in same for k in g.overrides})
            varying = [k for k in keys if len({json.dumps(g.overrides.get(k)) for g in same}) > 1]
            for g in same:
                g.label = g.model + " " + " ".join(f"{k}={g.overrides.get(k)}" for k in varying)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return math.exp(log_front) * f / a


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return _betainc(df / 2, 0.5, df / (df + t * t))


def welch_t_test(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Welch's unequal-variance t-test: (t, degrees of freedom, two-sided p).

    None when a test is impossible: fewer than two values on a side, or no spread on either side.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return None
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return t, df, student_t_two_sided_p(t, df)


def results_rows(groups: list[Group]) -> list[dict]:
    """One row per configuration: numbers as in the files (means over finished seeds), None when unknown."""
    rows = []
    for g in groups:
        done = g.done
        first = done[0].summary if done else {}
        final_mean, final_std = mean_std([r.summary["final_top1"] for r in done])
        best_mean, _ = mean_std([r.summary["best_top1"] for r in done if r.summary.get("best_top1") is not None])
        wall, _ = mean_std([r.summary["wall_time_s"] for r in done if r.summary.get("wall_time_s") is not None])
        rows.append({
            "label": g.label, "params": first.get("params"), "macs": first.get("macs"),
            "train_images_per_s": mean_std([r.summary["train_images_per_s"] for r in done
                                            if r.summary.get("train_images_per_s")])[0],
            "infer_images_per_s": mean_std([r.summary["infer_images_per_s"] for r in done
                                            if r.summary.get("infer_images_per_s")])[0],
            "final_mean": final_mean, "final_std": final_std, "n": len(done), "runs": len(g.runs),
            "best_mean": best_mean, "epochs": first.get("epochs"), "img_size": first.get("img_size"),
            "wall_time_s": wall,
        })
    return rows


def conclusion(groups: list[Group]) -> list[str]:
    """A few sentences: who wins, by how much, and whether the gap is larger than seed-to-seed noise."""
    scored = [(mean_std([r.summary["final_top1"] for r in g.done]), g) for g in groups if g.done]
    scored.sort(key=lambda s: -s[0][0])
    if not scored:
        return ["No run has finished yet, so there is nothing to compare."]
    (best_mean, best_std), best = scored[0]
    lines = [f"**{best.label}** has the highest final-epoch top-1: {_pct(best_mean)}%"
             f"{_pm(best_std)} over n={len(best.done)} seed(s)."]
    if len(scored) == 1:
        return lines
    best_vals = [r.summary["final_top1"] for r in best.done]
    for (mean, std), g in scored[1:]:
        vals = [r.summary["final_top1"] for r in g.done]
        gap = 100 * (best_mean - mean)
        spread = max([s for s in (best_std, std) if s is not None], default=None)
        text = f"It beats {g.label} ({_pct(mean)}%{_pm(std)}, n={len(vals)}) by {gap:.1f} points"
        if spread is None:
            text += "; with one seed on a side there is no seed-to-seed spread to compare with and no test is possible."
        else:
            ratio = gap / (100 * spread) if spread > 0 else math.inf
            relation = "more than" if ratio > 1.25 else "less than" if ratio < 0.8 else "about the same as"
            text += f", {relation} the larger seed-to-seed standard deviation ({100 * spread:.1f} points)"
            test = welch_t_test(best_vals, vals)
            if test is None:
                text += "; Welch's t-test needs at least two seeds on each side."
            else:
                t, df, p = test
                verdict = "significant" if p < 0.05 else "not significant"
                text += f"; Welch's t-test: t={t:.2f}, df={df:.1f}, p={p:.3g} ({verdict} at the 5% level)."
        lines.append(text)
    return lines


def make_figures(study: Study, groups: list[Group], rows: list[dict]) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) for every figure the study's files allow."""
    figs = [("accuracy", "Validation top-1 per epoch", figure_accuracy_curves(groups)),
            ("loss", "Train and validation loss per epoch", figure_loss_curves(groups)),
            ("tradeoffs", "Final top-1 against size, compute and speed", figure_tradeoffs(rows))]
    if study.meta.get("grid"):
        heat = figure_sweep_heatmap(groups, study.meta["grid"])
        if heat is not None:
            figs.append(("sweep", "Sweep: final top-1 over the grid", heat))
    grid = figure_patch_grid(study.samples, patch_views(groups, study.meta.get("patch_sizes")))
    if grid is not None:
        figs.append(("patches", "Val images cut into each model's patches", grid))
    for g in groups:
        conf = figure_confusion(g)
        if conf is not None:
            figs.append((f"confusion-{_slug(g.label)}", f"Confusion matrix: {g.label}", conf))
    return figs


# --------------------------------------------------------------------------------------------------
# Text


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _pm(std: float | None) -> str:
    return "" if std is None else f" ± {100 * std:.1f}"


def _human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


TABLE_HEADER = ["model", "params", "MACs", "train img/s", "infer img/s", "final top-1 % (mean ± std)", "n",
                "best-epoch top-1 %", "epochs", "res", "wall time/run"]


def table_cells(row: dict) -> list[str]:
    n = f"{row['n']}" + (f" of {row['runs']}" if row["runs"] != row["n"] else "")
    wall = "–" if row["wall_time_s"] is None else f"{row['wall_time_s'] / 60:.1f} min"
    ips = [("–" if row[k] is None else f"{row[k]:,.0f}") for k in ("train_images_per_s", "infer_images_per_s")]
    return [row["label"], "–" if row["params"] is None else f"{row['params']:,}", _human(row["macs"]), *ips,
            _pct(row["final_mean"]) + _pm(row["final_std"]), n, _pct(row["best_mean"]),
            str(row["epochs"] or "–"), f"{row['img_size']}px" if row["img_size"] else "–", wall]


def model_lines(meta: dict, groups: list[Group]) -> list[str]:
    """Which configuration each model ran with; with a matched budget, also how close each came to it."""
    budget = meta.get("param_budget")
    chosen = meta.get("chosen") or {g.model: g.overrides for g in groups}
    params_of = {g.model: (g.done[0].summary.get("params") if g.done else None) for g in groups}
    lines = [f"Parameter budget {_human(budget)} (±5%), each family sized by its width:"] if budget else []
    for model, overrides in chosen.items():
        params = (meta.get("chosen_params") or {}).get(model) or params_of.get(model)
        size = "" if params is None else f" → {params:,} params"
        if budget and params is not None:
            size += f" ({100 * (params - budget) / budget:+.1f}%)"
        args = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "its defaults"
        lines.append(f"{model}: {args}{size}")
    return lines


def problem_lines(study: Study) -> list[str]:
    lines = list(study.problems)
    for run in study.runs:
        lines += [f"{run.name}: {p}" for p in run.problems]
    return lines


def setup_line(study: Study) -> str:
    meta = study.meta
    parts = [f"preset `{meta['preset']}`" if meta.get("preset") else None,
             f"data `{meta['data']}`" if meta.get("data") else None,
             f"seeds {', '.join(map(str, meta['seeds']))}" if meta.get("seeds") else None,
             f"{len(study.runs)} run directories"]
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


def build_report(study: Study) -> Report:
    groups = group_runs(study.runs)
    rows = results_rows(groups)
    figures = []
    for stem, caption, fig in make_figures(study, groups, rows):
        figures.append((stem, caption, figure_png(fig)))
    configs = [(r.name, json.dumps(r.config, indent=2, sort_keys=True) if r.config else "(no config.json)")
               for r in study.runs]
    return Report(title=f"patchbench report: {study.path.name}", setup=setup_line(study),
                  table=[table_cells(r) for r in rows], conclusion=conclusion(groups),
                  models=model_lines(study.meta, groups) if not study.meta.get("grid") else [], problems=problem_lines(study), figures=figures,
                  configs=configs)


def to_markdown(report: Report) -> str:
    """Markdown that shows the PNGs written beside it in figures/."""
    def md_row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"# {report.title}", "", report.setup, "", "## Results", "",
           md_row(TABLE_HEADER), md_row(["---"] * len(TABLE_HEADER)), *map(md_row, report.table), "",
           "Final top-1: the last epoch's val accuracy, mean ± sample std over the n finished seeds. "
           "Best-epoch top-1 is optimistic (chosen on the val set) and shown only for comparison.", "",
           "## Conclusion", "", *[f"- {line}" for line in report.conclusion], ""]
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


def to_html(report: Report) -> str:
    """One self-contained page: figures are embedded as base64 PNGs."""
    e = html.escape

    def inline(text):  # the few markdown marks the text uses: **bold** and `code`
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", e(text))
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in report.table)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{e(report.title)}</h1>", f"<p>{inline(report.setup)}</p>",
           "<h2>Results</h2>", f"<table id='results'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
           "<p>Final top-1: the last epoch's val accuracy, mean ± sample std over the n finished seeds. "
           "Best-epoch top-1 is optimistic (chosen on the val set) and shown only for comparison.</p>",
           "<h2>Conclusion</h2><ul>", *[f"<li>{inline(line)}</li>" for line in report.conclusion], "</ul>"]
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        fig_dir = folder / "figures"
        fig_dir.mkdir(exist_ok=True)
        for stem, _, png in report.figures:
            _write_atomic(fig_dir / f"{stem}.png", png)
        _write_atomic(folder / "report.md", to_markdown(report).encode())
        written.append(folder / "report.md")
    if "html" in formats:
        _write_atomic(folder / "report.html", to_html(report).encode())
        written.append(folder / "report.html")
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
