"""The report on fixture run directories (tests/runfixtures.py): numbers, statistics, figures, HTML, problems."""

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import runfixtures as fx

from patchbench.cli import main
from patchbench.report import figures as rf
from patchbench.report import load, render, stats


@pytest.fixture
def study(tmp_path):
    return fx.write_compare_study(tmp_path / "study")


def groups_of(study_dir):
    return load.group_runs(load.load_study(study_dir).runs)


def test_table_numbers_are_the_fixtures(study):
    rows = {r["label"]: r for r in stats.results_rows(groups_of(study))}
    cm = rows["convmixer_256_8"]
    assert cm["params"] == 594_186 and cm["macs"] == 147_000_000 and cm["n"] == 3 and cm["epochs"] == 3
    assert cm["final_mean"] == pytest.approx(0.82) and cm["final_std"] == pytest.approx(0.02)
    assert cm["best_mean"] == pytest.approx(np.mean([0.80, 0.82, 0.84]))
    assert cm["wall_time_s"] == pytest.approx(61.0) and cm["infer_images_per_s"] == 480.0
    vit = rows["vit_tiny_6l8h"]
    assert vit["best_mean"] == pytest.approx(np.mean([0.60, 0.66, 0.62]))
    cells = render.table_cells(cm)
    assert cells[:3] == ["convmixer_256_8", "594,186", "147.00M"]
    assert cells[5] == "82.0 ± 2.0" and cells[6] == "3" and cells[9] == "32px" and cells[10] == "val"
    assert cells[11] == "1.0 min"


def test_mean_std_is_sample_std():
    values = [0.71, 0.75, 0.80, 0.78]
    mean, std = stats.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert stats.mean_std([0.5]) == (0.5, None) and stats.mean_std([]) == (None, None)


def test_welch_p_value_is_the_two_sided_student_t_tail():
    """Equal n (3) and variance (1): Welch's df is 2 (n - 1) = 4, t = (2 - 4) / sqrt(1/3 + 1/3) = -2.449, and
    the two-sided p of t with 4 df has a closed form (t4_two_sided, below), independent of scipy."""
    a, b = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0]
    t, df, p = stats.welch_t_test(a, b)
    assert t == pytest.approx(-2 / math.sqrt(2 / 3)) and df == pytest.approx(4)
    assert p == pytest.approx(t4_two_sided(abs(t)), rel=1e-9)  # 0.0705
    t2, df2, p2 = stats.welch_t_test(b, a)  # symmetric
    assert (t2, df2, p2) == pytest.approx((-t, df, p))


