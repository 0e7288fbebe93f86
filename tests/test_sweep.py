"""sweep: grid parsing, planning, bad cells refused before training, and the report's heatmap."""

import json

import pytest
from test_compare import fake_work, ran, tiny_study

from patchbench import study as cp
from patchbench.cli import main
from patchbench.commands import parse
from patchbench.errors import UserError
from patchbench.recipes import get_preset


def test_parse_grid_values_and_errors():
    grid = parse.parse_grid("patch_size=2,4,8 kernel_size=3,5")
    assert cp.typed_grid("convmixer_256_8", grid) == {"patch_size": [2, 4, 8], "kernel_size": [3, 5]}
    grid = parse.parse_grid("activation=gelu,relu drop_rate=0.1")
    assert cp.typed_grid("convmixer_256_8", grid) == {"activation": ["gelu", "relu"], "drop_rate": [0.1]}
    for bad in ("", "patch_size", "patch_size=", "=2,4", "a=1 a=2"):
        with pytest.raises(UserError, match="--grid"):
            parse.parse_grid(bad)
    # values are typed by the model's signature, and a value that does not fit names the argument
    with pytest.raises(UserError, match=r"--grid patch_size 'two': need a whole number"):
        cp.typed_grid("convmixer_256_8", parse.parse_grid("patch_size=2,two"))
    with pytest.raises(UserError, match=r"--grid drop_rate 'none': need a finite number"):
        cp.typed_grid("convmixer_256_8", parse.parse_grid("drop_rate=none"))
    with pytest.raises(UserError, match="takes no argument 'no_such_arg'"):
        cp.typed_grid("convmixer_256_8", {"no_such_arg": ["1"]})


def test_plan_sweep_names_every_cell_and_seed():
    plan = cp.plan_sweep("convmixer_256_8", {"patch_size": [2, 4], "kernel_size": [3, 5]}, [0, 1],
                         cp.RecipeLayers(get_preset("smoke")))
    assert len(plan) == 8 and plan[0].name == "convmixer_256_8-patch_size=2-kernel_size=3-s0"
    assert plan[-1].name == "convmixer_256_8-patch_size=4-kernel_size=5-s1"
    assert plan[1].config.model.overrides == {"dim": 32, "depth": 2, "patch_size": 2, "kernel_size": 5}  # over the preset's


def test_bad_cells_are_refused_before_any_training(tmp_path):
    log = tmp_path / "log"
    with pytest.raises(UserError, match="does not build convmixer_256_8"):
        cp.sweep("convmixer_256_8", {"patch_size": [2, 32]}, [0], tmp_path / "s", **tiny_study(tmp_path),
                 progress=False, work=fake_work(log))
    with pytest.raises(UserError, match="takes no argument"):
        cp.sweep("convmixer_256_8", {"no_such_arg": [1]}, [0], tmp_path / "s", **tiny_study(tmp_path),
                 progress=False, work=fake_work(log))
    assert ran(log) == []


def test_sweep_study_gets_a_heatmap(tmp_path):
    study, log = tmp_path / "sweep", tmp_path / "log"
    grid = {"patch_size": [2, 4], "kernel_size": [3, 5]}
    result = cp.sweep("convmixer_256_8", grid, [0], study, **tiny_study(tmp_path), progress=False,
                      work=fake_work(log))
    assert len(result.outcome["trained"]) == 4 and len(ran(log)) == 4
    meta = json.loads((study / "study.json").read_text())
    assert meta["grid"] == grid and meta["kind"] == "sweep"
    assert (study / "figures" / "sweep.png").stat().st_size > 1000
    assert "Sweep: final top-1 over the grid" in (study / "report.md").read_text()
    again = cp.sweep("convmixer_256_8", grid, [0], study, **tiny_study(tmp_path), progress=False,
                     work=fake_work(log))
    assert again.outcome["trained"] == [] and len(ran(log)) == 4  # re-running does only what is missing


def test_cli_sweep_bad_grid_exits_2(tmp_path, capsys):
    assert main(["sweep", "--grid", "patch_size", "--model", "convmixer_256_8", "--preset", "smoke",
                 "--out", str(tmp_path)]) == 2
    assert "--grid item 'patch_size'" in capsys.readouterr().err
