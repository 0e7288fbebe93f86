"""Failing disks, damaged run files, empty splits, foreign libraries: clear errors, nothing lost, resumable.

Disk-full cases inject OSError(ENOSPC) where the write happens; one test also fills a real 256 KB
tmpfs (skipped where mounting is not allowed).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import runfixtures as fx
import torch
from test_train import assert_same_run, make_image_folder, metrics, tiny_config

from patchbench import checkpoint as ck
from patchbench.cli import main
from patchbench.cpu import build, layers
from patchbench.data import cache as cache_mod
from patchbench.train import train_run

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def leftovers(root) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- disk full


def test_prepare_on_a_full_disk_says_so_and_leaves_no_temporary_folder(folder, tmp_path, capsys, monkeypatch):
    def full(fd, offset, length):
        raise ENOSPC

    monkeypatch.setattr(cache_mod.os, "posix_fallocate", full)
    code = main(["data", "prepare", "--data", str(folder), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device" in err and "the cache needs about" in err
    assert "prepared" in err and leftovers(tmp_path / "c") == []


def _mount_tmpfs(path, size="256k") -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True)
    return done.returncode == 0


def test_prepare_filling_a_real_disk_is_an_error_not_a_bus_error(folder, tmp_path):
    """A sparse memmap on a full tmpfs dies of SIGBUS when a page is first written; the cache's arrays
    are allocated up front instead, so the process gets ENOSPC and says so."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "patchbench", "data", "prepare", "--data", str(folder), "--cache-dir", str(disk),
             "--img-size", "160", "--no-progress"], check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr  # not -7 (SIGBUS)
        assert "no space left on the device" in done.stderr
        assert leftovers(disk) == [] and list((disk / "prepared").glob("*")) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True)


def disk_full_at_the_third_tensor_file(monkeypatch):
    """Make the third safetensors file a checkpoint writes fail with ENOSPC; returns the real writer."""
    real, calls = ck.save_file, []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise ENOSPC
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    return real


def test_a_full_disk_while_checkpointing_stops_cleanly_and_resumes(folder, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=3)
    train_run(cfg, tmp_path / "full", progress=False)
    real = disk_full_at_the_third_tensor_file(monkeypatch)  # epoch 1: best (2 files), last (the third fails)
    out = tmp_path / "cut"
    from patchbench.errors import UserError

    with pytest.raises(UserError, match=r"cannot write .*checkpoint/last\.safetensors: no space left on the device"):
        train_run(cfg, out, progress=False)
    monkeypatch.setattr(ck, "save_file", real)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert leftovers(out) == []  # the half-written checkpoint's temporary files are gone
    train_run(cfg, out, resume=True, progress=False)  # space freed: the same command goes on
    assert_same_run(tmp_path / "full", out)


