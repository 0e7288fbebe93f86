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
    """Pooling loses to attention with the patch stem and wins with the conv stem: the effects come per stem."""
    cells = {("attention", "patch"): [0.60, 0.61], ("attention", "conv"): [0.70, 0.71],
             ("pool", "patch"): [0.50, 0.51], ("pool", "conv"): [0.75, 0.76]}
    lines = render.factorial_analysis(cells, ["attention", "pool"], ["patch", "conv"])
    text = "\n".join(lines)
    assert "The mixer x stem interaction is significant" in text
    # 4 comparisons (pool vs attention per stem, the conv stem per mixer), Holm-corrected
    assert "- the patch stem (a strided conv), average pooling vs attention: -10.0 points" in text
    assert "- the convolutional stem, average pooling vs attention: +5.0 points" in text
    assert "- average pooling, the convolutional stem vs the patch stem (a strided conv): +25.0 points" in text
    assert text.count("Holm p=") == 4


def test_report_has_the_table_heatmap_and_sentences(tmp_path):
    s = load.load_study(write_ablation(tmp_path / "abl"))
    report = render.build_report(s)
    title, lines = report.sections[0]
    text = "\n".join(lines)
    assert title == "Token mixer x stem"
    assert "| conv | 71.0 ± 1.4 (n=2) | 75.0 ± 1.4 (n=2) | 73.0 |" in text
    assert "Setting: 0.5M parameters, imagenette, 64px, 2 epochs, measured on the val split, n=2 seed(s) a cell" in text
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
