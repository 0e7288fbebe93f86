"""patchbench tune: the same search for every family (equal trial counts), ranges widened where an optimum
lies on their edge, the best two re-run with a second seed, the choice by the two seeds' mean; trials
scored on a holdout of train at the search's compute budget; a rerun of the command trains nothing."""

import json
import math
import re

import pytest
import runfixtures as fx
from test_compare import image_folder

from patchbench.errors import UserError
from patchbench.recipes import load_recipe
from patchbench.study import search as tn

SEARCH = """
preset = "smoke"
[tune]
lr = [1e-3, 1e-2]
weight_decay = [0.01, 0.1]
patch_size = [2, 4]
trials = 8
compute_budget = "2M"
holdout = 0.25
holdout_seed = 3
"""


def test_log_ranges_and_widening_at_an_edge():
    assert tn.log_value(0.5, 1e-3, 1e-1) == pytest.approx(1e-2)
    assert tn.log_position(1e-2, 1e-3, 1e-1) == pytest.approx(0.5)
    ranges = {"lr": [1e-3, 1e-1], "weight_decay": [1e-2, 1e-1]}
    assert tn.widen(ranges, {"lr": 1e-2, "weight_decay": 0.03}) == ranges  # inside: unchanged
    wider = tn.widen(ranges, {"lr": 1.1e-3, "weight_decay": 0.095})  # lr at the low edge, wd at the high one
    assert wider["lr"] == pytest.approx([1e-4, 1e-1]) and wider["weight_decay"] == pytest.approx([1e-2, 0.1 * 10**0.5])