def test_the_full_disk_message_gives_a_command_that_works(folder, tmp_path, monkeypatch, capsys):
    """The CLI's advice after a full disk is run as given (the words between the backquotes), and finishes."""
    disk_full_at_the_third_tensor_file(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--preset", "smoke", "--model", "resnet9", "--model-arg", "width=8", "--data", str(folder),
            "--cache-dir", str(tmp_path), "--device", "cpu", "--epochs", "2", "--no-progress", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on the device; free some space and try again" in err and len(err.splitlines()) == 1
    advice = err.split("`")[1]
    assert advice == f"patchbench train --resume {out}"
    assert main(advice.split()[1:] + ["--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_a_full_disk_while_writing_the_report_keeps_the_old_report(tmp_path, capsys, monkeypatch):
    from patchbench import rundir

    study = fx.write_compare_study(tmp_path / "study")
    assert main(["report", str(study), "--format", "md"]) == 0
    before = (study / "report.md").read_bytes()
    real = rundir.write_bytes_to

    def full(tmp, data, path=None):
        if str(tmp).endswith(".tmp-" + str(os.getpid())) and "report" in str(path or tmp):
            raise rundir.output_error(path or tmp, ENOSPC)
        return real(tmp, data, path)

    monkeypatch.setattr(rundir, "write_bytes_to", full)
    capsys.readouterr()
    assert main(["report", str(study), "--format", "md"]) == 2
    assert "report.md: no space left on the device" in capsys.readouterr().err
    assert (study / "report.md").read_bytes() == before and leftovers(study) == []


# ----------------------------------------------------------------------------- damaged run files


def test_resume_drops_a_torn_last_metrics_line_and_says_so(folder, tmp_path, capsys):
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=3)
    train_run(cfg, tmp_path / "full", progress=False)
    out = tmp_path / "torn"
    train_run(tiny_config(folder, tmp_path, "resnet9", epochs=3), out, progress=False)
    # a power cut while epoch 3's line was being appended, before its checkpoint: as if stopped after epoch 2
    state = json.loads((out / "checkpoint" / "last.json").read_text())
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n" + rows[2][: len(rows[2]) // 2])
    (out / "summary.json").write_text(json.dumps({"status": "running"}))
    assert state["epoch"] == 3
    capsys.readouterr()
    train_run(cfg, out, resume=True, progress=True)
    assert "metrics.jsonl: dropped its last line, cut short while being written" in capsys.readouterr().err
    assert [r["epoch"] for r in metrics(out)] == [1, 2]  # the checkpoint was already past epoch 3: finished
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("damage, problem", [
    (lambda run: (run / "summary.json").write_text(json.dumps({"status": "finished", "final_top1": "high"})),
     'summary.json: final_top1 is "high", not a number'),
    (lambda run: (run / "summary.json").write_text("[1, 2]"), "summary.json holds a JSON list, not a JSON object"),
    (lambda run: (run / "summary.json").write_text(json.dumps({"status": "done"})), "status is \"done\", not one of"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 0.5}\n[1]\n'),
     "metrics.jsonl line 2 holds a JSON list, not an object"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": "one"}\n{"epoch": 2}\n'),
     'metrics.jsonl line 1: epoch is "one", not a number'),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n'),
     "metrics.jsonl line 2 is not valid JSON"),
    (lambda run: (run / "eval.json").write_text(""), "eval.json is empty"),
    (lambda run: (run / "config.json").write_bytes(b"\xff\xfe"), "config.json cannot be read"),
])
def test_report_names_each_damaged_file_and_goes_on(tmp_path, capsys, damage, problem):
    study = fx.write_compare_study(tmp_path / "study")
    damage(study / "runs" / "vit_tiny_6l8h-s1")
    assert main(["report", str(study), "--format", "md"]) == 0
    md = (study / "report.md").read_text()
    assert "vit_tiny_6l8h-s1: " in md and problem in md
    assert "| convmixer_256_8 |" in md  # the other runs are still reported


