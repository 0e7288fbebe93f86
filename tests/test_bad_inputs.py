"""Bad input, to every command: a one-line error naming the thing and the fix, exit 2, no traceback,
and nothing written earlier is changed.

The table holds one row per bad input (command line -> words the message must contain). Every row
runs against the same fixtures: a finished tiny run, a study, an image folder, config files; after
each, the fixtures' files are compared byte for byte with a snapshot taken before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import runfixtures as fx
import torch
from PIL import Image
from test_train import make_image_folder

from patchbench.cli import main


@dataclass
class Ctx:
    root: Path
    folder: Path  # an image folder: train/ and val/, 3 classes, 32px
    run: Path  # a finished resnet9 run trained on it (smoke preset)
    study: Path  # a finished fixture study
    cache: Path

    def __getitem__(self, name: str) -> str:
        return str(getattr(self, name) if hasattr(self, name) else self.root / name)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("bad")
    folder = make_image_folder(root / "images")
    cache = root / "cache"
    run = root / "run"
    assert main(["train", "--preset", "smoke", "--model", "resnet9", "--data", str(folder), "--cache-dir", str(cache),
                 "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    study = fx.write_compare_study(root / "study")
    (root / "notes.txt").write_text("not an image, not an archive\n")
    (root / "empty").mkdir()
    (root / "noimages").mkdir()
    (root / "noimages" / "readme.txt").write_text("no train/ here")
    (root / "broken.tgz").write_bytes(b"\x1f\x8b\x08 definitely not a whole archive")
    (root / "notoml.toml").write_text("epochs = [1, 2\n")
    (root / "badkey.toml").write_text("[train]\nepoch = 3\n")
    (root / "badtype.toml").write_text('[train]\nlr = "fast"\n')
    (root / "badsection.toml").write_text("train = 3\n")
    (root / "unknowntop.toml").write_text("[training]\nlr = 0.1\n")
    (root / "pic.jpg").write_bytes(b"this is text, not a jpeg")
    (root / "target.json").write_text("{}")
    (root / "typo.toml").write_text("[per_model.resnet_9.train]\nlr = 0.1\n")
    (root / "badarg.toml").write_text('[model]\nname = "resnet9"\n[model.overrides]\nwidth = "wide"\n')
    (root / "badpm.toml").write_text("[per_model.resnet9.overrides]\ndepth = 3\n")
    (root / "badtune.toml").write_text('preset = "smoke"\n[tune]\nlr = [0.1, 0.01]\nweight_decay = [0.01, 0.1]\n')
    (root / "tunekey.toml").write_text('preset = "smoke"\n[tune]\nlr = [0.001, 0.01]\nweight_decay = [0.01, 0.1]\n'
                                       'budget = 3\n')
    (root / "bomb.png").write_bytes(png_header(40_000, 40_000))  # 1.6G pixels claimed, a few bytes on disk
    (root / "link.json").symlink_to(root / "target.json")
    os.mkfifo(root / "fifo")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "good.jpg")
    return Ctx(root=root, folder=folder, run=run, study=study, cache=cache)


def snapshot(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels and holds none: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


TRAIN = ["train", "--preset", "smoke", "--model", "resnet9", "--data", "{folder}", "--cache-dir", "{cache}",
         "--device", "cpu", "--no-progress"]
COMPARE = ["compare", "--preset", "smoke", "--data", "{folder}", "--cache-dir", "{cache}", "--no-progress"]
NEW = ["--out", "{root}/new"]

# (id, argv with {placeholders}, words the one-line message must contain)
CASES = [
    # models
    ("models-size-0", ["models", "--img-size", "0"], ["--img-size", "between 1 and 4096"]),
    ("models-size-text", ["models", "--img-size", "abc"], ["--img-size 'abc'", "whole number"]),
    ("models-size-huge", ["models", "--img-size", "99999"], ["--img-size", "between 1 and 4096"]),
    ("models-unknown", ["models", "convmixr_256_12"], ["unknown model 'convmixr_256_12'", "did you mean"]),
    # data
    ("download-unknown", ["data", "download", "imagenet"], ["data download imagenet", "not a registered dataset"]),
    ("download-bad-md5", ["data", "download", "imagenette-160", "--md5", "xyz"], ["--md5 xyz", "32 hexadecimal"]),
    ("prepare-missing", ["data", "prepare", "--data", "{root}/missing", "--cache-dir", "{cache}"],
     ["--data", "missing", "no such file or folder"]),
    ("prepare-not-archive", ["data", "prepare", "--data", "{root}/notes.txt", "--cache-dir", "{cache}"],
     ["notes.txt", "not a folder or a .tgz"]),
    ("prepare-size-0", ["data", "prepare", "--data", "{folder}", "--img-size", "0"], ["--img-size 0", "pixels"]),
    ("prepare-size-text", ["data", "prepare", "--data", "{folder}", "--img-size", "big"], ["--img-size 'big'"]),
    ("prepare-workers-0", ["data", "prepare", "--data", "{folder}", "--workers", "0"], ["--workers 0", "[1, 1024]"]),
    ("prepare-workers-text", ["data", "prepare", "--data", "{folder}", "--workers", "two"], ["--workers 'two'"]),
    ("prepare-no-train", ["data", "prepare", "--data", "{root}/noimages", "--cache-dir", "{cache}"],
     ["no train/ folder", "train/<class>/"]),
    ("prepare-broken-archive", ["data", "prepare", "--data", "{root}/broken.tgz", "--cache-dir", "{cache}", "--no-progress"],
     ["cannot read archive", "download it again"]),
    ("prepare-md5-mismatch", ["data", "prepare", "--data", "{root}/broken.tgz", "--cache-dir", "{cache}", "--md5",
                              "0" * 32], ["MD5 mismatch", "expected 000"]),
    # train: values
    ("train-no-out", TRAIN, ["--out RUN_DIR is required"]),
    ("train-unknown-model", ["train", "--model", "resnet10", "--data", "{folder}", *NEW], ["unknown model 'resnet10'"]),
    ("train-epochs-0", [*TRAIN, "--epochs", "0", *NEW], ["--epochs 0", "[1, 10000]"]),
    ("train-epochs-huge", [*TRAIN, "--epochs", "1000000000000", *NEW], ["--epochs 1000000000000", "[1, 10000]"]),
    ("train-lr-inf", [*TRAIN, "--lr", "inf", *NEW], ["--lr 'inf'", "finite number"]),
    ("train-lr-nan", [*TRAIN, "--lr", "nan", *NEW], ["--lr 'nan'", "finite number"]),
    ("train-lr-negative", [*TRAIN, "--lr", "-1", *NEW], ["--lr -1", "(0, 10]"]),
    ("train-lr-text", [*TRAIN, "--lr", "fast", *NEW], ["--lr 'fast'", "finite number"]),
    ("train-batch-0", [*TRAIN, "--batch-size", "0", *NEW], ["--batch-size 0"]),
    ("train-batch-float", [*TRAIN, "--batch-size", "1.5", *NEW], ["--batch-size '1.5'", "whole number"]),
    ("train-amp", [*TRAIN, "--amp", "fp8", *NEW], ["--amp 'fp8'", "none, bf16, fp16"]),
    ("train-device", [*TRAIN, "--device", "tpu", *NEW], ["--device 'tpu'", "auto, cpu, cuda or cuda:N"]),
    ("train-schedule", [*TRAIN, "--schedule", "cosine", *NEW], ["--schedule 'cosine'", "onecycle"]),
    ("train-schedule-epochs", [*TRAIN, "--epochs", "3", "--schedule-epochs", "2", *NEW],
     ["--schedule-epochs 2", "at least --epochs (3)"]),
    ("train-scale-one", [*TRAIN, "--scale", "0.5", *NEW], ["--scale '0.5'", "2 comma-separated numbers"]),
    ("train-scale-order", [*TRAIN, "--scale", "0.9,0.1", *NEW], ["--scale 0.9,0.1", "MIN <= MAX"]),
    ("train-img-size", [*TRAIN, "--img-size", "64", *NEW], ["--img-size 64", "--prepare-size (32)"]),
    ("train-holdout", [*TRAIN, "--holdout", "0.9", *NEW], ["--holdout 0.9", "[0, 0.5]"]),
    ("train-sizes", [*TRAIN, "--train-sizes", "0,32", *NEW], ["--train-sizes 0,32"]),
    ("train-sizes-text", [*TRAIN, "--train-sizes", "small", *NEW], ["--train-sizes 'small'"]),
    ("train-auto-augment", [*TRAIN, "--auto-augment", "fancy", *NEW], ["--auto-augment 'fancy'", "randaugment"]),
    ("train-mixup", [*TRAIN, "--mixup", "-1", *NEW], ["--mixup -1"]),
    ("train-threads", [*TRAIN, "--threads", "0", *NEW], ["--threads 0", "[1, 1024]"]),
    ("train-seed", [*TRAIN, "--seed", "-1", *NEW], ["--seed -1"]),
    ("train-grad-clip", [*TRAIN, "--grad-clip", "0", *NEW], ["--grad-clip 0"]),
    ("train-ema", [*TRAIN, "--ema", "1.5", *NEW], ["--ema 1.5", "(0, 1)"]),
    ("train-md5", [*TRAIN, "--md5", "abc", *NEW], ["--md5 abc", "32 hexadecimal digits"]),
    ("train-model-arg-type", [*TRAIN, "--model-arg", "width=abc", *NEW], ["--model-arg width 'abc'", "whole number"]),
    ("train-model-arg-name", [*TRAIN, "--model-arg", "widht=3", *NEW], ["takes no argument 'widht'", "width"]),
    ("train-model-arg-form", [*TRAIN, "--model-arg", "width", *NEW], ["--model-arg 'width'", "KEY=VALUE"]),
    ("train-model-arg-range", [*TRAIN, "--model-arg", "width=0", *NEW], ["model resnet9", "positive width"]),
    ("train-preset", ["train", "--preset", "nope", "--model", "resnet9", *NEW], ["unknown preset 'nope'"]),
    ("train-sync-bn-cpu", [*TRAIN, "--sync-bn", *NEW], ["--sync-bn needs GPUs"]),
    ("train-size-vs-patch", ["train", "--preset", "smoke", "--model", "vit_tiny_6l8h", "--data", "{folder}",
                             "--cache-dir", "{cache}", "--device", "cpu", "--train-sizes", "20", "--no-progress",
                             *NEW], ["--train-sizes 20", "cannot train at 20px"]),
    # train: config files
    ("config-missing", [*TRAIN, "--config", "{root}/none.toml", *NEW], ["--config", "none.toml: no such file"]),
    ("config-folder", [*TRAIN, "--config", "{root}/empty", *NEW], ["--config", "is a folder"]),
    ("config-not-toml", [*TRAIN, "--config", "{root}/notoml.toml", *NEW], ["notoml.toml", "not valid TOML"]),
    ("config-bad-key", [*TRAIN, "--config", "{root}/badkey.toml", *NEW], ["badkey.toml", "unknown [train] setting(s) epoch"]),
    ("config-bad-type", [*TRAIN, "--config", "{root}/badtype.toml", *NEW], ["badtype.toml: [train] lr 'fast'"]),
    ("config-bad-section", [*TRAIN, "--config", "{root}/badsection.toml", *NEW], ["badsection.toml", "[train] must be"]),
    ("config-unknown-top", [*TRAIN, "--config", "{root}/unknowntop.toml", *NEW], ["unknowntop.toml", "unknown key(s) training"]),
    # train: run directories
    ("train-out-file", [*TRAIN, "--out", "{root}/notes.txt"], ["notes.txt is a file", "choose a folder"]),
    ("train-out-taken", [*TRAIN, "--out", "{run}"], ["already holds a run of resnet9", "--resume"]),
    ("train-out-under-file", [*TRAIN, "--out", "{root}/notes.txt/run"], ["--out", "is a file", "notes.txt"]),
    ("train-out-not-a-run", [*TRAIN, "--out", "{root}/noimages"], ["holds no patchbench run"]),
    ("resume-nothing", ["train", "--resume", "{root}/nothing"], ["--resume", "no run there"]),
    ("resume-change-lr", ["train", "--resume", "{run}", "--lr", "0.5"], ["--lr: cannot change it when resuming"]),
    ("resume-model-arg", ["train", "--resume", "{run}", "--model-arg", "width=3"], ["--model-arg", "being resumed"]),
    ("resume-other-model", ["train", "--resume", "{run}", "--model", "vit_tiny_6l8h"], ["belongs to another model"]),
    ("train-data-missing", ["train", "--model", "resnet9", "--data", "{root}/gone", *NEW], ["--data", "no such file or folder"]),
    # eval and predict
    ("eval-missing", ["eval", "{root}/nothing"], ["nothing", "no checkpoint"]),
    ("eval-batch-0", ["eval", "{run}", "--batch-size", "0"], ["--batch-size 0"]),
    ("eval-output-folder", ["eval", "{run}", "--output", "{root}/empty"], ["--output", "is a folder"]),
    ("eval-holdout", ["eval", "{run}", "--split", "holdout"], ["--split holdout", "held nothing out"]),
    ("eval-device", ["eval", "{run}", "--device", "gpu0"], ["--device 'gpu0'"]),
    ("eval-not-checkpoint", ["eval", "{run}/config.json"], ["not a patchbench checkpoint"]),
    ("predict-missing-image", ["predict", "{run}", "{root}/none.jpg"], ["none.jpg: no such file"]),
    ("predict-not-image", ["predict", "{run}", "{root}/pic.jpg"], ["pic.jpg", "cannot read it as an RGB image"]),
    ("predict-topk", ["predict", "{run}", "{root}/good.jpg", "--topk", "0"], ["--topk 0"]),
    ("predict-bomb", ["predict", "{run}", "{root}/bomb.png"], ["bomb.png: too large to decode safely", "smaller image"]),
    ("predict-no-run", ["predict", "{root}/nothing", "{root}/good.jpg"], ["no checkpoint"]),
    # compare, sweep, ablate
    ("compare-no-preset", ["compare", "--out", "{root}/s"], ["--preset is required"]),
    ("compare-preset", ["compare", "--preset", "nope", "--out", "{root}/s"], ["unknown preset 'nope'"]),
    ("compare-seeds-text", [*COMPARE, "--seeds", "x", "--out", "{root}/s"], ["--seeds 'x'", "whole numbers"]),
    ("compare-seeds-negative", [*COMPARE, "--seeds", "-1", "--out", "{root}/s"], ["--seeds '-1'"]),
    ("compare-budget", [*COMPARE, "--param-budget", "lots", "--out", "{root}/s"], ["--param-budget 'lots'"]),
    ("compare-two-budgets", [*COMPARE, "--param-budget", "1M", "--mac-budget", "1M", "--out", "{root}/s"],
     ["give one of them"]),
    ("compare-lock-timeout", [*COMPARE, "--lock-timeout", "0", "--out", "{root}/s"], ["--lock-timeout 0"]),
    ("compare-model", [*COMPARE, "--models", "resnet10", "--out", "{root}/s"], ["unknown model 'resnet10'"]),
    ("compare-epochs", [*COMPARE, "--epochs", "0", "--out", "{root}/s"], ["--epochs 0"]),
    ("compare-format", [*COMPARE, "--format", "pdf", "--out", "{root}/s"], ["--format 'pdf'"]),
    ("compare-out-file", [*COMPARE, "--out", "{root}/notes.txt"], ["--out", "notes.txt", "is a file"]),
    ("compare-other-study", [*COMPARE, "--models", "vit_tiny_6l8h", "--out", "{study}"], ["holds a study with"]),
    ("sweep-grid-form", ["sweep", "--grid", "patch_size", "--model", "convmixer_256_8", "--preset", "smoke",
                         "--out", "{root}/s"], ["--grid item 'patch_size'"]),
    ("sweep-grid-type", ["sweep", "--grid", "patch_size=two", "--model", "convmixer_256_8", "--preset", "smoke",
                         "--out", "{root}/s"], ["--grid patch_size 'two'", "whole number"]),
    ("sweep-grid-name", ["sweep", "--grid", "size=1", "--model", "convmixer_256_8", "--preset", "smoke",
                         "--out", "{root}/s"], ["--grid size", "takes no argument 'size'"]),
    ("ablate-mixer", ["ablate", "--mixers", "conv,fft", "--out", "{root}/s"], ["--mixers conv,fft", "choose from"]),
    ("ablate-stem", ["ablate", "--stems", "big", "--out", "{root}/s"], ["--stems big", "choose from"]),
    ("ablate-budgets", ["ablate", "--param-budget", "1M", "--mac-budget", "5M", "--out", "{root}/s"],
     ["give one of them"]),
    # report
    ("report-missing", ["report", "{root}/nothing"], ["does not exist", "patchbench compare"]),
    ("report-file", ["report", "{root}/notes.txt"], ["notes.txt is a file"]),
    ("report-empty", ["report", "{root}/empty"], ["no run directories"]),
    ("report-format", ["report", "{study}", "--format", "pdf"], ["--format 'pdf'"]),
    # bench
    ("bench-model", ["bench", "--model", "resnet10", "--out", "{root}/b.json"], ["unknown model 'resnet10'"]),
    ("bench-out-folder", ["bench", "--model", "resnet9", "--out", "{root}/empty"], ["--out", "is a folder"]),
    ("bench-out-under-file", ["bench", "--model", "resnet9", "--out", "{root}/notes.txt/b.json"], ["--out", "is a file"]),
    ("bench-batch", ["bench", "--model", "resnet9", "--batch-size", "0"], ["--batch-size 0"]),
    ("bench-size", ["bench", "--model", "resnet9", "--img-size", "x"], ["--img-size 'x'"]),
    ("bench-device", ["bench", "--model", "resnet9", "--device", "tpu"], ["--device 'tpu'"]),
    ("bench-threads", ["bench", "--model", "resnet9", "--threads", "0"], ["--threads 0"]),
    # outputs that would clobber a run's, a study's or a special file
    ("eval-output-run-config", ["eval", "{run}", "--output", "{run}/config.json"], ["--output", "inside the run folder"]),
    ("eval-output-checkpoint", ["eval", "{run}", "--output", "{run}/checkpoint/last.json"],
     ["inside the run folder", "choose a path outside it"]),
    ("bench-out-run-summary", ["bench", "--model", "resnet9", "--out", "{run}/summary.json"], ["inside the run folder"]),
    ("bench-out-study-report", ["bench", "--model", "resnet9", "--out", "{study}/report.md"], ["inside the study folder"]),
    ("bench-out-study-run", ["bench", "--model", "resnet9", "--out", "{study}/runs/x/bench.json"],
     ["inside the study folder"]),
    ("bench-out-symlink", ["bench", "--model", "resnet9", "--out", "{root}/link.json"], ["is a symbolic link", "regular file"]),
    ("bench-out-fifo", ["bench", "--model", "resnet9", "--out", "{root}/fifo"], ["is a FIFO"]),
    ("bench-out-device", ["bench", "--model", "resnet9", "--out", "/dev/full"], ["/dev/full: is a device"]),
    ("eval-output-device", ["eval", "{run}", "--output", "/dev/full"], ["--output /dev/full: is a device"]),
    ("compare-out-is-a-run", [*COMPARE, "--out", "{run}"], ["holds a run", "a folder of its own"]),
    ("compare-out-in-a-run", [*COMPARE, "--out", "{run}/study"], ["inside the run folder"]),
    ("compare-out-in-a-study", [*COMPARE, "--out", "{study}/runs/sub"], ["inside the study folder"]),
    ("sweep-out-in-a-run", ["sweep", "--preset", "smoke", "--model", "resnet9", "--grid", "width=4,8", "--out",
                            "{run}/s"], ["inside the run folder"]),
    ("tune-out-in-a-run", ["tune", "--preset", "budget", "--out", "{run}/t"], ["inside the run folder"]),
    ("tune-no-search", ["tune", "--preset", "smoke", "--out", "{root}/t"], ["declares no [tune] search"]),
    ("compare-budget-and-epochs", [*COMPARE, "--compute-budget", "1G", "--epochs", "2", *NEW],
     ["--epochs and --compute-budget both given"]),
    ("train-budget-text", [*TRAIN, "--compute-budget", "lots", *NEW], ["--compute-budget 'lots'", "SI suffix"]),
    ("train-resolve-alone", [*TRAIN, "--resolve", *NEW], ["--resolve goes with --dump-config"]),
    ("bench-cap", ["bench", "--model", "resnet9", "--cap", "0.5"], ["--cap 0.5", "at least 1"]),
    ("bench-dtype-amp", ["bench", "--model", "resnet9", "--dtype", "fp32", "--amp", "bf16"], ["disagree"]),
    ("train-per-model-typo", [*TRAIN, "--config", "{root}/typo.toml", *NEW],
     ["typo.toml", "[per_model.resnet_9] names no registered model"]),
    ("compare-per-model-typo", [*COMPARE, "--config", "{root}/typo.toml", *NEW], ["[per_model.resnet_9]"]),
    ("train-config-override-value", [*TRAIN[:3], *TRAIN[5:], "--config", "{root}/badarg.toml", *NEW],
     ["badarg.toml: [model.overrides] width 'wide'", "whole number"]),
    ("train-config-per-model-arg", [*TRAIN, "--config", "{root}/badpm.toml", *NEW],
     ["badpm.toml: [per_model.resnet9.overrides] depth", "takes no argument 'depth'"]),
    ("tune-param-budget", ["tune", "--param-budget", "lots", "--out", "{root}/t"], ["--param-budget 'lots'"]),
    ("tune-unknown-model", ["tune", "--preset", "budget", "--models", "resnet10", "--data", "{folder}", "--cache-dir",
                            "{cache}", "--prepare-size", "32", "--img-size", "32", "--train-sizes", "", "--out",
                            "{root}/t"], ["unknown model 'resnet10'"]),
    ("tune-reversed-range", ["tune", "--config", "{root}/badtune.toml", "--data", "{folder}", "--out", "{root}/t"],
     ["badtune.toml: [tune] lr = [0.1, 0.01]", "need 0 < low < high"]),
    ("tune-unknown-key", ["tune", "--config", "{root}/tunekey.toml", "--data", "{folder}", "--out", "{root}/t"],
     ["tunekey.toml: unknown [tune] key(s) budget"]),
    ("compare-budget-zero", [*COMPARE, "--compute-budget", "0", *NEW], ["--compute-budget '0'", "positive number"]),
    ("sweep-budget-text", ["sweep", "--preset", "smoke", "--model", "resnet9", "--grid", "width=4,8",
                           "--compute-budget", "big", "--out", "{root}/s"], ["--compute-budget 'big'"]),
    ("train-budget-huge", [*TRAIN, "--compute-budget", "1e30", *NEW], ["--compute-budget", "need a value in"]),
    ("train-channels-last-word", [*TRAIN, "--channels-last", "sometimes", *NEW], ["--channels-last 'sometimes'"]),
    ("train-fast-kernels-number", [*TRAIN, "--fast-kernels", "2", *NEW], ["--fast-kernels '2'", "true or false or auto"]),
    ("bench-fast-kernels", ["bench", "--model", "resnet9", "--fast-kernels", "x"], ["--fast-kernels 'x'"]),
    ("bench-cap-text", ["bench", "--model", "resnet9", "--cap", "x"], ["--cap 'x'", "finite number"]),
    ("eval-output-symlink", ["eval", "{run}", "--output", "{root}/link.json"], ["--output", "is a symbolic link"]),
    ("eval-output-fifo", ["eval", "{run}", "--output", "{root}/fifo"], ["--output", "is a FIFO"]),
    ("eval-output-study", ["eval", "{run}", "--output", "{study}/eval.json"], ["--output", "inside the study folder"]),
    ("compare-budgets-text", [*COMPARE, "--budgets", "5T,lots", *NEW], ["--budgets '5T,lots'"]),
    ("compare-budgets-and-epochs", [*COMPARE, "--budgets", "1G", "--epochs", "2", *NEW],
     ["--budgets (1G) give every run its compute budget", "--budgets none"]),
    ("tune-epochs", ["tune", "--epochs", "3", "--out", "{root}/t"], ["drop --epochs / --compute-budget"]),
    ("compare-plan-batch-too-big", [*COMPARE, "--batch-size", "1000", "--plan", *NEW],
     ["--batch-size 1000: more than the", "training images"]),
    ("train-md5-folder", [*TRAIN, "--md5", "0" * 32, *NEW], ["--md5 checks an archive", "is a folder"]),
    ("bench-channels-last", ["bench", "--model", "resnet9", "--channels-last", "maybe"],
     ["--channels-last 'maybe'", "true or false or auto"]),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_naming_it_and_changes_nothing(ctx, capsys, name, argv, words):
    before = snapshot(ctx.run, ctx.study)
    args = [a.format(**{k: ctx[k] for k in ("root", "folder", "run", "study", "cache")}) for a in argv]
    code = main(args)
    _out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert code == 2, (name, err)
    assert len(lines) == 1 and lines[0].startswith(f"patchbench {args[0]}: error: "), err
    assert err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(ctx.run, ctx.study) == before
    assert not (ctx.root / "new" / "config.json").exists()


def test_the_table_covers_every_command():
    from patchbench.commands import COMMANDS

    assert {c[1][0] for c in CASES} >= {m.__name__.rsplit(".", 1)[1].replace("evaluate", "eval") for m in COMMANDS}
    assert {c[1][0] for c in CASES} >= {"models", "data", "train", "eval", "predict", "compare", "sweep", "ablate",
                                         "tune", "report", "bench"}


def test_an_internal_bug_shows_its_traceback_not_a_user_error(monkeypatch):
    """Only UserError is the user's: a ValueError from our own code propagates (exit 1, with a traceback)."""
    from patchbench.commands import models as models_cmd

    def broken(args):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(models_cmd, "run", broken)
    with pytest.raises(ValueError, match="a bug of ours"):
        main(["models"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu(ctx, capsys):
    assert main(["eval", str(ctx.run), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is visible here; use --device cpu" in capsys.readouterr().err
