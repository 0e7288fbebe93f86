"""compare: parsing, matched budgets, planning, skip/resume, run locks (also across processes), and a
tiny real study through train_run and the report."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import runfixtures as fx
from PIL import Image

from patchbench import rundir
from patchbench import study as cp
from patchbench.cli import main
from patchbench.commands import parse
from patchbench.errors import UserError
from patchbench.recipes import get_preset
from patchbench.study import budget as sb
from patchbench.train import TrainingDiverged

# ----------------------------------------------------------------------------- parsing


def test_parse_budget_seeds_and_names():
    assert parse.parse_budget("1.0M") == 1_000_000 and parse.parse_budget("800k") == 800_000
    assert parse.parse_budget("1500000") == 1_500_000
    for bad in ("", "1.0X", "-1M", "0", "M"):
        with pytest.raises(UserError, match="--param-budget"):
            parse.parse_budget(bad)
    assert parse.parse_seeds("0, 1,2,1") == [0, 1, 2]
    with pytest.raises(UserError, match="--seeds"):
        parse.parse_seeds("0,a")
    with pytest.raises(UserError, match="--seeds"):
        parse.parse_seeds("-1")
    assert parse.parse_names("a,b,,a", "--models") == ["a", "b"]


# ----------------------------------------------------------------------------- matched budgets


@pytest.mark.parametrize("model", ["convmixer_256_8", "vit_tiny_6l8h", "resnet9", "resnet18"])
def test_match_budget_within_five_percent(model):
    overrides, params = cp.match_budget(model, 1_000_000, num_classes=10, img_size=64)
    assert abs(params - 1_000_000) <= 50_000
    assert cp.model_params(model, num_classes=10, img_size=64, **overrides) == params
    knob = "width" if model.startswith("resnet") else "dim"
    assert knob in overrides


@pytest.mark.parametrize("budget, tolerance, expected", [
    (100_000, 0.045, 96),  # 96..104 fit: a multiple of 16 beats the closest (100) and a multiple of 8 (104)
    (105_000, 0.02, 104),  # 103..107 fit: no multiple of 16, a multiple of 8 beats the closest (105)
    (100_000, 0.015, 100),  # 99..101 fit: none aligned, the closest
])
def test_budget_matching_prefers_widths_the_hardware_likes(budget, tolerance, expected):
    count = lambda w: 1000 * w
    closest = sb._closest(count, budget, 64, 1 << 14)
    assert sb._aligned(count, budget, closest, tolerance, channels=lambda w: w) == expected


def test_a_model_already_within_the_budget_is_kept_as_designed():
    """ConvMixer-256/12 has 996,362 parameters: at a 1.0M budget its width (256: whole vectors of 16
    channels for the C kernels) stays, rather than moving to the marginally closer dim=255."""
    assert cp.match_budget("convmixer_256_12", 1_000_000, num_classes=10, img_size=160) == ({}, 996_362)
    overrides, _ = cp.match_budget("convmixer_256_12", 1_100_000, num_classes=10, img_size=160)
    assert overrides["dim"] != 256


@pytest.mark.parametrize("budget", [1_000_000, 2_000_000, 20_000])
def test_vit_budget_keeps_heads_and_mlp_ratio_unless_too_coarse(budget):
    overrides, params = cp.match_budget("vit_tiny_6l8h", budget, num_classes=10, img_size=64)
    assert overrides["dim"] % 8 == 0 and abs(params - budget) <= 0.05 * budget
    if overrides["mlp_dim"] != 2 * overrides["dim"]:  # the model's 128 -> 256, kept when close enough
        keep = cp.model_params("vit_tiny_6l8h", num_classes=10, img_size=64,
                               dim=overrides["dim"], mlp_dim=2 * overrides["dim"])
        assert abs(keep - budget) > 0.05 * budget


def test_budget_that_no_width_reaches_is_refused():
    with pytest.raises(UserError, match="more than 5% from every resnet18: width=1 has"):
        cp.match_budget("resnet18", 1_000, num_classes=10, img_size=64)
    with pytest.raises(UserError, match="width=9 has 131,365, width=8 has 103,954 parameters"):  # steps of 26%
        cp.match_budget("resnet9", 120_000, num_classes=10, img_size=32, base={"width": 8})


# ----------------------------------------------------------------------------- planning


def test_plan_compare_is_seed_major_with_overrides_and_source():
    layers = cp.RecipeLayers(get_preset("quick"), changes={"data": {"source": "/data/x.tgz"}})
    plan = cp.plan_compare(["convmixer_256_8", "resnet9"], [0, 1], layers, chosen={"resnet9": {"width": 12}})
    assert [p.name for p in plan] == ["convmixer_256_8-s0", "resnet9-s0", "convmixer_256_8-s1", "resnet9-s1"]
    assert plan[1].config.model.overrides == {"width": 12} and plan[3].config.train.seed == 1
    assert all(p.config.data.source == "/data/x.tgz" for p in plan)
    assert plan[0].config.preset == "quick"


# ----------------------------------------------------------------------------- running a study


def fake_work(log: Path, sleep: float = 0.0):
    """Stands in for train_run: logs who ran what, then leaves a finished run directory."""
    def work(cfg, out):
        with open(log, "a") as f:
            f.write(f"{out.name} {os.getpid()}\n")
        time.sleep(sleep)
        fx.write_run(out, model=cfg.model.name, seed=cfg.train.seed, val_top1=[0.5, 0.6])
    return work


def ran(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def small_plan(n_seeds=2):
    return cp.plan_compare(["convmixer_256_8", "resnet9"], list(range(n_seeds)), cp.RecipeLayers(get_preset("smoke")))


def test_run_study_skips_finished_and_failed_and_resumes_the_rest(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    runs = study / "runs"
    fx.write_run(runs / "convmixer_256_8-s0", model="convmixer_256_8", seed=0, val_top1=[0.7])
    fx.write_run(runs / "resnet9-s0", model="resnet9", seed=0, val_top1=[0.1], status="failed")
    fx.write_run(runs / "convmixer_256_8-s1", model="convmixer_256_8", seed=1, val_top1=[0.3], epochs=2,
                 status="interrupted")
    out = cp.run_study(study, small_plan(), work=fake_work(log), progress=False)
    assert out == {"trained": ["convmixer_256_8-s1", "resnet9-s1"], "done": ["convmixer_256_8-s0"], "held": [],
                   "failed": ["resnet9-s0"], "stopped": []}
    assert ran(log) == ["convmixer_256_8-s1", "resnet9-s1"]
    again = cp.run_study(study, small_plan(), work=fake_work(log), progress=False)
    assert again["trained"] == [] and len(again["done"]) == 3 and ran(log) == ["convmixer_256_8-s1", "resnet9-s1"]
    assert list((study / "locks").iterdir()) == []  # every lock released


def test_run_held_by_a_live_worker_is_left_alone(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    other = cp.RunLock(study / "locks" / "resnet9-s0.lock")
    assert other.acquire()
    try:
        out = cp.run_study(study, small_plan(1), work=fake_work(log), progress=False)
    finally:
        other.release()
    assert out["held"] == ["resnet9-s0"] and ran(log) == ["convmixer_256_8-s0"]


@pytest.mark.parametrize("error, outcome, listed", [
    (TrainingDiverged("loss is nan"), "failed", "convmixer_256_8-s0"),  # diverged: recorded
    (UserError("checkpoint x is damaged"), "stopped", "convmixer_256_8-s0: checkpoint x is damaged"),  # cannot go on
])
def test_a_run_that_fails_or_cannot_go_on_is_listed_and_the_study_goes_on(tmp_path, error, outcome, listed):
    def work(cfg, out):
        if cfg.model.name == "convmixer_256_8":
            raise error
        fx.write_run(out, model=cfg.model.name, seed=0, val_top1=[0.5])

    out = cp.run_study(tmp_path, small_plan(1), work=work, progress=False)
    assert out[outcome] == [listed] and out["trained"] == ["resnet9-s0"]
    assert list((tmp_path / "locks").iterdir()) == []


def test_a_bug_stops_the_study_and_releases_the_lock(tmp_path):
    def work(cfg, out):
        raise RuntimeError("a bug of ours")

    with pytest.raises(RuntimeError):
        cp.run_study(tmp_path, small_plan(1), work=work, progress=False)
    assert list((tmp_path / "locks").iterdir()) == []


# ----------------------------------------------------------------------------- locks


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(path: Path, pid: int, host: str, age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "time": time.time() - age}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "r.lock"
    a, b = cp.RunLock(path), cp.RunLock(path)
    assert a.acquire() and not b.acquire()
    info, _ = a.holder()
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "time" in info
    a.release()
    assert not path.exists() and b.acquire()
    b.release()


def test_stale_locks_are_taken_over(tmp_path):
    host = socket.gethostname()
    path = tmp_path / "dead.lock"
    write_lock(path, dead_pid(), host)  # same host, process gone
    lock = cp.RunLock(path)
    assert lock.acquire() and lock.holder()[0]["pid"] == os.getpid()
    lock.release()
    write_lock(path, 1, "elsewhere", age=120)  # another machine, no heartbeat for 2 minutes
    lock = cp.RunLock(path, stale_after=60)
    assert lock.acquire()
    lock.release()


def test_fresh_locks_of_other_workers_are_respected(tmp_path):
    path = tmp_path / "live.lock"
    write_lock(path, 1, "elsewhere", age=5)  # another machine, recent heartbeat: its pid means nothing here
    assert not cp.RunLock(path, stale_after=60).acquire()
    write_lock(path, os.getppid(), socket.gethostname(), age=5)  # a live process on this host
    assert not cp.RunLock(path, stale_after=60).acquire()


def test_heartbeat_keeps_a_long_run_fresh(tmp_path):
    path = tmp_path / "beat.lock"
    lock = cp.RunLock(path, stale_after=0.4)
    assert lock.acquire()
    os.utime(path, (time.time() - 10, time.time() - 10))
    time.sleep(0.35)  # the heartbeat (every stale_after / 4) has touched it since
    assert time.time() - path.stat().st_mtime < 0.3
    lock.release()


def _worker(study: str, log: str, barrier) -> None:
    barrier.wait()
    cp.run_study(Path(study), small_plan(4), work=fake_work(Path(log), sleep=0.1), progress=False)


def test_two_workers_never_take_the_same_run(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(study), str(log), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    names = ran(log)
    assert sorted(names) == sorted(p.name for p in small_plan(4))  # every run once, none twice
    assert all(rundir.run_status(study / "runs" / n) == "finished" for n in names)


# ----------------------------------------------------------------------------- compare end to end


def image_folder(root: Path, per_class=(4, 2), size=24) -> Path:
    """A tiny image-folder dataset: 3 classes of flat-colour JPEGs, for real (fast) training."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.JPEG")
    return root


