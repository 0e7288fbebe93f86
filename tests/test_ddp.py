"""Data-parallel training with torchrun on CPU (gloo): 2 processes == 1 process with the same global batch,
and a checkpoint written by 2 processes resumes in 1."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_image_folder

from patchbench.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

CRASH_AFTER_EPOCH_1 = """
import sys
import patchbench.train as train
real, calls = train.evaluate_model, []
def crash_in_second_validation(*a, **k):
    if k.get("confusion", True):  # the val split's scoring, not the training subset's
        calls.append(1)
    if len(calls) == 2:
        raise SystemExit(3)
    return real(*a, **k)
train.evaluate_model = crash_in_second_validation
from patchbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(folder, cache, out):
    return ["train", "--model", "vit_tiny_6l8h", "--data", str(folder), "--cache-dir", str(cache),
            "--model-arg", "dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2",
            "--model-arg", "mlp_dim=64", "--model-arg", "patch_size=8",
            "--prepare-size", "32", "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--lr", "3e-3",
            "--log-every", "1", "--deterministic", "--device", "cpu", "--threads", "1", "--no-progress",
            "--out", str(out)]


def torchrun(nproc, *argv, script=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = [str(script)] if script else ["-m", "patchbench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + target + list(argv), check=False, capture_output=True, text=True, env=env, timeout=300)


def assert_close_weights(a, b, atol):
    """Equal within float rounding. The key third of each qkv bias is the exception: softmax ignores a
    bias added to every key, so its gradient is zero up to rounding noise, which Adam rescales to
    lr-sized steps; it gets a looser bound (it has no effect on the outputs)."""
    wa, wb = (load_file(str(d / "checkpoint" / "last.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("qkv.bias"):
            dim = len(x) // 3
            torch.testing.assert_close(x[dim:2 * dim], y[dim:2 * dim], rtol=0, atol=1e-3, msg=k)
            x, y = torch.cat([x[:dim], x[2 * dim:]]), torch.cat([y[:dim], y[2 * dim:]])
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_another_world_size(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    assert main(train_args(folder, cache, one)) == 0

    r = torchrun(2, *train_args(folder, cache, two))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["env"]["world_size"] == 2 and cfg["derived"]["per_rank_batch_size"] == 4
    assert_close_weights(one, two, atol=1e-5)
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_top1"] == b["val_top1"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)

    # written by 2 processes after epoch 1 (then a crash), resumed and finished by 1
    script = tmp_path / "crash.py"
    script.write_text(CRASH_AFTER_EPOCH_1)
    r = torchrun(2, *train_args(folder, cache, cut), script=script)
    assert r.returncode != 0
    assert json.loads((cut / "checkpoint" / "last.json").read_text())["world_size"] == 2
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert_close_weights(one, cut, atol=1e-5)
    assert json.loads((cut / "summary.json").read_text())["status"] == "finished"


def test_global_batch_must_split_over_the_processes(tmp_path):
    folder = make_image_folder(tmp_path / "images", train=4, val=2)
    args = train_args(folder, tmp_path / "cache", tmp_path / "run")
    args[args.index("--batch-size") + 1] = "7"
    r = torchrun(2, *args)
    assert r.returncode != 0
    assert "--batch-size 7 (global) does not split over 2 processes" in r.stderr
