"""patchbench.device.keep_freed_memory: a CPU train step's tensors reuse mapped pages (glibc only)."""

import platform
import subprocess
import sys

import pytest

import patchbench.train
from patchbench.train import train_run
from test_train import make_image_folder, tiny_config

# page faults over 5 train steps (after 3 to warm up) of a 2-block seed_convmixer, batch 16, fp32, 1 thread
STEPS = """
import resource, sys, torch
from patchbench.bench import Settings, make_step
from patchbench.device import keep_freed_memory
from patchbench.models import create_model
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
step = make_step(create_model("seed_convmixer", depth=2), Settings("fp32", False, False), mode="train",
                 batch_size=16, img_size=32, device=torch.device("cpu"), num_classes=10)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    faults = {mode: float(subprocess.run([sys.executable, "-c", STEPS, mode], check=True, capture_output=True,
                                         text=True).stdout) for mode in ("default", "keep")}
    # its activations are 16 MiB each (3,900 pages): glibc's defaults hand many back to the kernel every
    # step and fault them in again (~40,000 a step measured); kept, they are reused
    assert faults["default"] > 20000
    assert faults["keep"] < faults["default"] / 4


def test_training_on_the_cpu_keeps_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(patchbench.train, "keep_freed_memory", lambda: calls.append(1) or True)
    folder = make_image_folder(tmp_path / "images")
    train_run(tiny_config(folder, tmp_path / "cache", epochs=1), tmp_path / "run", progress=False)
    assert calls == [1]