def test_resume_with_a_damaged_checkpoint_names_the_file(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(tiny_config(folder, tmp_path, "resnet9", epochs=1), out, progress=False)
    for name in ("last.json", "best.json"):  # both damaged: no checkpoint to fall back on
        (out / "checkpoint" / name).write_text("{cut")
    (out / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint/best.json is not valid JSON" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- splits with nothing in them


def test_a_split_with_no_readable_image_stops_before_training(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", classes=2, train=4, val=2)
    for p in (root / "val").rglob("*.JPEG"):
        p.write_bytes(b"not a jpeg at all")
    code = main(["train", "--preset", "smoke", "--model", "resnet9", "--data", str(root), "--cache-dir",
                 str(tmp_path / "c"), "--device", "cpu", "--batch-size", "4", "--no-progress", "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "the val split" in err and "has no usable images (4 unreadable)" in err
    assert not (tmp_path / "run" / "config.json").exists()


# ----------------------------------------------------------------------------- foreign code, latent defects


def test_the_build_folder_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    path = build.build_dir()
    assert path == folder / build.build_key()
    assert (folder.stat().st_mode & 0o777) == 0o700 and (path.stat().st_mode & 0o777) == 0o700


def test_a_build_folder_of_someone_elses_is_never_used(tmp_path, monkeypatch):
    """A cache folder that belongs to another user (who could put a library in it), or where a file
    sits in the folder's place: a fresh private folder for this process instead."""
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    other = build.build_dir()
    assert not other.is_relative_to(tmp_path) and other.name.startswith("patchbench-kernels-")
    monkeypatch.undo()
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / "kernels").write_text("a file in the folder's place")
    assert build.build_dir().name.startswith("patchbench-kernels-")


LOAD = """
from patchbench.cpu import build
print(build.load(), build.FAILURE)
"""


@pytest.mark.skipif(__import__("shutil").which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_a_lock_left_by_a_killed_build_is_not_waited_on():
    """A lock file left in the build folder by a killed build (older versions of torch's builder waited forever
    while one existed) does not stop the next process: it loads the library."""
    (build.build_dir() / "lock").write_text("")
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=False, timeout=240)
    assert done.stdout.split() == ["True", "None"], done.stderr


def test_sync_batchnorm_refuses_the_fused_gelu_batchnorm():
    from patchbench.errors import UserError
    from patchbench.models import create_model
    from patchbench.train import convert_sync_batchnorm

    model = create_model("convmixer_256_8", dim=32, depth=1)
    assert layers.use_fast_kernels(model) > 0
    with pytest.raises(UserError, match="--sync-bn cannot convert the fused GELU -> BatchNorm"):
        convert_sync_batchnorm(model)
    plain = convert_sync_batchnorm(create_model("resnet9", width=4))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())


def test_a_damaged_last_checkpoint_resumes_from_best_and_says_so(folder, tmp_path, capsys):
    cfg = tiny_config(folder, tmp_path, "resnet9", epochs=3)
    out = tmp_path / "run"
    train_run(cfg, out, progress=False)
    doc = json.loads((out / "checkpoint" / "last.json").read_text())
    (out / "checkpoint" / doc["files"]["weights"]).write_bytes(b"damaged")
    (out / "summary.json").write_text(json.dumps({"status": "running"}))
    best_epoch = json.loads((out / "checkpoint" / "best.json").read_text())["epoch"]
    capsys.readouterr()
    train_run(cfg, out, resume=True, progress=True)
    err = capsys.readouterr().err
    assert "is damaged (its digest does not match)" in err and "; resuming from" in err and "best.json" in err
    assert f"resuming {out} at epoch {best_epoch + 1}" in err
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]


def test_without_a_compiler_the_fallbacks_are_recorded_and_reported(folder, tmp_path, monkeypatch):
    """No C++ compiler: no layer is swapped for patchbench.cpu's; config.json's derived section and the
    report say so, with the reason."""
    from patchbench.report import load, render

    monkeypatch.setattr(build, "_LOADED", False)
    monkeypatch.setattr(build, "FAILURE", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(folder, tmp_path, "convmixer_256_8", epochs=1, fast_kernels=True,
                      model_args={"dim": 32})
    study = tmp_path / "study"
    with pytest.warns(UserWarning, match="the CPU operators could not be built"):
        train_run(cfg, study / "runs" / "convmixer_256_8-s0", progress=False)
    derived = json.loads((study / "runs" / "convmixer_256_8-s0" / "config.json").read_text())["derived"]
    assert derived["kernels"].startswith("none: the CPU operators could not be built")
    assert metrics(study / "runs" / "convmixer_256_8-s0")[0]["fast_kernels"] is False
    (study / "study.json").write_text(json.dumps({"kind": "compare", "models": ["convmixer_256_8"], "seeds": [0]}))
    lines = render.model_lines({}, load.group_runs(load.load_study(study).runs))
    assert any("computed with: precision fp32; crops: torch's uint8" in line and "CPU operators: none: "
               in line for line in lines)


def test_resuming_on_other_data_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(tiny_config(folder, tmp_path, "resnet9", epochs=2), out, progress=False)
    (out / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    other = make_image_folder(tmp_path / "other", seed=5)  # the same classes, other pixels
    before = (out / "config.json").read_bytes()
    assert main(["train", "--resume", str(out), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its images or labels differ from those the run" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.json").read_bytes() == before
