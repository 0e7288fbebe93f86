"""patchbench.cpu.memory.keep_freed_memory, the one malloc policy: a CPU train step's tensors reuse mapped pages (glibc
only), unless opted out."""

import os
import platform
import subprocess
import sys

import pytest

# page faults over 5 train steps (after 3 to warm up) of a 2-block notebook_convmixer, batch 16, fp32, 1 thread
STEPS = """
import resource, sys, torch
from patchbench.bench import Settings, make_step
from patchbench.cpu.memory import keep_freed_memory
from patchbench.models import create_model
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.set_num_threads(1)
step = make_step(create_model("notebook_convmixer", depth=2), Settings("fp32", False, False), mode="train",
                 batch_size=16, img_size=32, device=torch.device("cpu"), num_classes=10)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env) -> float:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PATCHBENCH_MALLOC"))}
    return float(subprocess.run([sys.executable, "-c", STEPS, mode], check=True, capture_output=True, text=True,
                                env={**base, **env}).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_again_unless_opted_out():
    default, kept, opted_out = faults("default"), faults("keep"), faults("keep", PATCHBENCH_MALLOC="default")
    # its activations are 16 MiB each (3,900 pages): glibc's defaults hand many back to the kernel every
    # step and fault them in again (~40,000 a step measured); kept, they are reused
    assert default > 20000
    assert kept < default / 4
    assert opted_out > 20000  # PATCHBENCH_MALLOC=default: the policy is not applied