def tiny_study(tmp_path) -> dict:
    """compare/sweep keywords: the smoke preset, on a tiny folder, with flags as a user would give them."""
    changes = {"data": {"source": str(image_folder(tmp_path / "images")), "cache_dir": str(tmp_path / "cache"),
                        "prepare_size": 16, "img_size": 16},
               "train": {"batch_size": 4, "device": "cpu", "log_every": 1}}
    return {"preset": get_preset("smoke"), "changes": changes}


def test_compare_with_budget_writes_study_samples_runs_and_report(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    result = cp.compare(["convmixer_256_8", "resnet9"], [0, 1], study, **tiny_study(tmp_path),
                        param_budget=100_000, progress=False, work=fake_work(log))
    meta = json.loads((study / "study.json").read_text())
    assert meta["param_budget"] == 100_000 and meta["runs"] == [p.name for p in small_plan(2)]
    assert set(meta["chosen"]) == {"convmixer_256_8", "resnet9"} and "dim" in meta["chosen"]["convmixer_256_8"]
    assert all(abs(p - 100_000) <= 5_000 for p in meta["chosen_params"].values())
    assert meta["chosen"]["convmixer_256_8"]["depth"] == 2  # the preset's overrides stay, only the width moves
    assert meta["patch_sizes"] == {"convmixer_256_8": 4, "resnet9": None} and meta["num_classes"] == 3
    with np.load(study / "samples.npz") as z:
        assert z["images"].shape == (3, 16, 16, 3) and z["images"].dtype == np.uint8
        assert list(z["classes"]) == ["n00", "n01", "n02"] and list(z["labels"]) == [0, 1, 2]
    assert len(result.outcome["trained"]) == 4 and [p.name for p in result.reports] == ["report.md", "report.html"]
    page = (study / "report.html").read_text()
    assert "Parameter budget 100.00K (±5%)" in page and "convmixer_256_8(dim=" in page
    assert meta["overrides"]["train"] == {"batch_size": 4, "device": "cpu", "log_every": 1}
    assert "settings given for every run: source=" in page and "batch_size=4" in page
    with pytest.raises(UserError, match="param_budget"):  # same folder, different study
        cp.compare(["resnet9"], [0], study, **tiny_study(tmp_path), progress=False, work=fake_work(log))
    other = tiny_study(tmp_path)
    other["changes"]["train"]["batch_size"] = 8
    with pytest.raises(UserError, match="overrides"):  # same folder, other flags: refused too
        cp.compare(["convmixer_256_8", "resnet9"], [0], study, **other, param_budget=100_000, progress=False,
                   work=fake_work(log))


def test_tiny_real_study_trains_then_only_reports(tmp_path, capsys):
    """Through train_run for real (a few seconds): runs finish, the report reads them, a rerun trains nothing."""
    study = tmp_path / "study"
    kw = dict(**tiny_study(tmp_path), param_budget=20_000, progress=False)
    first = cp.compare(["convmixer_256_8", "vit_tiny_6l8h"], [0], study, **kw)
    assert first.outcome["trained"] == ["convmixer_256_8-s0", "vit_tiny_6l8h-s0"]
    for name in first.outcome["trained"]:
        summary = json.loads((study / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "finished" and abs(summary["params"] - 20_000) <= 1_000
    again = cp.compare(["convmixer_256_8", "vit_tiny_6l8h"], [0], study, **kw)
    assert again.outcome["trained"] == [] and again.outcome["done"] == first.outcome["trained"]
    md = (study / "report.md").read_text()
    assert "| convmixer_256_8(dim=" in md and "| vit_tiny_6l8h(dim=" in md and "Missing or partial" not in md


def test_cli_compare_bad_input_exits_2(tmp_path, capsys):
    assert main(["compare", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["compare", "--preset", "smoke", "--seeds", "x", "--out", str(tmp_path)]) == 2
    assert main(["compare", "--preset", "smoke", "--param-budget", "lots", "--out", str(tmp_path)]) == 2
    assert main(["compare", "--preset", "smoke", "--lock-timeout", "0", "--out", str(tmp_path)]) == 2


def test_a_study_goes_on_with_other_threads_cache_or_device(tmp_path):
    """Settings that do not change results (threads, cache folder, device) may differ between the workers of
    one study; a setting that does (batch size) may not."""
    study, log = tmp_path / "study", tmp_path / "log"
    cp.compare(["resnet9"], [0], study, **tiny_study(tmp_path), progress=False, work=fake_work(log),
               report_formats=())
    other = tiny_study(tmp_path)
    other["changes"]["train"].update(threads=1)
    other["changes"]["data"]["cache_dir"] = str(tmp_path / "cache2")
    cp.compare(["resnet9"], [0, 1], study, **other, progress=False, work=fake_work(log), report_formats=())
    assert ran(log) == ["resnet9-s0", "resnet9-s1"]
    other["changes"]["train"]["batch_size"] = 2
    with pytest.raises(UserError, match="overrides"):
        cp.compare(["resnet9"], [0, 2], study, **other, progress=False, work=fake_work(log), report_formats=())


def test_a_study_over_compute_budgets_plans_a_run_per_model_seed_and_budget(tmp_path):
    study, log = tmp_path / "study", tmp_path / "log"
    seen = {}

    def work(cfg, out):
        seen[out.name] = cfg.train.compute_budget
        fake_work(log)(cfg, out)

    cp.compare(["resnet9"], [0], study, **tiny_study(tmp_path), budgets=[2e6, 1e6], progress=False, work=work,
               report_formats=())
    assert seen == {"resnet9-budget=1M-s0": 1e6, "resnet9-budget=2M-s0": 2e6}  # the smallest first
    assert json.loads((study / "study.json").read_text())["budgets"] == [1e6, 2e6]
    cp.compare(["resnet9"], [0], study, **tiny_study(tmp_path), budgets=[4e6], progress=False, work=work,
               report_formats=())  # a study grows by budgets, as by seeds
    assert json.loads((study / "study.json").read_text())["budgets"] == [1e6, 2e6, 4e6]
    with pytest.raises(UserError, match="holds a study over compute budgets"):  # no mixing with epoch runs
        cp.compare(["resnet9"], [0], study, **tiny_study(tmp_path), budgets=[], progress=False, work=work)
    kw = tiny_study(tmp_path)
    kw["changes"]["train"]["compute_budget"] = 3e6
    with pytest.raises(UserError, match=r"--budgets \(1M\) give every run its compute budget"):
        cp.compare(["resnet9"], [0], tmp_path / "other", **kw, budgets=[1e6], progress=False, work=work)


def test_a_summary_cut_short_is_trained_again_not_a_crash(tmp_path):
    """An empty summary.json (a write cut short, or another worker's file read mid-write by an older
    version) does not stop the study: the run is taken like an unfinished one."""
    study, log = tmp_path / "study", tmp_path / "log"
    fx.write_run(study / "runs" / "resnet9-s0", model="resnet9", seed=0, val_top1=[0.4])
    (study / "runs" / "resnet9-s0" / "summary.json").write_text("")
    out = cp.run_study(study, small_plan(1), work=fake_work(log), progress=False)
    assert sorted(out["trained"]) == ["convmixer_256_8-s0", "resnet9-s0"] and out["stopped"] == []
