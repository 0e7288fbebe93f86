"""patchbench ablate: the grid is planned and run like a study; the report's table and effects by hand."""

import json
import math

import numpy as np
import pytest
import runfixtures as fx
from scipy import stats as sps
from test_compare import fake_work, ran, tiny_study

from patchbench import study as cp
from patchbench.cli import main
from patchbench.errors import UserError
from patchbench.recipes import get_preset
from patchbench.report import load, render, stats

# final top-1 of two seeds per cell: (mixer, stem) -> [seed 0, seed 1]
CELLS = {("conv", "patch"): [0.70, 0.72], ("conv", "conv"): [0.74, 0.76],
         ("attention", "patch"): [0.60, 0.64], ("attention", "conv"): [0.68, 0.70],
         ("pool", "patch"): [0.66, 0.66], ("pool", "conv"): [0.71, 0.69]}


def write_ablation(study):
    for (mixer, stem), finals in CELLS.items():
        for seed, acc in enumerate(finals):
            fx.write_run(study / "runs" / f"iso_{mixer}_{stem}-s{seed}", model=f"iso_{mixer}_{stem}", seed=seed,
                         val_top1=[acc - 0.1, acc])
    meta = {"kind": "ablation", "preset": "ablation", "data": "imagenette", "seeds": [0, 1], "img_size": 64,
            "param_budget": 500_000, "ablation": {"mixers": ["conv", "attention", "pool"], "stems": ["patch", "conv"]}}
    (study / "study.json").write_text(json.dumps(meta))
    return study


def test_effects_are_the_contrasts_with_the_pooled_seed_variance(tmp_path):
    s = load.load_study(write_ablation(tmp_path / "abl"))
    groups = load.group_runs(s.runs)
    cells = stats.factorial_cells(groups, ["conv", "attention", "pool"], ["patch", "conv"])
    assert cells["conv", "patch"] == pytest.approx([0.70, 0.72])
    effects = {(e["factor"], e["level"]): e for e in stats.factor_effects(cells, ["conv", "attention", "pool"],
                                                                           ["patch", "conv"])}
    # by hand: conv vs attention averaged over the stems
    mean = {k: np.mean(v) for k, v in CELLS.items()}
    effect = ((mean["conv", "patch"] - mean["attention", "patch"]) + (mean["conv", "conv"] - mean["attention", "conv"])) / 2
    pooled = sum(np.var(v, ddof=1) for v in CELLS.values()) / len(CELLS)  # 6 cells, 1 df each
    se = math.sqrt(pooled * (4 * (1 / 2 + 1 / 2) / 2) / 4)  # sum over the 2 stems of (1/n + 1/n), over k^2
    e = effects["mixer", "conv"]
    assert e["effect"] == pytest.approx(effect) and e["se"] == pytest.approx(se) and e["df"] == 6
    assert e["p"] == pytest.approx(2 * sps.t.sf(effect / se, 6))
    stem = effects["stem", "conv"]
    assert stem["effect"] == pytest.approx(np.mean([mean[m, "conv"] - mean[m, "patch"] for m in ("conv", "attention", "pool")]))
    assert ("mixer", "attention") not in effects  # the baseline


def test_a_significant_interaction_gives_the_effects_per_stem(tmp_path):
    """Pooling loses to attention with the patch stem and wins with the conv stem: the effects come per stem,
    as a table with the ANOVA's error mean square, t intervals on its df and Holm's correction."""
    cells = {("attention", "patch"): [0.60, 0.61], ("attention", "conv"): [0.70, 0.71],
             ("pool", "patch"): [0.50, 0.51], ("pool", "conv"): [0.75, 0.76]}
    lines = render.factorial_analysis(cells, ["attention", "pool"], ["patch", "conv"])
    text = "\n".join(lines)
    assert "The mixer x stem interaction is significant" in text and "Holm p over these 4 comparisons" in text
    # by hand: every cell's variance is 0.005^2 * 2 / 1 = 5e-5 on 1 df, so MSE 5e-5 on 4 df; a difference of two
    # cell means has se sqrt(5e-5 * (1/2 + 1/2)) and a 95% half-width of t(0.975, 4) * se = 1.96 points
    se = math.sqrt(5e-5)
    half = sps.t.ppf(0.975, 4) * se
    diffs = {"pool-patch": -0.10, "pool-conv": 0.05, "attention-stem": 0.10, "pool-stem": 0.25}
    raw = {k: 2 * sps.t.sf(abs(d) / se, 4) for k, d in diffs.items()}
    # 4 comparisons: pool vs attention with each stem, and the conv stem against the patch stem for each mixer
    order = sorted(raw, key=raw.get)
    holm_p, running = {}, 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * raw[k]))
        holm_p[k] = running

    def cell(k):
        d = diffs[k]
        return f"{100 * d:+.1f} [{100 * (d - half):+.1f}, {100 * (d + half):+.1f}], p={holm_p[k]:.2g}"

    assert "| mixer | vs attention, patch stem | vs attention, conv stem | conv stem vs patch stem |" in lines
    assert f"| attention | – | – | {cell('attention-stem')} |" in lines
    assert f"| pool | {cell('pool-patch')} | {cell('pool-conv')} | {cell('pool-stem')} |" in lines
    assert cell("pool-patch").startswith("-10.0 [-12.0, -8.0]")


