"""Settings resolved for the machine at hand: amp=auto by the hardware's native bf16, layout and kernels
by a measured probe (injected timings here), cached per machine and software, never from a busy probe;
a study keeps its precision when resumed on another CPU."""

import json
import subprocess
import sys
import time

import pytest
import torch
from test_compare import fake_work, tiny_study

import patchbench
from patchbench import autotune as at
from patchbench import device as dv
from patchbench import study as cp
from patchbench.config import Switch
from patchbench.errors import UserError
from patchbench.models import create_model
from patchbench.recipes import get_preset
from patchbench.values import coerce

CPU = torch.device("cpu")
NCHW, CL, CL_K = at.Choice(False, False), at.Choice(True, False), at.Choice(True, True)


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 fma avx512f avx512bw", "none"),  # AVX-512 without its bf16 instructions
    ("fpu sse avx2 fma", "none"),
    ("fpu avx2 avx512f avx512_bf16", "bf16"),
    ("fpu avx2 amx_tile amx_bf16 avx512_bf16", "bf16"),
])
def test_amp_auto_is_bf16_only_where_the_cpu_computes_it_natively(flags, expected):
    amp, why = dv.resolve_amp("auto", CPU, flags=flags)
    assert amp == expected and why.startswith("auto")
    assert dv.resolve_amp("bf16", CPU, flags="fpu avx2") == ("bf16", "given")  # explicit values are honoured
    assert dv.resolve_amp("none", CPU, flags="amx_bf16") == ("none", "given")


def test_switch_values_parse_from_flags_and_files():
    assert [coerce(t, Switch, "--channels-last") for t in ("auto", "true", "off")] == ["auto", True, False]
    with pytest.raises(UserError, match="--channels-last 'maybe': need true or false or auto"):
        coerce("maybe", Switch, "--channels-last")


def test_candidates_offer_both_values_only_for_auto():
    assert at.candidates("auto", "auto", kernels_apply=True) == [NCHW, at.Choice(False, True), CL, CL_K]
    assert at.candidates("auto", "auto", kernels_apply=False) == [NCHW, CL]  # e.g. a ViT: no kernel fits
    assert at.candidates(True, "auto", kernels_apply=True) == [CL, CL_K]
    assert at.candidates(False, False, kernels_apply=True) == [NCHW]


class FakeMeasure:
    """Stands in for timing steps: returns the given step times (and load) and counts its calls."""

    def __init__(self, times: dict, load: float = 0.0):
        self.times, self.load, self.calls = times, load, 0

    def __call__(self, options):
        self.calls += 1
        return {o: self.times[o] for o in options}, [], self.load


def key(**changes):
    return {"cpu": "Some CPU", "flags": "f1", "torch": "2.14.1", "patchbench": "0.2.0", "threads": 2,
            "model": "resnet18", "batch_size": 64, "img_size": 128, "amp": "none", **changes}


def test_probe_follows_the_timings_in_both_directions(tmp_path):
    fast_cl = FakeMeasure({NCHW: 2.0, CL: 0.5})
    assert at.choose(key(), [NCHW, CL], fast_cl, tmp_path).choice == CL
    fast_nchw = FakeMeasure({NCHW: 0.5, CL: 2.0})
    got = at.choose(key(model="convmixer"), [NCHW, CL], fast_nchw, tmp_path)
    assert got.choice == NCHW and got.how == "probed" and got.step_s == {str(NCHW): 0.5, str(CL): 2.0}


@pytest.mark.parametrize("changed", [{"cpu": "Another CPU"}, {"flags": "f2"}, {"torch": "2.15.0"},
                                     {"patchbench": "0.3.0"}, {"threads": 1}, {"batch_size": 32}])
def test_cached_per_machine_and_software_a_change_probes_again(tmp_path, changed):
    measure = FakeMeasure({NCHW: 2.0, CL: 0.5})
    assert at.choose(key(), [NCHW, CL], measure, tmp_path).how == "probed"
    again = at.choose(key(), [NCHW, CL], FakeMeasure({NCHW: 0.1, CL: 9.0}), tmp_path)
    assert again.how == "cached" and again.choice == CL  # the cache answers: no new timing
    other = FakeMeasure({NCHW: 0.1, CL: 9.0})
    assert at.choose(key(**changed), [NCHW, CL], other, tmp_path).choice == NCHW and other.calls == 1
    assert len(list((tmp_path / "probes").iterdir())) == 2


