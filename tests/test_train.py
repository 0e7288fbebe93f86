"""The training loop on a tiny generated image folder, through the real data pipeline.

Covers: loss falls, the run directory's contract, exact resume (after a crash at an epoch boundary
and after SIGINT mid-epoch), the NaN stop, and bad input (one-line errors, nothing overwritten).
"""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import patchbench.data.loader as loader_mod
import patchbench.train as train_mod
from patchbench import rundir
from patchbench.cli import main
from patchbench.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from patchbench.train import TrainingDiverged, train_run

THREADS = torch.get_num_threads()
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def make_image_folder(root, classes=3, train=8, val=4, size=32, seed=0):
    """train/<class>/*.JPEG and val/<class>/*.JPEG: one noisy colour per class (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"n0{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(COLOURS[c]) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"img{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny_config(folder, cache, model="vit_tiny_6l8h", model_args=None, **switches):
    """A tiny run; `switches` are TrainConfig or DataConfig settings, `model_args` constructor overrides."""
    overrides = {"vit_tiny_6l8h": {"dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8,
                                   "dropout": 0.1},
                 "resnet9": {"width": 8},
                 "convmixer_256_8": {"dim": 32, "depth": 2, "patch_size": 4, "kernel_size": 3}}.get(model, {})
    data_fields = set(DataConfig.__dataclass_fields__)
    t = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "log_every": 1, "deterministic": True, "device": "cpu", "threads": 1}
    t.update({k: v for k, v in switches.items() if k not in data_fields})
    d = {"source": str(folder), "cache_dir": str(cache), "prepare_size": 32, "img_size": 32}
    d.update({k: v for k, v in switches.items() if k in data_fields})
    return RunConfig(model=ModelConfig(model, {**overrides, **(model_args or {})}), data=DataConfig(**d),
                     train=TrainConfig(**t))


def weights(run_dir, name="last"):
    return load_file(str(run_dir / "checkpoint" / f"{name}.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]
    assert strip(metrics(a)) == strip(metrics(b))


def test_loss_falls_and_run_dir_follows_the_contract(folder, tmp_path):
    out = tmp_path / "run"
    summary = train_run(tiny_config(folder, tmp_path, "resnet9", epochs=4, lr=1e-2), out, progress=False)
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
    assert rows[-1]["val_top1"] > 0.5  # chance is 1/3
    for key in ("epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "epoch_time_s", "train_images_per_s"):
        assert key in rows[0]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 4
    assert summary["final_top1"] == rows[-1]["val_top1"]
    lowest_loss = min(rows, key=lambda r: r["val_loss"])  # best = the epoch checkpoint/best keeps
    assert summary["lowest_loss_top1"] == lowest_loss["val_top1"]
    assert summary["lowest_loss_epoch"] == lowest_loss["epoch"] and summary["schema"] == rundir.SCHEMA
    assert summary["params"] > 0 and summary["macs"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "resnet9" and cfg["train"]["seed"] == 0
    assert {"torch", "torchvision", "patchbench", "python", "git_commit", "device", "world_size"} <= set(cfg["env"])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["classes"] == ["n00", "n01", "n02"] and ev["top1"] == rows[-1]["val_top1"]
    assert np.array(ev["confusion"]).sum() == 12 and len(ev["per_class_top1"]) == 3
    best = json.loads((out / "checkpoint" / "best.json").read_text())
    assert best["epoch"] == 1 + int(np.argmin([r["val_loss"] for r in rows]))
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    # a finished run resumes to its summary without doing any work
    before = (out / "checkpoint" / "last.safetensors").stat().st_mtime_ns
    assert train_run(tiny_config(folder, tmp_path, "resnet9", epochs=4, lr=1e-2), out, resume=True,
                     progress=False) == summary
    assert (out / "checkpoint" / "last.safetensors").stat().st_mtime_ns == before


def _resume_after_crash(folder, tmp_path, monkeypatch, model="vit_tiny_6l8h", **switches):
    cfg = tiny_config(folder, tmp_path, model, **switches)
    train_run(cfg, tmp_path / "full", progress=False)

    real = train_mod.evaluate_model
    calls = []

    def crash_in_second_validation(*a, **k):
        if k.get("confusion", True):  # the val split's scoring (the training subset's asks for no confusion)
            calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate_model", crash_in_second_validation)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "evaluate_model", real)
    assert [r["epoch"] for r in metrics(tmp_path / "resumed")] == [1]
    train_run(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "resumed")


def test_resume_after_a_crash_equals_an_uninterrupted_run(folder, tmp_path, monkeypatch):
    _resume_after_crash(folder, tmp_path, monkeypatch)


@pytest.mark.parametrize("switches", [
    {"amp": "fp16", "ema_decay": 0.9, "grad_clip": 0.5, "channels_last": True, "label_smoothing": 0.1},
    {"amp": "bf16", "schedule": "piecewise", "weight_decay": 0.1, "init": "kaiming"},
    {"model": "convmixer_256_8", "channels_last": True, "fast_kernels": True, "ema_decay": 0.5},
    # the recipes of the fair preset: per-sample ops, erasing, mixup/cutmix, drop path, progressive sizes
    {"auto_augment": "trivialaugment", "random_erasing": 0.5, "mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1,
         "model_args": {"drop_path": 0.2}, "train_sizes": (24, 32)},
    {"model": "convmixer_256_8", "auto_augment": "randaugment", "randaugment_ops": 2, "mixup": 0.3, "channels_last": True,
         "model_args": {"drop_path": 0.1}, "holdout": 0.25},
])
def test_feature_switches_train_and_resume_exactly(folder, tmp_path, monkeypatch, switches):
    """AMP (with the GradScaler's state), EMA, clipping, channels_last... survive a crash and resume."""
    _resume_after_crash(folder, tmp_path, monkeypatch, **switches)
    state = json.loads((tmp_path / "full" / "checkpoint" / "last.json").read_text())
    assert state["eval_weights"] == ("ema" if "ema_decay" in switches else "model")
    assert (state["scaler"] is not None) == (switches.get("amp") == "fp16")
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["status"] == "finished"


def interrupt_at_step(cfg, out, step: int, monkeypatch) -> dict:
    """Train `cfg` into `out` until SIGINT arrives as step `step` starts; returns the checkpoint's state."""
    real = train_mod.lr_at

    def signal_at(s, total, t):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(s, total, t)

    monkeypatch.setattr(train_mod, "lr_at", signal_at)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, out, progress=False)
    monkeypatch.setattr(train_mod, "lr_at", real)
    return json.loads((out / "checkpoint" / "last.json").read_text())