@pytest.mark.parametrize("space, message", [
    ({"lr": [1e-2, 1e-3], "weight_decay": [0.01, 0.1]}, "need 0 < low < high"),
    ({"lr": [1e-3, 1e-2], "weight_decay": [0.01, 0.1], "trials": 1}, "trials = 1"),
    ({"lr": [1e-3, 1e-2], "weight_decay": [0.01, 0.1], "budget": 3}, "unknown [tune] key(s) budget"),
    ({"lr": [1e-3, 1e-2], "weight_decay": [0.01, 0.1], "holdout": 0.01}, "holdout = 0.01"),
])
def test_a_bad_search_is_one_line_naming_it(space, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tn.check_space(space, "my.toml")


def score(cfg) -> float:
    """Holdout top-1 as the fake trainer reports it: ConvMixer improves with the learning rate all the way
    (its optimum lies beyond the range: widened twice), ResNet-9 peaks inside the range."""
    x = math.log10(cfg.train.lr)
    if cfg.model.name == "convmixer_256_8":
        return 0.5 + 0.1 * x + 0.01 * cfg.train.seed
    return 0.8 - (x + 2.5) ** 2 - 0.01 * cfg.train.seed


def test_every_family_gets_the_same_search_and_a_choice(tmp_path, capsys):
    (tmp_path / "search.toml").write_text(SEARCH)
    config = load_recipe(tmp_path / "search.toml")
    changes = {"data": {"source": str(image_folder(tmp_path / "images")), "cache_dir": str(tmp_path / "cache"),
                        "prepare_size": 16, "img_size": 16}, "train": {"device": "cpu"}}
    seen = []

    def work(cfg, out):
        seen.append(cfg)
        fx.write_run(out, model=cfg.model.name, seed=cfg.train.seed, val_top1=[0.1, score(cfg)])

    models = ["convmixer_256_8", "resnet9"]
    result = tn.tune(models, tmp_path / "study", config=config, changes=changes, progress=False, work=work)
    t = json.loads((tmp_path / "study" / "study.json").read_text())["tune"]
    count = {m: sum(e["model"] == m for e in t["trials"].values()) for m in models}
    assert count == {"convmixer_256_8": 8 + 4 + 4 + 2, "resnet9": 8 + 4 + 4 + 2}  # equal effort
    assert len(seen) == sum(count.values()) and len(result.outcome["trained"]) == len(seen)
    # ConvMixer's best lr sat at the top edge twice: its lr range grew twice, by half its log-width each time
    conv = t["ranges"]["convmixer_256_8"]
    assert [v for r in conv for v in r["lr"]] == pytest.approx([1e-3, 1e-2, 1e-3, 1e-2 * 10**0.5, 1e-3, 1e-2 * 10**1.25])
    assert t["ranges"]["resnet9"][0]["lr"] == t["ranges"]["resnet9"][-1]["lr"]
    # the same Sobol points for both families (in each one's own ranges), patch sizes only for ConvMixer
    first = {m: [e for e in t["trials"].values() if e["model"] == m and e["round"] == 1 and e["seed"] == 0]
             for m in models}
    assert [e["lr"] for e in first["convmixer_256_8"]] == pytest.approx([e["lr"] for e in first["resnet9"]])
    assert [e["patch_size"] for e in first["convmixer_256_8"]] == [2, 4] * 4
    assert all("patch_size" not in e for e in first["resnet9"])
    # every trial trains on the holdout of train at the search's compute budget
    assert {(c.data.holdout, c.data.holdout_seed, c.train.compute_budget) for c in seen} == {(0.25, 3, 2e6)}
    # the best two seed-0 trials of each family ran again with seed 1, with the same values
    for m in models:
        again = [e for e in t["trials"].values() if e["model"] == m and e["seed"] == 1]
        zero = {e["trial"]: e for e in t["trials"].values() if e["model"] == m and e["seed"] == 0}
        assert len(again) == 2 and all(e["lr"] == zero[e["trial"]]["lr"] for e in again)
    choice = t["choice"]
    best_conv = max((e for e in t["trials"].values() if e["model"] == "convmixer_256_8"), key=lambda e: e["lr"])
    assert choice["convmixer_256_8"]["lr"] == best_conv["lr"] and "patch_size" in choice["convmixer_256_8"]
    assert abs(math.log10(choice["resnet9"]["lr"]) + 2.5) < 0.3 and "patch_size" not in choice["resnet9"]
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## Tuning" in report and "Choice: trial" in report
    # the same command again: nothing to train, the same choice
    seen.clear()
    again = tn.tune(models, tmp_path / "study", config=config, changes=changes, progress=False, work=work)
    assert seen == [] and again.meta["tune"]["choice"] == choice
    assert "[per_model.resnet9.train]" in tn.choice_toml(choice)


def test_tune_takes_its_models_from_a_config_file_without_a_preset(tmp_path):
    import argparse

    from patchbench.commands.compare import study_models

    (tmp_path / "c.toml").write_text('models = ["resnet9"]\n' + SEARCH.replace('preset = "smoke"\n', ""))
    inputs = {"preset": None, "config": load_recipe(tmp_path / "c.toml")}
    assert study_models(argparse.Namespace(models=None), inputs) == ["resnet9"]


def test_a_real_search_trains_on_the_holdout_at_the_budget(tmp_path, capsys):
    """Through train_run for real (seconds): two trials, the re-runs, a choice printed as recipe tables."""
    from patchbench.cli import main

    (tmp_path / "search.toml").write_text(SEARCH.replace("trials = 8", "trials = 2").replace('"2M"', '"20M"'))
    code = main(["tune", "--config", str(tmp_path / "search.toml"), "--models", "resnet9",
                 "--data", str(image_folder(tmp_path / "images", per_class=(8, 2))), "--cache-dir",
                 str(tmp_path / "cache"), "--prepare-size", "16", "--img-size", "16", "--batch-size", "4",
                 "--device", "cpu", "--out", str(tmp_path / "study"), "--no-progress", "--format", "md"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[per_model.resnet9.train]" in printed and "lr = " in printed
    runs = sorted(p.name for p in (tmp_path / "study" / "runs").iterdir())
    assert len(runs) >= 4 and all(name.startswith("resnet9-t") for name in runs)
    summary = json.loads((tmp_path / "study" / "runs" / runs[0] / "summary.json").read_text())
    one_step = summary["train_macs"] / summary["steps"]  # at one size: the closest whole number of steps
    assert summary["eval_split"] == "holdout" and abs(summary["train_macs"] - 20e6) <= one_step / 2


def test_a_shared_search_chooses_one_recipe_for_every_model(tmp_path):
    """shared = true: every trial is ranked by its mean over the models, so the widening, the re-runs and the
    choice are the same for all (here ResNet-9 peaks at lr 10^-2.5, ConvMixer keeps rising: the mean decides)."""
    (tmp_path / "search.toml").write_text(SEARCH.replace("patch_size = [2, 4]", "shared = true"))
    changes = {"data": {"source": str(image_folder(tmp_path / "images")), "cache_dir": str(tmp_path / "cache"),
                        "prepare_size": 16, "img_size": 16}, "train": {"device": "cpu"}}

    def work(cfg, out):
        fx.write_run(out, model=cfg.model.name, seed=cfg.train.seed, val_top1=[0.1, score(cfg)])

    models = ["convmixer_256_8", "resnet9"]
    tn.tune(models, tmp_path / "study", config=load_recipe(tmp_path / "search.toml"), changes=changes,
            progress=False, work=work)
    t = json.loads((tmp_path / "study" / "study.json").read_text())["tune"]
    assert t["ranges"]["convmixer_256_8"] == t["ranges"]["resnet9"]  # widened alike
    choice = t["choice"]
    assert choice["convmixer_256_8"]["lr"] == choice["resnet9"]["lr"]
    assert choice["convmixer_256_8"]["weight_decay"] == choice["resnet9"]["weight_decay"]
    # the chosen trial has the best mean over both models and both seeds among the re-run ones
    reruns = {e["trial"] for e in t["trials"].values() if e["seed"] == 1}
    assert len(reruns) == 2 and choice["resnet9"]["trial"] in reruns
    # the mean of the two curves, 0.65 + 0.05 x - 0.5 (x + 2.5)^2 with x = log10(lr), peaks at x = -2.45
    assert abs(math.log10(choice["resnet9"]["lr"]) + 2.45) < 0.3
    assert tn.choice_toml(choice, shared=True).startswith("[train]\nlr = ")  # one recipe, for every model
    with pytest.raises(UserError, match="shared = true chooses one learning rate"):
        tn.check_space({"lr": [1e-3, 1e-2], "weight_decay": [0.01, 0.1], "patch_size": [4], "shared": True}, "x")