def test_report_has_the_table_heatmap_and_sentences(tmp_path):
    s = load.load_study(write_ablation(tmp_path / "abl"))
    report = render.build_report(s)
    title, lines = report.sections[0]
    text = "\n".join(lines)
    assert title == "Token mixer x stem"
    assert "| conv | 71.0 ± 1.4 (n=2) | 75.0 ± 1.4 (n=2) | 73.0 |" in text
    assert "Setting: 0.5M parameters a cell, imagenette, 64px, 2 epochs; final top-1 on the val split, n=2 seed(s) a cell" in text
    # cell means 71, 75 / 62, 69 / 66, 70: row means 73, 65.5, 68, grand 68.83, so SS mixer = 2 * 2 * (4.17^2 +
    # 3.33^2 + 0.83^2) = 116.7 points^2; within cells: (1 + 1) + (4 + 4) + 0 + 1 + 1 + ... = 16 on 6 df
    assert "| mixer | 116.7 | 2 |" in text and "| within cells | 16.0 | 6 | | |" in text
    assert "The mixer x stem interaction is not significant" in text  # so: main effects
    assert "- depthwise convolution vs attention: +7.5 points (95% CI" in text  # ((71-62) + (75-69)) / 2
    assert "- the convolutional stem vs the patch stem (a strided conv): +5.0 points" in text
    assert "ablation" in [stem for stem, _, _ in report.figures]
    md = render.to_markdown(report)
    assert "## Token mixer x stem" in md and "<table>" in render.to_html(report)


def test_the_readme_summary_of_an_ablation_is_its_table_and_effects(tmp_path):
    summary = render.study_summary(write_ablation(tmp_path / "abl"))
    assert summary[0].startswith("| model |") and len([x for x in summary if x.startswith("| iso_")]) == 6
    assert "| conv | 71.0 ± 1.4 (n=2) | 75.0 ± 1.4 (n=2) | 73.0 |" in summary
    assert "- depthwise convolution vs attention: +7.5 points (95% CI +4.7 to +10.3), Holm p=0.0019" in summary
    assert not any("It beats" in x for x in summary)  # the pairwise conclusion is replaced by the effects


def write_budget_ablation(study):
    """CELLS at 2.5T; at 10T every cell 10 points higher except pool with the conv stem, 25 points higher, so
    that pool overtakes conv with the conv stem. Every run recorded a fit 5 points above its val top-1."""
    for budget, tag in ((2.5e12, "2.5T"), (10e12, "10T")):
        for (mixer, stem), finals in CELLS.items():
            for seed, acc in enumerate(finals):
                acc += 0.25 if budget == 10e12 and (mixer, stem) == ("pool", "conv") else 0.10 if budget == 10e12 else 0
                run = fx.write_run(study / "runs" / f"iso_{mixer}_{stem}-budget={tag}-s{seed}", model=f"iso_{mixer}_{stem}",
                                   seed=seed, val_top1=[acc - 0.1, acc], epochs=2 if budget == 2.5e12 else 8)
                summary = json.loads((run / "summary.json").read_text())
                (run / "summary.json").write_text(json.dumps({**summary, "budget_macs": budget,
                                                              "train_macs": budget * (1 - 0.003 * seed)}))
                metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                (run / "metrics.jsonl").write_text("".join(json.dumps({**m, "fit_top1": m["val_top1"] + 0.05}) + "\n"
                                                           for m in metrics))
    meta = {"kind": "ablation", "preset": "ablation", "data": "imagenette", "seeds": [0, 1], "img_size": 64,
            "param_budget": 500_000, "budgets": [2.5e12, 10e12], "models": [f"iso_{m}_{s}" for m, s in CELLS],
            "chosen_macs": {f"iso_{m}_{s}": 30e6 if s == "patch" else 48e6 for m, s in CELLS},
            "ablation": {"mixers": ["conv", "attention", "pool"], "stems": ["patch", "conv"]}}
    (study / "study.json").write_text(json.dumps(meta))
    return study