@pytest.mark.parametrize("switches", [{}, {"auto_augment": "trivialaugment", "random_erasing": 0.5, "cutmix": 1.0}])
def test_sigint_mid_epoch_checkpoints_and_resumes_exactly(folder, tmp_path, monkeypatch, switches):
    cfg = tiny_config(folder, tmp_path, **switches)
    train_run(cfg, tmp_path / "full", progress=False)
    state = interrupt_at_step(cfg, tmp_path / "cut", 4, monkeypatch)  # epoch 2 (3 steps per epoch), batch 1
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 5)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    made = []  # batches the loader makes while resuming: the two already trained on are not made again
    real_crop = loader_mod.crop_resize_normalize
    monkeypatch.setattr(loader_mod, "crop_resize_normalize", lambda *a, **k: made.append(1) or real_crop(*a, **k))
    train_run(cfg, tmp_path / "cut", resume=True, progress=False)
    assert len(made) == 1 + 1 + 1  # epoch 2's last train batch, the one val batch (12 images), the train subset's
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    cfg = tiny_config(folder, tmp_path)
    real = torch.nn.functional.cross_entropy
    steps = []

    def nan_in_epoch_2(logits, y, **kw):
        loss = real(logits, y, **kw)
        if logits.requires_grad:
            steps.append(1)
            if len(steps) == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod.F, "cross_entropy", nan_in_epoch_2)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        train_run(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    state = json.loads((out / "checkpoint" / "last.json").read_text())
    assert state["epoch"] == 1 and state["batch"] == 0
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "nan" in summary["error"]


def cli(capsys, *argv):
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_resumes_and_rejects_bad_input(folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", "resnet9", "--model-arg", "width=8", "--data", str(folder), "--cache-dir", str(tmp_path),
            "--preset", "smoke", "--device", "cpu", "--no-progress"]
    code, stdout, err = cli(capsys, *base, "--epochs", "2", "--out", str(out))
    assert code == 0, err
    assert "resnet9(width=8): final top-1" in stdout  # named by what it is
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "smoke" and saved["train"]["epochs"] == 2 and saved["model"]["overrides"] == {"width": 8}
    mtime = (out / "config.json").stat().st_mtime_ns

    bad = [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--lr", "abc"], "--lr 'abc': need a finite number"),
        (["--amp", "fp8"], "--amp 'fp8': need one of auto, none, bf16, fp16"),
        (["--epochs", "0"], "--epochs 0: need a value in [1, 10000]"),
        (["--img-size", "64"], "--img-size 64: need at most --prepare-size (32)"),
        (["--scale", "1"], "--scale '1': need 2 comma-separated numbers"),
    ]
    for extra, message in bad:
        args = base + extra + ["--out", str(tmp_path / "other")]
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, _, err = cli(capsys, *base, "--out", str(out))
    assert code == 2 and "already holds a run of resnet9; pass --resume" in err
    other = [a if a != "resnet9" else "convmixer_256_8" for a in base if a not in ("--model-arg", "width=8")]
    code, _, err = cli(capsys, *other, "--out", str(out))
    assert code == 2 and "belongs to another model (resnet9, not convmixer_256_8)" in err
    code, _, err = cli(capsys, "--resume", str(out), "--lr", "0.5", "--no-progress")
    assert code == 2 and "--lr: cannot change it when resuming" in err
    code, _, err = cli(capsys, *base[:4], "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = cli(capsys, "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "no run there" in err
    assert (out / "config.json").stat().st_mtime_ns == mtime  # nothing was overwritten
    assert not (tmp_path / "other").exists()

    code, stdout, err = cli(capsys, "--resume", str(out), "--no-progress")  # finished: no work
    assert code == 0 and "final top-1" in stdout
    code, _, err = cli(capsys, *base, "--epochs", "1", "--out", str(out), "--overwrite")
    assert code == 0 and len(metrics(out)) == 1


def test_list_presets(capsys):
    code, out, _ = cli(capsys, "--list-presets")
    assert code == 0
    for name in ("notebook", "study160", "quick", "smoke"):
        assert f"{name}:" in out
    assert "sized for 100 epochs" in out


@pytest.mark.parametrize("preset", ["notebook", "study160", "quick", "smoke"])
def test_every_preset_model_builds_at_its_size(preset):
    from patchbench.optim import create_optimizer
    from patchbench.recipes import get_preset
    from patchbench.train import build_model

    p = get_preset(preset)
    for name in p.models:
        cfg = p.config_for(name).validate()
        with torch.device("meta"):
            model = build_model(cfg, 10)
        assert model.default_img_size == cfg.data.img_size
        create_optimizer(model, cfg.train)
    if preset == "notebook":  # SEED.md's exact parameter counts and recipe
        counts = {n: sum(q.numel() for q in build_model(p.config_for(n), 10).parameters()) for n in p.models}
        assert counts == {"notebook_convmixer": 961_814, "notebook_vit": 811_146, "notebook_resnet9": 1_647_242}
        t, d = p.config_for("notebook_vit").train, p.data_config
        assert (t.batch_size, t.lr, t.weight_decay, t.epochs, t.schedule_epochs) == (16, 1e-3, 0.3, 30, 100)
        assert (d.img_size, d.scale, d.ratio, d.mean) == (32, (0.8, 0.99), (1.0, 1.0), (0.4914, 0.4822, 0.4465))
        assert p.config_for("notebook_convmixer").train.weight_decay == 0.0 and p.quirks


def test_the_accelerator_data_path_trains_like_the_cpu_path(folder, tmp_path):
    """--data-on-device yes runs the GPU data path (split held on the device, gather + roi_align) on the
    CPU. With full-image crops both paths make the same pixels (to float rounding), so a tiny run
    trains to the same losses and accuracies."""
    same_pixels = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "epochs": 2}
    runs = {}
    for mode in ("no", "yes"):
        cfg = tiny_config(folder, tmp_path, "resnet9", data_on_device=mode, **same_pixels)
        train_run(cfg, tmp_path / mode, progress=False)
        runs[mode] = metrics(tmp_path / mode)
    for a, b in zip(runs["no"], runs["yes"]):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
        assert a["val_top1"] == b["val_top1"] and a["train_top1"] == b["train_top1"]


def test_thread_tuner_keeps_the_faster_thread_count(monkeypatch):
    """On a fake clock where one thread count is 3x slower, each trial keeps the faster one."""
    from patchbench.cpu import threads

    clock = {"now": 0.0, "slow": 2}
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["now"])
    for slow in (2, 1):
        clock["slow"] = slow
        tuner = threads.ThreadTuner(window=4, period=10, period_s=5.0, most=2, other_load=lambda: 1.0)  # busy
        for _ in range(2 * 4 + 10):
            tuner.step_begins()
            clock["now"] += 3.0 if torch.get_num_threads() == clock["slow"] else 1.0
            tuner.step_ends()
        assert tuner.current == (1 if slow == 2 else 2)
        assert tuner.steps_at[tuner.current] > 10  # it stayed there for the period
    torch.set_num_threads(THREADS)



