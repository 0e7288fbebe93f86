"""patchbench.cpu.memory.keep_freed_memory, the one malloc policy: a CPU train step's tensors reuse mapped pages (glibc
only), unless opted out."""

import os
import platform
import subprocess
import sys

import pytest

# page faults over 2 train steps (after 1 to warm up) of a 1-block notebook_convmixer, batch 16, fp32, 1 thread:
# with glibc's defaults, then (in the same process: the policy is process-wide) after keep_freed_memory()
STEPS = """
import resource, torch
from patchbench.bench import Settings, make_step
from patchbench.cpu.memory import keep_freed_memory
from patchbench.models import create_model
torch.set_num_threads(1)
step = make_step(create_model("notebook_convmixer", depth=1), Settings("fp32", False, False), mode="train",
                 batch_size=16, img_size=32, device=torch.device("cpu"), num_classes=10)

def faults():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory()
print(default, applied, faults())
"""


def faults(**env) -> list[float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PATCHBENCH_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", STEPS], check=True, capture_output=True, text=True,
                         env={**base, **env}).stdout.split()
    return [float(out[0]), out[1] == "True", float(out[2])]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_again_unless_opted_out():
    default, applied, kept = faults()
    # its activations are 16 MiB each (3,900 pages): glibc's defaults hand many back to the kernel every
    # step and fault them in again; kept, they are reused
    if default < 2000:  # e.g. transparent huge pages for every allocation: too few faults to compare
        pytest.skip(f"only {default:.0f} page faults with glibc's defaults here")
    assert applied and kept < default / 4
    _, applied, opted_out = faults(PATCHBENCH_MALLOC="default")
    assert not applied and opted_out > 2 * kept  # PATCHBENCH_MALLOC=default: the policy is not applied