def test_an_ablation_at_two_budgets_says_its_setting_once_then_each_budget_and_the_order(tmp_path):
    s = load.load_study(write_budget_ablation(tmp_path / "abl"))
    report = render.build_report(s)
    assert [t for t, _ in report.sections] == ["Token mixer x stem"]  # no family-by-family budget section
    assert report.conclusion[0].startswith("Models are compared at equal training compute in 'Token mixer x stem'")
    lines = report.sections[0][1]
    text = "\n".join(lines)
    assert text.count("Setting:") == 1 and lines[0].startswith(
        "Setting: 0.5M parameters a cell, imagenette, 64px, every cell trained for 2.5T and for 10T MACs")
    assert "trains fewer steps; every run within ±0.3% of its budget)" in lines[0]  # seed 1 trained 0.3% short
    assert "MACs per image 30M with the patch stem and 48M with the conv stem" in lines[0]
    assert "#### At 2.5T MACs of training (2 epochs)" in lines and "#### At 10T MACs of training (8 epochs)" in lines
    assert text.count("| source | SS (points²) | df | F | p |") == 2
    assert "| conv | 71.0 ± 1.4 (n=2) | 75.0 ± 1.4 (n=2) | 73.0 |" in lines  # 2.5T
    assert "| conv | 81.0 ± 1.4 (n=2) | 85.0 ± 1.4 (n=2) | 83.0 |" in lines  # 10T
    # means with the patch stem: conv 71, attention 62, pool 66 at both budgets (+10 at 10T); with the conv
    # stem 75, 69, 70 at 2.5T, then 85, 79, 95 at 10T: pool moves from second to first there and over the stems
    # (means 73, 65.5, 68 at 2.5T; 83, 75.5, 85.5 at 10T)
    assert "- patch stem: conv > pool > attention at every budget" in lines
    assert "- conv stem: changes, 2.5T: conv > pool > attention; 10T: pool > conv > attention" in lines
    assert "- mean over the stems: changes, 2.5T: conv > pool > attention; 10T: pool > conv > attention" in lines
    # fit (5 points above val) / val at the last epoch, mean over the two seeds
    assert "| iso_conv_patch | 76.0 / 71.0 (+5.0) | 86.0 / 81.0 (+5.0) |" in lines
    summary = render.study_summary(s.path)
    assert summary == lines  # a page shows the cell tables, not a row per cell and budget
    # a mixer not finished at one budget is left out of the order at every budget, not read as a change
    cells_at = {b: stats.factorial_cells([g for g in load.group_runs(s.runs) if g.budget == b],
                                         ["conv", "attention", "pool"], ["patch", "conv"]) for b in (2.5e12, 10e12)}
    cells_at[10e12]["attention", "patch"] = []
    assert "- patch stem: conv > pool at every budget" in render.mixer_ranking(cells_at, ["conv", "attention", "pool"],
                                                                              ["patch", "conv"])


def test_ablate_plans_every_cell_at_the_budget(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    kw = tiny_study(tmp_path)
    result = cp.ablate(["conv", "attention"], ["patch", "conv"], [0], study, preset=get_preset("ablation"),
                       changes={**kw["changes"], "data": {**kw["changes"]["data"], "img_size": 16}},
                       progress=False, work=fake_work(log), param_budget=100_000)
    # every cell once at each of the preset's two compute budgets
    assert sorted(ran(log)) == sorted(f"iso_{m}_{s}-budget={b}-s0" for m in ("conv", "attention")
                                      for s in ("patch", "conv") for b in ("2.5T", "10T"))
    meta = json.loads((study / "study.json").read_text())
    assert meta["kind"] == "ablation" and meta["ablation"] == {"mixers": ["conv", "attention"], "stems": ["patch", "conv"]}
    assert all(abs(p - 100_000) <= 5_000 for p in meta["chosen_params"].values())
    assert set(meta["chosen_macs"]) == set(meta["chosen"]) and len(result.outcome["trained"]) == 8
    assert meta["budgets"] == [2.5e12, 1e13]
    with pytest.raises(UserError, match="--mixers fft: choose from conv, attention"):
        cp.ablate(["fft"], ["patch"], [0], tmp_path / "other", preset=get_preset("ablation"))


def test_cli_ablate_bad_input_exits_2(tmp_path, capsys):
    assert main(["ablate", "--mixers", "conv,fft", "--out", str(tmp_path / "s")]) == 2
    assert "--mixers conv,fft: choose from" in capsys.readouterr().err
    assert main(["ablate", "--param-budget", "1M", "--mac-budget", "5M", "--out", str(tmp_path / "s")]) == 2
    assert "give one of them" in capsys.readouterr().err