def test_thread_tuner_tries_one_thread_only_when_other_processes_are_busy(monkeypatch):
    """On a quiet machine all cores stay (no trial steps at one thread, which would cost time); once other
    processes take a core, the next due check runs a trial."""
    from patchbench.cpu import threads

    clock, load = {"now": 0.0}, {"cores": 0.0}
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["now"])
    tuner = threads.ThreadTuner(window=4, period=10, period_s=5.0, most=2, other_load=lambda: load["cores"])
    seen = set()
    for step in range(60):
        if step == 40:
            load["cores"] = 1.0
        tuner.step_begins()
        seen.add((step >= 40, torch.get_num_threads()))
        clock["now"] += 3.0 if torch.get_num_threads() == 2 else 1.0  # one thread is faster while busy
        tuner.step_ends()
    assert (False, 1) not in seen and (True, 1) in seen and tuner.steps_at[1] > tuner.window
    torch.set_num_threads(THREADS)


def test_run_directories_of_the_previous_version_still_resume_and_report(folder, tmp_path, capsys):
    """A run written before this version (schema 1: no new settings in config.json, a hostname in its env,
    no label or eval_split in summary.json, best_top1/best_epoch for the lowest-loss figures): resumes in
    the current schema, finishes and reports."""
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=2)
    train_run(cfg, tmp_path / "full", progress=False)
    out = tmp_path / "old"
    with pytest.raises(RuntimeError, match="simulated"):
        real = train_mod.validate

        def crash_second(s):
            if s.epoch == 2:
                raise RuntimeError("simulated")
            return real(s)

        train_mod.validate = crash_second
        try:
            train_run(cfg, out, progress=False)
        finally:
            train_mod.validate = real
    doc = json.loads((out / "config.json").read_text())
    for key in ("train_sizes", "auto_augment", "randaugment_ops", "randaugment_magnitude", "random_erasing", "mixup",
                "cutmix", "holdout", "holdout_seed"):
        doc["data"].pop(key)
    doc["train"].pop("data_on_device")
    doc["derived"]["num_val"] = doc["derived"].pop("num_eval")
    del doc["schema"]
    doc["env"]["hostname"] = "lab-pc"
    (out / "config.json").write_text(json.dumps(doc))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("label", "eval_split", "schema"):
        summary.pop(key)
    summary["best_top1"], summary["best_epoch"] = summary.pop("lowest_loss_top1"), summary.pop("lowest_loss_epoch")
    (out / "summary.json").write_text(json.dumps(summary))
    assert rundir.read_summary(out / "summary.json")["lowest_loss_epoch"] == 1
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert_same_run(tmp_path / "full", out)
    doc, summary = (json.loads((out / name).read_text()) for name in ("config.json", "summary.json"))
    assert doc["schema"] == summary["schema"] == rundir.SCHEMA and "hostname" not in doc["env"]
    assert "best_top1" not in summary and summary["lowest_loss_epoch"] in (1, 2)
    assert main(["report", str(out), "--format", "md"]) == 0
    assert "| resnet9(width=8) |" in (out / "report.md").read_text()


