"""A training process killed inside a checkpoint write, at every step of it, always resumes to the same
final weights as a run that was never stopped.

`checkpoint.on_event` is called before each file operation of a save (write the weights, rename them,
write the state, rename it, write the manifest, the committing rename, sync the folder, link, clean).
A forked child trains a tiny run (deterministic, one thread) and ends itself with os._exit, as kill -9
would (no cleanup, no finally), just before the n-th occurrence of one operation; another child then
resumes the run to its end. Every operation gets at least five stops (at different saves: epochs,
`last` and `best`), and every resume must give the uninterrupted run's weights bit for bit.
"""

import os
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train import folder, tiny_config  # noqa: F401 (a fixture)

from patchbench import checkpoint as ck
from patchbench.train import train_run

STOPS_PER_EVENT = 5
KILLED = 9


def in_child(fn, timeout: float = 120.0) -> int:
    """Run `fn` in a forked child; its exit code (fn's own os._exit, or 0 / 1 when it returns / raises)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except BaseException:  # noqa: BLE001 -- a forked child must end here, whatever fn raised
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish in {timeout:.0f} s")
        time.sleep(0.01)


def train_until(cfg, out, event: str | None = None, nth: int = 0):
    def run():
        if event is not None:
            seen = [0]

            def hook(name):
                if name == event:
                    seen[0] += 1
                    if seen[0] == nth:
                        os._exit(KILLED)  # no cleanup: as kill -9 leaves it
            ck.on_event = hook
        train_run(cfg, out, resume=True, progress=False)
    return run


def test_a_run_killed_at_the_committing_rename_resumes_to_the_same_weights(folder, tmp_path):  # noqa: F811
    """The fast tier's check: one stop, at the rename that commits the first checkpoint."""
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=2)
    assert in_child(train_until(cfg, tmp_path / "full")) == 0
    assert in_child(train_until(cfg, tmp_path / "cut", "commit", 1)) == KILLED
    assert in_child(train_until(cfg, tmp_path / "cut")) == 0
    want, got = (load_file(str(d / "checkpoint" / "last.safetensors")) for d in (tmp_path / "full", tmp_path / "cut"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_run_killed_at_any_step_of_a_checkpoint_write_resumes_to_the_same_weights(folder, tmp_path):  # noqa: F811
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=4)  # 4 epochs: >= 5 saves (4 `last`, >= 1 `best`)
    assert in_child(train_until(cfg, tmp_path / "full")) == 0
    want = load_file(str(tmp_path / "full" / "checkpoint" / "last.safetensors"))
    stops = {event: 0 for event in ck.EVENTS}
    exact = {event: 0 for event in ck.EVENTS}
    for event in ck.EVENTS:
        for nth in range(1, STOPS_PER_EVENT + 1):
            out = tmp_path / f"{event.replace(' ', '-')}-{nth}"
            code = in_child(train_until(cfg, out, event, nth))
            assert code == KILLED, f"the run ended ({code}) before the {nth}th '{event}'"
            stops[event] += 1
            assert in_child(train_until(cfg, out)) == 0, f"stopped before the {nth}th '{event}', it did not resume"
            got = load_file(str(out / "checkpoint" / "last.safetensors"))
            exact[event] += all(torch.equal(got[k], want[k]) for k in want)
            assert not list((out / "checkpoint").glob(".*.tmp-*")), "a temporary file was left behind"
    print("stops before each operation of a save, and how many resumed to the same weights:")
    for event in ck.EVENTS:
        print(f"  {event:16s} {stops[event]} stops, {exact[event]} exact")
    assert stops == {e: STOPS_PER_EVENT for e in ck.EVENTS} and exact == stops, (stops, exact)
