"""The accelerator path, on whatever device PATCHBENCH_TEST_DEVICE names (default: the CPU).

On the CPU these run the GPU code paths with CPU tensors (the split held "on the device", gather +
roi_align, mixed precision, evaluation and predict on the device); on a GPU machine
`PATCHBENCH_TEST_DEVICE=cuda pytest -m device` runs the same tests there (benchmarks/gpu_study.py does).
"""

import json
import os

import pytest
import torch
from test_data_loader import S, make_split, unnormalise
from test_train import make_image_folder, metrics, tiny_config

from patchbench.cli import main
from patchbench.config import DataConfig
from patchbench.data import Loader
from patchbench.train import train_run

DEVICE = os.environ.get("PATCHBENCH_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.device


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def test_held_split_batches_match_the_cpu_path_on_the_device():
    split = make_split(40)
    cfg = DataConfig(img_size=S, eval_crop=1.0)
    cpu = torch.cat([x for x, _ in Loader(split, cfg, batch_size=8, train=False, hold_on_device=False)])
    held = Loader(split, cfg, batch_size=8, train=False, device=DEVICE, hold_on_device=True)
    x = torch.cat([x for x, _ in held])
    assert x.device.type == torch.device(DEVICE).type and held._images is not None
    assert torch.allclose(unnormalise(x.cpu(), cfg), unnormalise(cpu, cfg), atol=1e-3)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_tiny_run_trains_on_the_device_with_mixed_precision(folder, tmp_path, amp):
    if amp == "fp16" and DEVICE == "cpu" and not hasattr(torch.amp, "GradScaler"):
        pytest.skip("no GradScaler for the CPU in this torch")
    cfg = tiny_config(folder, tmp_path, "resnet9", device=DEVICE, amp=amp, data_on_device="yes", epochs=2,
                      deterministic=False, threads=None, auto_augment="trivialaugment", mixup=0.2)
    summary = train_run(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "finished" and summary["device"].startswith(torch.device(DEVICE).type)
    assert all(r["train_loss"] == r["train_loss"] for r in metrics(tmp_path / "run"))  # finite, not NaN
    state = json.loads((tmp_path / "run" / "checkpoint" / "last.json").read_text())
    assert (state["scaler"] is not None) == (amp == "fp16")


def test_eval_and_predict_on_the_device(folder, tmp_path, capsys):
    cfg = tiny_config(folder, tmp_path, "resnet9", device=DEVICE, epochs=1)
    train_run(cfg, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--device", DEVICE, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 12 and 0 <= result["top1"] <= 1
    image = next((folder / "val").rglob("*.JPEG"))
    assert main(["predict", str(tmp_path / "run"), str(image), "--device", DEVICE, "--topk", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
