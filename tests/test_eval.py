"""`patchbench eval` and `patchbench predict` on a run trained on a generated folder."""

import json
import shutil

import pytest
from test_train import make_image_folder, tiny_config

from patchbench.cli import main
from patchbench.evaluate import evaluate_run, predict
from patchbench.train import train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    folder = make_image_folder(tmp / "images")
    out = tmp / "run"
    train_run(tiny_config(folder, tmp / "cache", "resnet9", epochs=3, lr=1e-2, deterministic=False), out,
              progress=False)
    return out, folder


def test_eval_is_deterministic_and_matches_the_run(run):
    out, folder = run
    a = evaluate_run(out, device="cpu", progress=False)
    b = evaluate_run(out / "checkpoint" / "last.safetensors", str(folder), device="cpu", batch_size=5, progress=False)
    saved = json.loads((out / "eval.json").read_text())
    assert a["classes"] == ["n00", "n01", "n02"] and a["images"] == 12
    assert a["confusion"] == b["confusion"] == saved["confusion"]
    assert a["top1"] == b["top1"] == saved["top1"]
    assert a["loss"] == pytest.approx(saved["loss"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert a["per_class_top1"] == [row[i] / sum(row) for i, row in enumerate(a["confusion"])]
    assert a["top5"] == 1.0  # 3 classes


def test_eval_cli(run, capsys, tmp_path):
    out, _ = run
    assert main(["eval", str(out), "--device", "cpu", "--output", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "n02" in text
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 12
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_predict_needs_only_the_checkpoint(run, tmp_path, capsys):
    out, folder = run
    moved = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint", moved)  # no config.json, no dataset cache beside it
    images = [str(p) for p in sorted((folder / "val").glob("*/img0.JPEG"))]
    results = predict(moved / "last.json", images, topk=2)
    assert [len(r["top"]) for r in results] == [2, 2, 2]
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    ev = json.loads((out / "eval.json").read_text())
    # agrees with eval on those images' predicted classes where eval was right about every image of a class
    for r, cls, acc in zip(results, ev["classes"], ev["per_class_top1"]):
        if acc == 1.0:
            assert r["top"][0]["class"] == cls
    assert main(["predict", str(moved / "last.safetensors"), images[0], "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 4 and lines[1].strip().endswith(("n00", "n01", "n02"))
    assert main(["predict", str(moved), str(tmp_path / "none.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.jpg").write_text("not an image")
    assert main(["predict", str(moved), str(tmp_path / "junk.jpg")]) == 2
    assert "cannot read it as an RGB image" in capsys.readouterr().err