def test_welch_t_test_by_hand():
    a, b = [0.80, 0.82, 0.84], [0.60, 0.64, 0.62, 0.63]
    t, df, p = stats.welch_t_test(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    assert t == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert 0 < p < 1e-3
    assert stats.welch_t_test([0.8], b) is None and stats.welch_t_test([0.5, 0.5], [0.5, 0.5]) is None


def test_conclusion_names_winner_gap_and_test(study):
    text = " ".join(stats.conclusion(groups_of(study)))
    assert "**convmixer_256_8** has the highest" in text and "82.0% ± 2.0 over n=3" in text
    assert "by 20.0 points" in text and "Welch's t-test: t=12.25, df=4.0" in text and "significant" in text


def test_conclusion_with_one_seed_says_no_test(tmp_path):
    for model, acc in [("a", 0.7), ("b", 0.6)]:
        fx.write_run(tmp_path / "runs" / f"{model}-s0", model=model, seed=0, val_top1=[acc])
    text = " ".join(stats.conclusion(groups_of(tmp_path)))
    assert "by 10.0 points" in text and "no test is possible" in text and "t=" not in text


def test_accuracy_figure_plots_means_with_legend(study):
    fig = rf.figure_accuracy_curves(groups_of(study))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "val top-1 (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["convmixer_256_8 (n=3)", "vit_tiny_6l8h (n=3)"]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert np.allclose(line.get_ydata(), 100 * np.mean(fx.COMPARE_CURVES["convmixer_256_8"], axis=0))
    assert len(ax.collections) == 2  # one min-max band per model


def test_loss_and_tradeoff_figures_have_their_axes(study):
    groups = groups_of(study)
    loss = rf.figure_loss_curves(groups)
    assert [a.get_ylabel() for a in loss.axes] == ["train loss", "val loss"]
    assert all(a.get_yscale() == "log" for a in loss.axes)
    train_line = loss.axes[0].get_lines()[0]  # fixture: train_loss = 2 - 2 * acc
    assert np.allclose(train_line.get_ydata(), 2 - 2 * np.mean(fx.COMPARE_CURVES["convmixer_256_8"], axis=0))
    trade = rf.figure_tradeoffs(stats.results_rows(groups))
    # fixture: params 0.59M vs 0.91M (narrow: linear), MACs 147M vs 14M (wide: log)
    assert [a.get_xlabel() for a in trade.axes] == ["parameters", "MACs per image (log)", "inference images/s"]
    assert [a.get_xscale() for a in trade.axes] == ["linear", "log", "linear"]
    xs = [c.lines[0].get_xdata()[0] for c in trade.axes[0].containers]
    assert xs == [594_186, 907_914]
    assert trade.axes[0].get_ylabel() == "final val top-1 (%)"
    assert [t.get_text() for t in trade.axes[1].get_legend().get_texts()] == ["convmixer_256_8", "vit_tiny_6l8h"]


def test_confusion_matrix_sums_seeds_as_row_percent(tmp_path):
    conf = [[8, 2, 0, 0], [1, 9, 0, 0], [0, 0, 10, 0], [5, 0, 0, 5]]
    for seed in (0, 1):
        fx.write_run(tmp_path / "runs" / f"m-s{seed}", model="m", seed=seed, val_top1=[0.8], confusion=conf)
    fig = rf.figure_confusion(groups_of(tmp_path)[0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert np.allclose(ax.get_images()[0].get_array(), 100 * np.array(conf) / 10)
    assert [t.get_text() for t in ax.get_yticklabels()] == fx.CLASSES
    assert "n=2" in ax.get_title()


def test_patch_grid_has_a_column_per_patch_size(study):
    s = load.load_study(study)
    views = rf.patch_views(load.group_runs(s.runs))
    assert views == {(2, 32): ["convmixer_256_8"], (16, 32): ["vit_tiny_6l8h"]}
    fig = rf.figure_patch_grid(s.samples, views)
    assert len(fig.axes) == 3 * 2  # three sample images x two patch sizes
    assert "patch 2 at 32px" in fig.axes[0].get_title() and "(256 patches)" in fig.axes[0].get_title()
    assert "patch 16 at 32px" in fig.axes[1].get_title()
    assert fig.axes[0].get_ylabel() == fx.CLASSES[0]


def test_patch_size_falls_back_to_study_json(tmp_path):
    fx.write_run(tmp_path / "runs" / "m-s0", model="m", seed=0, val_top1=[0.5], patch_size=None)
    groups = groups_of(tmp_path)
    assert rf.patch_views(groups) == {}
    assert rf.patch_views(groups, {"m": 4}) == {(4, 32): ["m"]}


def test_sweep_heatmap_holds_the_grid(tmp_path):
    study = fx.write_sweep_study(tmp_path / "sweep")
    s = load.load_study(study)
    groups = load.group_runs(s.runs)
    assert min(g.label for g in groups) == "convmixer_256_8(patch_size=2, kernel_size=3)"
    fig = rf.figure_sweep_heatmap(groups, s.meta["grid"])
    ax = fig.axes[0]
    assert ax.get_ylabel() == "patch_size" and ax.get_xlabel() == "kernel_size"
    expected = [[100 * (0.5 + p / 100 + k / 50) for k in (3, 5)] for p in (2, 4)]
    assert np.allclose(ax.get_images()[0].get_array(), expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "5"]
    stems = [stem for stem, _, _ in render.build_report(s).figures]
    assert "sweep" in stems


def test_html_is_self_contained_with_table_and_images(study):
    paths = render.write_report(study)
    assert [p.name for p in paths] == ["report.md", "report.html"]
    page = (study / "report.html").read_text()
    assert "<table id='results'>" in page and "<td>82.0 ± 2.0</td>" in page and "<td>594,186</td>" in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 7  # accuracy (per epoch, against time), loss, tradeoffs, patches, 2 confusion matrices
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "src='figures/" not in page and "http" not in page.replace("http-equiv", "")
    assert page.count("<details>") == 6  # one config per run
    assert "<li>convmixer_256_8: its defaults → 594,186 params</li>" in page
    md = (study / "report.md").read_text()
    assert "| convmixer_256_8 | 594,186 |" in md and "![Validation top-1 per epoch](figures/accuracy.png)" in md
    assert sorted(p.name for p in (study / "figures").iterdir()) == sorted(
        ["accuracy-time.png", "accuracy.png", "loss.png", "tradeoffs.png", "patches.png", "confusion-convmixer_256_8.png",
         "confusion-vit_tiny_6l8h.png"])


def test_missing_and_partial_runs_are_reported_not_counted(study):
    runs = study / "runs"
    fx.write_run(runs / "vit_tiny_6l8h-s3", model="vit_tiny_6l8h", seed=3, val_top1=[0.3, 0.4], epochs=3,
                 status="running", truncate_metrics=True)
    fx.write_run(runs / "vit_tiny_6l8h-s4", model="vit_tiny_6l8h", seed=4, val_top1=[0.2], status="failed")
    fx.write_run(runs / "vit_tiny_6l8h-s5", model="vit_tiny_6l8h", seed=5, val_top1=[], write_summary=False)
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{not json")
    meta = json.loads((study / "study.json").read_text())
    meta["runs"] = ["vit_tiny_6l8h-s0", "resnet9-s0"]
    (study / "study.json").write_text(json.dumps(meta))

    s = load.load_study(study)
    rows = {r["label"]: r for r in stats.results_rows(load.group_runs(s.runs))}
    assert rows["vit_tiny_6l8h"]["n"] == 3 and rows["vit_tiny_6l8h"]["runs"] == 6
    assert rows["vit_tiny_6l8h"]["final_mean"] == pytest.approx(0.62)  # unchanged by the partial runs
    problems = "\n".join(render.problem_lines(s))
    assert "metrics.jsonl: dropped its last line, cut short while being written" in problems
    assert "vit_tiny_6l8h-s3: status running, 2 of 3 epochs done" in problems
    assert "vit_tiny_6l8h-s4: status failed, 1 of 1 epochs done: loss became NaN" in problems
    assert "vit_tiny_6l8h-s5: no readable summary.json" in problems
    assert "broken: " in problems and "summary.json is not valid JSON" in problems
    assert "run resnet9-s0 was planned but has no directory" in problems
    page = render.to_html(render.build_report(s))
    assert "<ul id='problems'>" in page and "3 of 6" in page


def test_cli_report_writes_and_prints_the_table(study, capsys):
    assert main(["report", str(study), "--format", "html"]) == 0
    out = capsys.readouterr().out
    assert "82.0 ± 2.0" in out and f"wrote {study / 'report.html'}" in out
    assert not (study / "report.md").exists()
    assert main(["report", str(study / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(study), "--format", "pdf"]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(study, tmp_path):
    render.write_report(study, ["html"])
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run"]
    url = (study / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120)
    assert "<table id=\"results\">" in dom.stdout and "82.0 ± 2.0" in dom.stdout
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url], check=False,
                   capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert im.size == (1200, 1600) and pixels.std() > 10  # a rendered page, not a blank one


def test_reference_section_sets_the_published_numbers_against_our_seeds(study):
    meta = json.loads((study / "study.json").read_text())
    meta["reference"] = {"source": "the notebook", "convmixer_256_8": {"final": 0.83, "best": 0.85},
                         "vit_tiny_6l8h": {"final": 0.70, "best": 0.72}, "resnet9": {"final": 0.76}}
    (study / "study.json").write_text(json.dumps(meta))
    # seed 1's lowest val loss is at epoch 2 (71%), its highest accuracy at epoch 3 (82%): "highest" is the latter
    metrics = study / "runs" / "convmixer_256_8-s1" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[1]["val_loss"] = 0.01
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    text = render.to_markdown(render.build_report(load.load_study(study)))
    section = text.split("## Against the reference")[1].split("\n## ")[0]
    assert "Reference: the notebook." in section
    lines = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    # convmixer: ours 80 / 82 / 84 -> 82.0 ± 2.0, the reference's 83 inside and 1 point away
    assert lines["convmixer_256_8"] == "| convmixer_256_8 | 83.0 (85.0) | 82.0 ± 2.0 | 3 | 80.0–84.0 | 82.0 | -1.0 | yes | yes |"
    # vit: ours 60 / 64 / 62, highest epochs 60 / 66 / 62; the reference's 70 is outside and 8 points away
    assert lines["vit_tiny_6l8h"] == "| vit_tiny_6l8h | 70.0 (72.0) | 62.0 ± 2.0 | 3 | 60.0–64.0 | 62.7 | -8.0 | no | no |"
    assert lines["resnet9"].startswith("| resnet9 | 76.0 (") and lines["resnet9"].endswith("| 0 | – | – | – | – | – |")
    summary = render.study_summary(study)  # the README's block: the results table, conclusion, then this table
    assert lines["convmixer_256_8"] in summary and summary.index(lines["convmixer_256_8"]) > summary.index("")


def test_seed_preset_carries_the_notebooks_numbers():
    from patchbench.recipes import get_preset

    ref = get_preset("notebook").reference
    assert {m: (r["final"], r["best"]) for m, r in ref.items() if m != "source"} == {
        "notebook_convmixer": (0.808, 0.813), "notebook_resnet9": (0.764, 0.785), "notebook_vit": (0.613, 0.635)}


@pytest.mark.parametrize("entry", [{"final": "80%"}, {"final": 0.8, "worst": 0.5}, 0.8])
def test_a_bad_reference_entry_is_refused_with_its_name(entry):
    from patchbench.errors import UserError
    from patchbench.recipes import parse_recipe

    assert parse_recipe({"reference": {"m": {"final": 0.8, "best": 0.81}}}, "r.toml").reference["m"]["best"] == 0.81
    with pytest.raises(UserError, match=r"r.toml: \[reference.m\] holds final and best top-1 fractions"):
        parse_recipe({"reference": {"m": entry}}, "r.toml")


# ----------------------------------------------------------------------------- two-way ANOVA, by hand

# A 2 x 2 design with 2 values a cell: cell means 2, 6 / 3, 11; row means 4, 7; column means 2.5, 8.5;
# grand mean 5.5. By hand: SS rows = 2*2*(1.5^2 + 1.5^2) = 18, SS cols = 2*2*(3^2 + 3^2) = 72, the
# interaction residuals are +-1 in every cell so SS = 2*4 = 8, within cells (1 - 2)^2 + (3 - 2)^2 = 2 a
# cell so SS error = 8 on 4 df (MSE 2). F = 9, 36 and 4 on (1, 4) df.
HAND_CELLS = {("r1", "c1"): [1, 3], ("r1", "c2"): [5, 7], ("r2", "c1"): [2, 4], ("r2", "c2"): [10, 12]}


def t4_two_sided(t: float) -> float:
    """P(|T| > t) for Student's t with 4 df, in closed form (x = t / sqrt(t^2 + 4)): 1 - 3x/2 + x^3/2."""
    x = t / math.sqrt(t * t + 4)
    return 1 - 1.5 * x + 0.5 * x ** 3


def test_two_way_anova_matches_the_hand_computed_sums_of_squares():
    from patchbench.report.stats import two_way_anova

    a = two_way_anova(HAND_CELLS, ["r1", "r2"], ["c1", "c2"])
    assert (a["rows"]["ss"], a["cols"]["ss"], a["interaction"]["ss"], a["error"]["ss"]) == (18, 72, 8, 8)
    assert (a["rows"]["df"], a["interaction"]["df"], a["error"]["df"], a["error"]["ms"]) == (1, 1, 4, 2)
    assert (a["rows"]["f"], a["cols"]["f"], a["interaction"]["f"]) == (9, 36, 4)
    # F(1, 4) = t(4)^2: the p of F = 9 is the two-sided p of t = 3
    assert a["rows"]["p"] == pytest.approx(t4_two_sided(3.0), rel=1e-9)
    assert a["interaction"]["p"] == pytest.approx(t4_two_sided(2.0), rel=1e-9)
    assert two_way_anova({**HAND_CELLS, ("r1", "c1"): [1, 3, 2]}, ["r1", "r2"], ["c1", "c2"]) is None  # unbalanced
    assert two_way_anova(HAND_CELLS, ["r1", "r2"], ["c1"]) is None  # one level of a factor: nothing to test


def test_holm_adjusts_step_down():
    from patchbench.report.stats import holm

    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_cell_contrast_interval_and_p_by_hand():
    from patchbench.report.stats import cell_contrasts

    (c,) = cell_contrasts(HAND_CELLS, [(("r2", "c2"), ("r1", "c2"))], mse=2.0, df=4)
    # 11 - 6 = 5, SE = sqrt(2 * (1/2 + 1/2)) = sqrt(2); t(0.975, 4) = 2.776445 (tables)
    assert c["diff"] == 5 and c["se"] == pytest.approx(math.sqrt(2))
    assert (c["low"], c["high"]) == pytest.approx((5 - 2.776445 * math.sqrt(2), 5 + 2.776445 * math.sqrt(2)), abs=1e-5)
    assert c["p"] == pytest.approx(t4_two_sided(5 / math.sqrt(2)), rel=1e-9) and c["p_holm"] == c["p"]


# ----------------------------------------------------------------------------- curves over compute budgets


def test_t_interval_by_hand():
    from patchbench.report.stats import t_interval

    # mean 0.8, sample std 0.02 over 3 values; t(0.975, 2) = 4.302653 (tables): half-width 4.302653 * 0.02 / sqrt(3)
    low, high = t_interval([0.78, 0.80, 0.82])
    assert (low, high) == pytest.approx((0.8 - 4.302653 * 0.02 / math.sqrt(3), 0.8 + 4.302653 * 0.02 / math.sqrt(3)))
    assert t_interval([0.8]) is None


def test_compute_to_reach_interpolates_in_log_compute_and_never_extrapolates():
    from patchbench.report.stats import compute_to_reach

    budgets = [5e12, 10e12, 20e12, 40e12]
    # 0.70 at 10T, 0.80 at 20T: 0.75 is half-way in log-compute, sqrt(10T * 20T)
    assert compute_to_reach(budgets, [0.6, 0.7, 0.8, 0.85], 0.75) == ("at", pytest.approx(math.sqrt(10e12 * 20e12)))
    assert compute_to_reach(budgets, [0.6, 0.7, 0.8, 0.85], 0.80) == ("at", pytest.approx(20e12))
    assert compute_to_reach(budgets, [0.6, 0.7, 0.72, 0.74], 0.75) == ("not reached", None)
    assert compute_to_reach(budgets, [0.76, 0.8, 0.82, 0.85], 0.75) == ("below", 5e12)


def test_curve_crossings_between_budgets():
    from patchbench.report.stats import curve_crossings

    budgets = [5, 10, 20, 40]
    assert curve_crossings(budgets, [0.6, 0.7, 0.8, 0.82], [0.65, 0.72, 0.78, 0.8]) == [(10, 20)]
    assert curve_crossings(budgets, [0.6, 0.7, 0.8, 0.9], [0.5, 0.6, 0.7, 0.8]) == []


def write_budget_study(root: Path) -> Path:
    """Three models x budgets 5T, 10T, 20T x seeds 0-2 (final top-1 = the curve's value + seed * 0.002)."""
    curves = {"convmixer_256_8": [0.70, 0.80, 0.85], "resnet9": [0.60, 0.70, 0.74], "vit_tiny_6l8h": [0.75, 0.78, 0.80]}
    budgets = [5e12, 10e12, 20e12]
    for model, accs in curves.items():
        for budget, acc in zip(budgets, accs):
            for seed in range(3):
                run = root / "runs" / f"{model}-budget={budget / 1e12:g}T-s{seed}"
                fx.write_run(run, model=model, seed=seed, val_top1=[acc - 0.1, acc + seed * 0.002])
                summary = json.loads((run / "summary.json").read_text())
                (run / "summary.json").write_text(json.dumps({**summary, "budget_macs": budget}))
    (root / "study.json").write_text(json.dumps({"kind": "compare", "models": list(curves), "seeds": [0, 1, 2],
                                                 "budgets": budgets}))
    return root


def test_a_budget_study_reports_tables_winners_thresholds_and_crossings(tmp_path):
    study = load.load_study(write_budget_study(tmp_path / "b"))
    groups = load.group_runs(study.runs)
    assert len(groups) == 9 and {g.label for g in groups} >= {"resnet9 @ 5T", "convmixer_256_8 @ 20T"}
    ((title, lines),) = render.budget_section(study, groups)
    text = "\n".join(lines)
    assert title == "Across compute budgets" and "| model | 5T | 10T | 20T |" in text
    # resnet9 at 5T: 60.0, 60.2, 60.4 -> mean 60.2, std 0.2, 95% CI 60.2 +- 4.303 * 0.2 / sqrt(3) = +-0.50
    assert "| resnet9 | 60.2 ± 0.2 (59.7–60.7), n=3 |" in text
    assert "- At 5T: **vit_tiny_6l8h** is highest, above convmixer_256_8 by 5.0 points (Holm p=" in text
    assert "- At 20T: **convmixer_256_8** is highest" in text
    # convmixer's seeds cross 75% at a fraction f = 0.50, 0.48, 0.46 of the way from 5T to 10T in log-compute:
    # 5T x 2^f = 7.071T, 6.975T, 6.877T, mean 6.974T
    assert "- convmixer_256_8, 75.0%: 6.974T (95% CI" in text
    assert "- resnet9, 75.0%: not reached in range (up to 20T)" in text
    assert "- vit_tiny_6l8h, 75.0%: reached at the smallest budget already (5T)" in text
    assert "convmixer_256_8 and vit_tiny_6l8h change order between 5T and 10T" in text
    assert rf.figure_budget_curves(groups) is not None
    report = render.build_report(study)
    assert report.conclusion[0].startswith("Models are compared at equal training compute")
    # the same study while only its smallest budget has finished: that column is filled, the others wait
    for run in (tmp_path / "b" / "runs").iterdir():
        if "budget=5T" not in run.name:
            (run / "summary.json").write_text(json.dumps({"status": "running"}))
    early = load.load_study(tmp_path / "b")
    text = "\n".join(render.budget_section(early, load.group_runs(early.runs))[0][1])
    assert "| resnet9 | 60.2 ± 0.2 (59.7–60.7), n=3 | – | – |" in text
    assert any(stem == "budget-curves" for stem, _, _ in report.figures)


def test_a_budget_study_sets_fit_beside_val_at_the_last_epoch(tmp_path):
    """fit_top1 (train images scored as val is) beside val top-1, mean over seeds, only where recorded."""
    root = write_budget_study(tmp_path / "b")
    for run in (root / "runs").glob("resnet9-budget=5T-*"):  # val 0.600, 0.602, 0.604 at the last epoch
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[-1]["fit_top1"] = rows[-1]["val_top1"] + 0.1  # fit 0.700, 0.702, 0.704
        rows[0]["fit_top1"] = 0.0  # an earlier epoch's fit is not the last epoch's
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = load.load_study(root)
    ((_, lines),) = render.budget_section(study, load.group_runs(study.runs))
    assert "| resnet9 | 70.2 / 60.2 (+10.0) | – | – |" in lines
    assert "| convmixer_256_8 | – | – | – |" in lines
    bare = load.load_study(write_budget_study(tmp_path / "c"))
    ((_, lines),) = render.budget_section(bare, load.group_runs(bare.runs))
    assert not any("Fit against generalisation" in line for line in lines)


def test_how_runs_computed_is_said_once_only_when_every_model_recorded_the_same(tmp_path):
    def study(derived: dict) -> list:
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        for model, what in derived.items():
            run = fx.write_run(tmp_path / "s" / "runs" / f"{model}-s0", model=model, seed=0, val_top1=[0.5])
            config = json.loads((run / "config.json").read_text())
            config["train"]["amp"] = "none"
            (run / "config.json").write_text(json.dumps({**config, **({"derived": what} if what else {})}))
        return load.group_runs(load.load_study(tmp_path / "s").runs)

    same = {"crop": "torch", "kernels": "none"}
    lines = render.provenance_lines(study({"resnet9": same, "vit_tiny_6l8h": same}))
    assert lines == ["Every run computed with: precision fp32; crops: torch; CPU operators: none"]
    lines = render.provenance_lines(study({"resnet9": same, "vit_tiny_6l8h": {**same, "kernels": "2 layers"}}))
    assert lines == ["resnet9 computed with: precision fp32; crops: torch; CPU operators: none",
                     "vit_tiny_6l8h computed with: precision fp32; crops: torch; CPU operators: 2 layers"]
    lines = render.provenance_lines(study({"resnet9": same, "vit_tiny_6l8h": same, "convmixer_256_8": None}))
    assert lines == ["resnet9 computed with: precision fp32; crops: torch; CPU operators: none",  # one recorded none
                     "vit_tiny_6l8h computed with: precision fp32; crops: torch; CPU operators: none"]


def test_studies_of_the_same_data_can_share_one_samples_file(study, tmp_path):
    """study.json's "samples" names a shared file (relative to the study), as the committed studies do."""
    import json
    import shutil

    shared = study.parent / "samples.npz"
    shutil.move(study / "samples.npz", shared)
    assert load.load_study(study).samples is None
    meta = json.loads((study / "study.json").read_text())
    (study / "study.json").write_text(json.dumps({**meta, "samples": "../samples.npz"}))
    samples = load.load_study(study).samples
    assert samples is not None and samples["images"].shape[0] == len(samples["labels"]) > 0


def test_a_budget_study_under_way_says_the_thresholds_are_not_computed_yet(tmp_path):
    root = write_budget_study(tmp_path / "b")
    for run in (root / "runs").glob("*-budget=20T-*"):  # the largest budget not trained yet
        shutil.rmtree(run)
    study = load.load_study(root)
    ((_, lines),) = render.budget_section(study, load.group_runs(study.runs))
    assert "- not yet: no seed has finished every budget" in lines
    assert not any(line.endswith("seeds in range") or ": not reached" in line for line in lines)
