"""Compute budgets: the steps a budget buys (hand-computed sums, progressive resizing included), every
`fair` family within ±2% of 5T-40T, and a real budgeted run: its schedule, its partial last epoch, its
record, and an exact resume inside that last epoch."""

import json

import pytest
from test_train import assert_same_run, folder, interrupt_at_step, metrics, tiny_config  # noqa: F401 (a fixture)

import patchbench.train as train_mod
from patchbench import study as cp
from patchbench.cli import main
from patchbench.compute import plan_steps
from patchbench.errors import UserError
from patchbench.optim import lr_at
from patchbench.recipes import build_config, get_preset
from patchbench.train import check_sizes, train_run


def test_epochs_run_whole_epochs_at_the_split_sizes():
    plan = plan_steps(budget=None, epochs=6, steps_per_epoch=10, batch_size=4, train_sizes=(16, 32, 48),
                      img_size=48, macs_at={16: 1, 32: 4, 48: 9})
    assert plan.steps == 60 and plan.phases == ((20, 16), (40, 32), (60, 48))  # sizes change between epochs
    assert plan.train_macs == 3 * 4 * 10 * (1 + 1 + 4 + 4 + 9 + 9)  # 3 x MACs x images, by hand
    assert [plan.steps_in(e) for e in range(6)] == [10] * 6 and plan.steps_in(6) == 0
    assert plan.segments(2) == [(0, 10, 32)]


def test_a_budget_buys_the_closest_step_count_and_cuts_the_last_epoch():
    # one size: a step costs 3 x 1000 x 8 = 24,000 MACs; 1,000,000 buys 41.67 -> 42 steps = 4 epochs of 10 + 2
    plan = plan_steps(budget=1e6, epochs=None, steps_per_epoch=10, batch_size=8, train_sizes=(), img_size=32,
                      macs_at={32: 1000})
    assert (plan.steps, plan.epochs, plan.steps_in(4), plan.segments(4)) == (42, 5, 2, [(0, 2, 32)])
    assert plan.train_macs == 42 * 24_000
    # progressive over the steps: 16px then 32px (MACs 1 and 4 per image: a step costs 3 and 12 at batch 1).
    # 39 steps = 20 at 16px + 19 at 32px = 60 + 228 = 288 MACs; 38 steps would cost 285, 40 steps 300
    plan = plan_steps(budget=288, epochs=None, steps_per_epoch=15, batch_size=1, train_sizes=(16, 32),
                      img_size=32, macs_at={16: 1, 32: 4})
    assert plan.steps == 39 and plan.phases == ((20, 16), (39, 32)) and plan.train_macs == 288
    assert plan.segments(1) == [(0, 5, 16), (5, 15, 32)]  # the size changes inside epoch 2
    assert plan.segments(2) == [(0, 9, 32)] and plan.epochs == 3


@pytest.mark.parametrize("budget", [5e12, 10e12, 20e12, 40e12])
def test_every_fair_family_spends_the_budget_within_two_percent(budget):
    preset = get_preset("fair")
    steps_per_epoch = 9469 // 64  # Imagenette-160's train split in batches of 64
    for model in preset.models:
        overrides, _ = cp.match_budget(model, 1_000_000, num_classes=10, img_size=128,
                                       base=preset.model_overrides(model))
        cfg = build_config(model, preset=preset, overrides=overrides,
                           changes={"train": {"compute_budget": budget}})
        plan = train_mod.plan_run(cfg, steps_per_epoch, check_sizes(cfg, 10))
        assert abs(plan.train_macs - budget) <= 0.02 * budget, (model, plan)
        assert [size for _, size in plan.phases] == [96, 112, 128]  # progressive resizing kept


