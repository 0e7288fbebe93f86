"""`patchbench models`: the table, JSON, and bad input (exit 2, one line, no traceback)."""

import json
import subprocess
import sys

import pytest

from patchbench.cli import main
from patchbench.models import list_models


def run(capsys, *argv):
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_lists_every_model_with_params_and_macs(capsys):
    code, out, err = run(capsys, "--img-size", "32")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "MACs @32px" in lines[0]
    for name in list_models():
        row = next(line for line in lines if line.startswith(name + " "))
        assert "n/a" not in row  # every model runs at 32px
    assert any(line.startswith("notebook_convmixer ") and "961,814" in line for line in lines)


def test_models_that_cannot_take_the_size_say_why(capsys):
    code, out, _ = run(capsys)  # default 160px
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("notebook_vit "))
    assert "811,146" in row and "n/a" in row and "fixed at 32px" in row


def test_json_matches_the_registry(capsys):
    code, out, _ = run(capsys, "--img-size", "160", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["img_size"] == 160
    rows = {r["model"]: r for r in data["models"]}
    assert sorted(rows) == list_models()
    assert rows["resnet18"]["params"] == 11_181_642
    assert rows["resnet18"]["macs"] > 0 and rows["resnet18"]["error"] is None
    assert rows["notebook_vit"]["macs"] is None and "32px" in rows["notebook_vit"]["error"]
    assert rows["notebook_resnet9"]["params"] == 1_647_242 and rows["notebook_resnet9"]["macs"] > 0
    assert rows["vit_tiny_6l8h"]["default_img_size"] == 160


def test_vits_are_built_for_the_size_asked_for(capsys):
    params = {}
    for size in (32, 160):
        _, out, _ = run(capsys, "vit_tiny_6l8h", "--img-size", str(size), "--json")
        params[size] = json.loads(out)["models"][0]["params"]
    assert params[160] - params[32] == (100 - 4) * 128  # position embeddings: 10x10 vs 2x2 patches


def test_macs_scale_with_the_image_area(capsys):
    macs = {}
    for size in (64, 128):
        _, out, _ = run(capsys, "resnet18", "--img-size", str(size), "--json")
        macs[size] = json.loads(out)["models"][0]["macs"]
    assert macs[128] / macs[64] == pytest.approx(4, rel=0.05)


def test_names_select_models(capsys):
    code, out, _ = run(capsys, "resnet9", "notebook_vit", "--img-size", "32", "--json")
    assert code == 0
    assert [r["model"] for r in json.loads(out)["models"]] == ["resnet9", "notebook_vit"]


@pytest.mark.parametrize("size", ["0", "-5", "100000", "abc", "3.5"])
def test_nonsense_sizes_exit_2_with_one_line(capsys, size):
    code, out, err = run(capsys, f"--img-size={size}")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--img-size" in err and size in err


def test_unknown_model_exits_2_and_suggests(capsys):
    code, _, err = run(capsys, "vit_tiny", "--img-size", "32")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "'vit_tiny'" in err and "vit_tiny_6l8h" in err


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback():
    # `patchbench models | head -1`: the reader goes away before patchbench writes.
    proc = subprocess.Popen([sys.executable, "-m", "patchbench", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"Exception ignored" not in err


@pytest.mark.parametrize("old, new", [("seed_convmixer", "notebook_convmixer"), ("seed_vit", "notebook_vit"),
                                      ("seed_resnet9", "notebook_resnet9")])
def test_the_notebooks_old_model_names_still_work_with_a_warning(old, new):
    from patchbench.models import create_model, list_models

    assert old not in list_models() and new in list_models()
    with pytest.warns(FutureWarning, match=f"the model '{old}' is now called '{new}'; the old name still works"):
        model = create_model(old, img_size=32)
    assert type(model) is type(create_model(new, img_size=32))


def test_the_old_preset_name_still_works_with_a_warning_and_old_runs_read_as_the_new_names(tmp_path):
    from patchbench.config import RunConfig
    from patchbench.recipes import build_config, get_preset

    with pytest.warns(FutureWarning, match="the preset 'seed' is now called 'notebook'"):
        assert get_preset("seed") is get_preset("notebook")
    with pytest.warns(FutureWarning, match="the model 'seed_vit' is now called 'notebook_vit'"):
        assert build_config("seed_vit", preset=get_preset("notebook")).model.name == "notebook_vit"
    # a run directory of the previous release: read as the current names, without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = RunConfig.from_dict({"model": {"name": "seed_convmixer", "overrides": {}}, "preset": "seed"})
    assert (cfg.model.name, cfg.preset) == ("notebook_convmixer", "notebook")