def test_a_probe_taken_on_a_busy_machine_is_used_but_not_cached(tmp_path):
    busy = FakeMeasure({NCHW: 2.0, CL: 0.5}, load=1.0)
    got = at.choose(key(), [NCHW, CL], busy, tmp_path)
    assert got.choice == CL and "not cached" in got.how
    assert not (tmp_path / "probes").exists()
    quiet = FakeMeasure({NCHW: 0.5, CL: 2.0})
    assert at.choose(key(), [NCHW, CL], quiet, tmp_path).choice == NCHW and quiet.calls == 1


def test_explicit_settings_are_not_probed(tmp_path):
    never = FakeMeasure({})
    got = at.choose(key(), at.candidates(True, False, kernels_apply=True), never, tmp_path)
    assert got.choice == CL and got.how == "given" and never.calls == 0


def tiny_resnet():
    return create_model("resnet9", num_classes=3, img_size=16, width=4)


def test_real_probe_times_the_model_caches_it_and_leaves_the_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(at, "BUSY", float("inf"))  # whatever else this machine runs, cache it
    args = {"channels_last": "auto", "fast_kernels": "auto", "device": CPU, "batch_size": 4, "img_size": 16, "amp": "none",
                "num_classes": 3, "setting": {"model": "resnet9", "width": 4}, "cache_dir": tmp_path}
    torch.manual_seed(0)
    first = at.resolve(tiny_resnet, **args)
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_probe, torch.rand(3))  # the probe drew from a forked RNG
    # both layouts were tried (no kernel fits a ResNet): timed, or dropped after a first step over the cap
    assert first.how == "probed" and set(first.step_s) | set(first.dropped) == {str(NCHW), str(CL)}
    assert first.choice == min((c for c in (NCHW, CL) if str(c) in first.step_s), key=lambda c: first.step_s[str(c)])
    assert first.machine["patchbench"] == patchbench.__version__ and first.machine["torch"] == torch.__version__
    second = at.resolve(tiny_resnet, **args)
    assert second.how == "cached" and second.choice == first.choice
    # a run resumed on the same machine keeps what it recorded; on another CPU it is decided again
    recorded = {**at.Resolution(CL, "probed", machine=first.machine).record()}
    assert at.resolve(tiny_resnet, **args, recorded=recorded).how == "as recorded for this machine"
    recorded["machine"] = {**first.machine, "cpu": "Another CPU"}
    assert at.resolve(tiny_resnet, **args, recorded=recorded).how == "cached"


def test_deterministic_runs_are_not_decided_by_a_timing(tmp_path):
    got = at.resolve(tiny_resnet, channels_last="auto", fast_kernels="auto", device=CPU, batch_size=4, img_size=16,
                     amp="none", num_classes=3, setting={}, cache_dir=tmp_path, deterministic=True)
    assert got.choice == NCHW and got.how.startswith("deterministic") and not (tmp_path / "probes").exists()


def test_other_load_counts_other_processes_not_our_own_work():
    with at.OtherLoad() as quiet:
        sum(i * i for i in range(2_000_000))  # our own work is not "other" load
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with at.OtherLoad() as busy:
            time.sleep(1.0)
    finally:
        spin.kill()
    assert busy.cores > quiet.cores + 0.6  # one spinning process: about one more core


def test_study_precision_is_resolved_once_and_kept_on_another_cpu(tmp_path, monkeypatch):
    study, log = tmp_path / "study", tmp_path / "log"
    kw = tiny_study(tmp_path)
    kw["preset"] = get_preset("fair")
    kw["changes"]["train"].update(epochs=1, batch_size=4)
    kw["changes"]["data"].update(train_sizes=[])
    monkeypatch.setattr(dv, "cpu_features", lambda: "fpu avx2 avx512_bf16")
    cp.compare(["resnet9"], [0], study, **kw, progress=False, work=fake_work(log), report_formats=())
    meta = json.loads((study / "study.json").read_text())
    assert meta["amp"] == "bf16" and meta["amp_rule"].startswith("auto: native bf16")
    monkeypatch.setattr(dv, "cpu_features", lambda: "fpu avx2")  # the study goes on on a CPU without bf16
    seen = []

    def work(cfg, out):
        seen.append(cfg.train.amp)
        fake_work(log)(cfg, out)

    cp.compare(["resnet9"], [0, 1], study, **kw, progress=False, work=work, report_formats=())
    assert seen == ["bf16"] and json.loads((study / "study.json").read_text())["amp"] == "bf16"
    kw["changes"]["train"]["amp"] = "none"
    with pytest.raises(UserError, match="one precision"):
        cp.compare(["resnet9"], [0, 2], study, **kw, progress=False, work=work, report_formats=())