def test_auto_settings_resolve_record_and_dump(folder, tmp_path, capsys, monkeypatch):
    """amp=auto follows the CPU's native bf16 (flags injected); layout and kernels come from the probe,
    recorded in config.json and on every epoch; --resolve --dump-config prints what this machine runs."""
    import patchbench.device as dv

    monkeypatch.setattr(dv, "cpu_features", lambda: "fpu sse avx2 fma")  # no native bf16
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=1, deterministic=False, amp="auto",
                      channels_last="auto", fast_kernels="auto")
    out = tmp_path / "run"
    train_run(cfg, out, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["amp"] == "none" and saved["derived"]["amp"] == "auto: no native bf16, fp32"
    speed = saved["derived"]["speed"]
    assert saved["train"]["channels_last"] == "auto" and speed["how"].startswith("probed")
    tried = set(speed["step_s"]) | set(speed["dropped"])  # timed, or dropped after one step over the cap
    assert tried == {"NCHW, kernels off", "channels_last, kernels off"}  # no kernel fits a ResNet
    row = metrics(out)[0]
    assert row["channels_last"] == speed["channels_last"] and row["fast_kernels"] is False and row["processor"]
    code, stdout, err = cli(capsys, "--model", "resnet9", "--model-arg", "width=8", "--data", str(folder),
                            "--cache-dir", str(tmp_path), "--preset", "smoke", "--device", "cpu", "--amp", "auto",
                            "--batch-size", "8", "--resolve", "--dump-config", "--no-progress")
    assert code == 0, err
    assert "# resolved here: amp = 'none': auto: no native bf16, fp32" in stdout
    assert 'amp = "none"' in stdout and ("channels_last = true" in stdout or "channels_last = false" in stdout)
    assert 'channels_last = "auto"' not in stdout and 'fast_kernels = "auto"' not in stdout
    code, _, err = cli(capsys, "--model", "resnet9", "--resolve", "--out", str(tmp_path / "x"))
    assert code == 2 and "--resolve goes with --dump-config" in err


def test_a_run_of_the_previous_release_resumes_under_its_models_new_name(tmp_path):
    """config.json of a run trained as seed_resnet9: resuming it as notebook_resnet9 (or by the old name)
    is the same model, not 'another model'."""
    from patchbench.recipes import build_config, get_preset

    cfg = build_config("notebook_resnet9", preset=get_preset("notebook"))
    out = tmp_path / "run"
    out.mkdir()
    doc = {**cfg.to_dict(), "env": {}, "derived": {}}
    doc["model"]["name"], doc["preset"] = "seed_resnet9", "seed"
    (out / "config.json").write_text(json.dumps(doc))
    assert train_mod.plan_run_dir(out, cfg, resume=True, overwrite=False) == "new"  # no checkpoint yet