def test_budget_flags_parse_and_exclude_epochs(capsys, tmp_path):
    assert main(["train", "--preset", "fair", "--model", "resnet18", "--compute-budget", "40T", "--dump-config"]) == 0
    assert "compute_budget = 40000000000000.0" in capsys.readouterr().out
    code = main(["train", "--model", "resnet18", "--compute-budget", "40T", "--epochs", "3", "--out", str(tmp_path)])
    assert code == 2 and "--epochs and --compute-budget both given" in capsys.readouterr().err
    code = main(["train", "--model", "resnet18", "--compute-budget", "40Q", "--out", str(tmp_path)])
    assert code == 2 and "--compute-budget '40Q': need a positive number with an optional SI suffix" in \
        capsys.readouterr().err
    # a later layer's --epochs replaces a recipe's budget
    cfg = build_config("resnet18", changes={"train": {"compute_budget": 4e13}})
    assert build_config("resnet18", config=None, changes={"train": {"epochs": 3}}).train.compute_budget is None
    assert cfg.train.compute_budget == 4e13
    with pytest.raises(UserError, match="--schedule-epochs and --compute-budget"):
        build_config("resnet18", changes={"train": {"compute_budget": 4e13, "schedule_epochs": 9}}).validate()


def budget_config(folder, tmp_path, steps: int):  # noqa: F811
    """A tiny resnet9 run (3 steps an epoch; the first half of the steps at 16px, the rest at 32px) given
    the budget of `steps` steps' compute."""
    cfg = tiny_config(folder, tmp_path, "resnet9", train_sizes=(16, 32), epochs=1)
    macs = check_sizes(cfg, 3)
    small = (steps + 1) // 2
    cfg.train.compute_budget = float(3 * 8 * (small * macs[16] + (steps - small) * macs[32]))
    return cfg, macs


def test_a_budgeted_run_spends_its_budget_and_records_it(folder, tmp_path):  # noqa: F811
    cfg, macs = budget_config(folder, tmp_path, steps=7)  # epochs of 3, 3 and 1 steps: 4 at 16px, 3 at 32px
    summary = train_run(cfg, tmp_path / "run", progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [3, 6, 7] and [r["img_size"] for r in rows] == [16, 32, 32]  # at the end
    assert summary["steps"] == 7 and summary["epochs"] == 3 and summary["images_seen"] == 56
    assert summary["budget_macs"] == cfg.train.compute_budget == summary["train_macs"] == rows[-1]["train_macs"]
    assert rows[0]["train_macs"] == 3 * 8 * 3 * macs[16]
    derived = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    assert derived["schedule_steps"] == derived["steps"] == 7 and derived["size_phases"] == [[4, 16], [7, 32]]
    assert rows[-1]["lr"] == lr_at(6, 7, cfg.train)[0] < 0.01 * cfg.train.lr  # the schedule spans exactly the 7 steps


def test_a_budgeted_run_resumes_exactly_inside_its_cut_last_epoch(folder, tmp_path, monkeypatch):  # noqa: F811
    cfg, _ = budget_config(folder, tmp_path, steps=8)  # epochs of 3, 3 and 2 steps
    train_run(cfg, tmp_path / "full", progress=False)
    state = interrupt_at_step(cfg, tmp_path / "cut", 6, monkeypatch)  # the last epoch's first batch
    assert (state["epoch"], state["batch"], state["step"]) == (2, 1, 7)
    train_run(cfg, tmp_path / "cut", resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_compare_plan_prints_steps_compute_and_time_and_writes_nothing(tmp_path, capsys):
    from test_compare import image_folder

    out = tmp_path / "study"
    code = main(["compare", "--preset", "smoke", "--models", "resnet9,convmixer_256_8", "--seeds", "0",
                 "--data", str(image_folder(tmp_path / "images")), "--cache-dir", str(tmp_path / "cache"),
                 "--prepare-size", "16", "--img-size", "16", "--batch-size", "2", "--device", "cpu",
                 "--compute-budget", "400M", "--plan", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith(("| resnet9-s0", "| convmixer_256_8-s0"))]
    assert len(rows) == 2
    for row in rows:
        assert abs(float(row[4].rstrip("%")) - 100) <= 2  # each run spends the budget within 2%
        assert row[-1].endswith("min |")
    assert int(rows[0][1].replace(",", "")) != int(rows[1][1].replace(",", ""))  # other costs, other step counts
    assert "total estimated training time" in printed and not out.exists()
