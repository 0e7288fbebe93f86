"""Configuration as data: the dataclasses saved with every run, each setting with its metadata.

A run is fully described by a `RunConfig` (model + data + train), written to `RUN_DIR/config.json`
and read back with `RunConfig.from_dict`, so a run directory alone reproduces the run.

Every setting is written once, here, as a dataclass field with its metadata: help text, the flag
that sets it (default `--field-name`), its bounds, and whether a resumed run may change it. The
command line (`commands/options.py`), TOML recipes and validation are all built from these fields,
and values go through one coercion (`patchbench.values.coerce`).

A run's config is built in layers (`patchbench.recipes`): dataclass defaults < preset < config file
< flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from patchbench.compute import split_sizes
from patchbench.device import check_device_name
from patchbench.errors import UserError
from patchbench.values import SI, coerce, describe_kind

Schedule = Literal["onecycle", "piecewise", "constant"]
SCHEDULES = typing.get_args(Schedule)
Switch = bool | Literal["auto"]  # a speed setting that may be left to the machine (patchbench.autotune)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # what the study's notebook normalised with
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# Names of the previous release, still read (run directories, config files) and accepted with a
# warning until the next one: the study notebook's preset and models were called "seed".
RENAMED = {"seed": "notebook", "seed_convmixer": "notebook_convmixer", "seed_vit": "notebook_vit",
           "seed_resnet9": "notebook_resnet9"}


def current_name(name, what: str | None = None):
    """The current name for `name` (a preset or model name); with `what` ("preset", "model") a renamed
    one is accepted with a FutureWarning saying the new name."""
    if not isinstance(name, str) or name not in RENAMED:
        return name
    if what:
        warnings.warn(f"the {what} {name!r} is now called {RENAMED[name]!r}; the old name still works in this "
                      f"release only", FutureWarning, stacklevel=3)
    return RENAMED[name]


MAX_SIZE = 4096  # pixels: larger is a typo, not an image


def default_cache_dir() -> Path:
    """$PATCHBENCH_CACHE, else $XDG_CACHE_HOME/patchbench, else ~/.cache/patchbench."""
    if os.environ.get("PATCHBENCH_CACHE"):
        return Path(os.environ["PATCHBENCH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "patchbench"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder a DataConfig.cache_dir names (None: the default)."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def setting(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, check=None,
            resumable: bool = False, cli: bool = True, default_factory=dataclasses.MISSING):
    """A config field with its help text, flag, bounds `check` = (predicate, what it needs) and
    whether resuming may change it; `cli=False` keeps it off the command line."""
    meta = {"help": help, "flag": flag, "check": check, "resumable": resumable, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def between(lo, hi, *, lo_open: bool = False, hi_open: bool = False):
    """A bounds check lo <= v <= hi (or < with the open ends), applied to every item of a tuple."""
    def ok(v):
        items = v if isinstance(v, tuple) else (v,)
        return all((lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi) for x in items)
    need = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, f"a value in {need}"


def ordered_pair(lo, hi):
    ok, _ = between(lo, hi, lo_open=True)
    return (lambda v: ok(v) and v[0] <= v[1]), f"MIN,MAX with {lo:g} < MIN <= MAX <= {hi:g}"


@dataclass
class DataConfig:
    """Where the images come from and how a batch is made from them."""

    source: str = setting("imagenette-160", "dataset: registered name, archive (.tgz/.tar/.zip) or image folder",
                          flag="--data", resumable=True)
    md5: str | None = setting(None, "expected MD5 of a local --data archive", resumable=True,
                              check=(lambda v: re.fullmatch(r"[0-9a-fA-F]{32}", v) is not None,
                                     "32 hexadecimal digits"))
    cache_dir: str | None = setting(None, "dataset cache folder (default: $PATCHBENCH_CACHE, else "
                                    "$XDG_CACHE_HOME/patchbench, else ~/.cache/patchbench)", resumable=True)
    prepare_size: int = setting(160, "size the images are decoded and cached at (shorter side, centre crop)",
                                check=between(1, MAX_SIZE))
    img_size: int = setting(160, "the evaluation image size (and the training size unless --train-sizes)",
                            check=between(1, MAX_SIZE))
    train_sizes: tuple[int, ...] = setting(
        (), "training image sizes, one per equal share of the epochs (progressive resizing), e.g. 96,128,160; "
        "empty: --img-size", check=between(1, MAX_SIZE))
    # training augmentation: per-sample random-resized-crop (torchvision semantics) + flip
    scale: tuple[float, float] = setting((0.35, 1.0), "random-resized-crop area range MIN,MAX",
                                         check=ordered_pair(0, 1))
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "random-resized-crop aspect range MIN,MAX",
                                         check=ordered_pair(0, 100))
    hflip: bool = setting(True, "random horizontal flips")
    auto_augment: Literal["none", "trivialaugment", "randaugment"] = setting(
        "none", "per-sample colour and affine ops (torchvision's TrivialAugmentWide or RandAugment)")
    randaugment_ops: int = setting(2, "RandAugment: ops per image", check=between(1, 16))
    randaugment_magnitude: int = setting(9, "RandAugment: magnitude bin (0-30)", check=between(0, 30))
    random_erasing: float = setting(0.0, "probability of erasing a random rectangle (torchvision RandomErasing)",
                                    check=between(0, 1))
    mixup: float = setting(0.0, "mixup alpha (0: off)", check=between(0, 100))
    cutmix: float = setting(0.0, "cutmix alpha (0: off; with --mixup, each batch uses one of the two)",
                            check=between(0, 100))
    holdout: float = setting(0.0, "carve this fraction of train out (class-stratified) and evaluate on it "
                             "instead of the val split: tune recipes here, never on val", check=between(0, 0.5))
    holdout_seed: int = setting(0, "seed of the --holdout split (the same split for every training seed)",
                                check=between(0, 2**32 - 1))
    # evaluation: deterministic centre crop keeping this fraction of the side, resized to img_size
    eval_crop: float = setting(1.0, "evaluation centre crop (fraction of the side)", check=between(0, 1, lo_open=True))
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, "normalisation mean per channel (R,G,B)",
                                               check=between(-10, 10))
    std: tuple[float, float, float] = setting(IMAGENET_STD, "normalisation std per channel (R,G,B)",
                                              check=between(0, 10, lo_open=True))


@dataclass
class ModelConfig:
    name: str = "convmixer_256_12"
    overrides: dict[str, Any] = field(default_factory=dict)  # keyword arguments for create_model


@dataclass
class TrainConfig:
    epochs: int = setting(30, "epochs to train (ignored with --compute-budget)", check=between(1, 10_000))
    compute_budget: SI | None = setting(
        None, "training compute in MACs, e.g. 40T (= 4.0e13): 3 x forward MACs (convolutions and matmuls) x "
        "images seen, progressive resizing included; the run trains the steps that spend it, whatever the model "
        "costs per image (instead of --epochs; --param-budget and --mac-budget size the model instead)",
        check=between(1, 1e21))
    batch_size: int = setting(64, "global batch size (split over DDP ranks)", check=between(1, 65_536))
    lr: float = setting(1e-3, "peak learning rate", check=between(0, 10, lo_open=True))
    weight_decay: float = setting(0.05, "AdamW weight decay (never on norms, biases, gains, cls token, "
                                  "position embedding)", check=between(0, 100))
    wd_conv_linear_only: bool = setting(False, "decay only nn.Conv2d/nn.Linear weights (the notebook's rule)")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", check=between(0, 1, hi_open=True))
    schedule: Schedule = setting(
        "onecycle", "onecycle (torch OneCycleLR shape) | piecewise (ConvMixer: 0 -> max at 40%% -> max/20 at "
        "80%% -> 0) | constant")
    schedule_epochs: int | None = setting(None, "size the schedule for this many epochs (default: exactly the run)",
                                          check=between(1, 10_000))
    pct_start: float = setting(0.3, "onecycle warm-up fraction", check=between(0, 1, lo_open=True, hi_open=True))
    cycle_momentum: bool = setting(False, "onecycle also cycles Adam's beta1 0.95 -> 0.85 -> 0.95 (torch's default)")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", check=between(0, 1, hi_open=True))
    grad_clip: float | None = setting(None, "max global gradient norm (none: off)",
                                      check=between(0, 1e6, lo_open=True))
    ema_decay: float | None = setting(None, "EMA decay of the weights, e.g. 0.999 (none: off); evaluated with "
                                      "the EMA weights", flag="--ema", check=between(0, 1, lo_open=True, hi_open=True))
    init: Literal["default", "kaiming"] = setting("default", "default | kaiming (the notebook's init)")
    amp: Literal["auto", "none", "bf16", "fp16"] = setting(
        "none", "mixed precision: none | bf16 | fp16 | auto (bf16 where the hardware computes it natively, else "
        "none; resolved once when a run or study is created, and kept on resume)")
    channels_last: Switch = setting("auto", "channels_last memory format: true | false | auto (whichever trains "
                                    "faster here, by a short cached probe)", resumable=True)
    compile: bool = setting(False, "torch.compile the model", resumable=True)
    fast_kernels: Switch = setting("auto", "CPU: patchbench.cpu's operators for ConvMixer's depthwise conv and GELU->BN "
                                   "(same function): true | false | auto (by the same probe)", resumable=True)
    sync_bn: bool = setting(False, "SyncBatchNorm across DDP ranks (GPU)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", resumable=True)
    data_on_device: Literal["auto", "yes", "no"] = setting(
        "auto", "hold the uint8 split on the device and crop with roi_align: auto (on GPUs, when it fits in a "
        "quarter of free memory) | yes (also on the CPU: the accelerator path, for testing it) | no")
    threads: int | None = setting(None, "torch CPU threads per process (none: adaptive, 1 or all cores, "
                                  "whichever trains faster now)", check=between(1, 1024), resumable=True)
    seed: int = setting(0, "seeds Python, NumPy, torch and the loader", check=between(0, 2**32 - 1))
    deterministic: bool = setting(False, "deterministic algorithms and a fixed thread count (exact resume on CPU)")
    log_every: int = setting(20, "steps between progress-bar/TensorBoard updates", check=between(1, 1_000_000),
                             resumable=True)
    fit_eval: int = setting(1000, "after each epoch, also score this many training images (a fixed subset) as "
                            "val is scored: eval mode, evaluation crop, no label smoothing, so that fit and "
                            "generalisation compare like with like (0: off)", check=between(0, 1_000_000),
                            resumable=True)


SECTIONS = {"data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Field:
    """One setting: where it lives, its type, default, help, flag, bounds and resume rule."""

    section: str
    name: str
    kind: Any
    default: Any
    help: str
    flag: str
    check: tuple | None
    resumable: bool
    cli: bool


_FIELDS: dict[str, dict[str, Field]] = {}


def fields_of(section: str) -> dict[str, Field]:
    """The settings of `section` ("data" or "train"), in declaration order."""
    if section not in _FIELDS:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = Field(section, f.name, hints[f.name], default, m.get("help", ""),
                                m.get("flag") or "--" + f.name.replace("_", "-"), m.get("check"),
                                m.get("resumable", False), m.get("cli", True))
        _FIELDS[section] = out
    return _FIELDS[section]


def check_setting(f: Field, value, what: str | None = None):
    """`value` as the setting's type and within its bounds, or UserError naming `what` (default: the flag)."""
    what = what or f.flag
    value = coerce(value, f.kind, what)
    if f.check is not None and value is not None:
        ok, need = f.check
        if not ok(value):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value
            raise UserError(f"{what} {shown}: need {need}")
    return value


def apply_changes(obj, changes: dict[str, Any], section: str, where: str | None = None):
    """A copy of the DataConfig/TrainConfig `obj` with `changes`, each checked (unknown keys are errors)."""
    known = fields_of(section)
    place = f"{where}: " if where else ""
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise UserError(f"{place}unknown [{section}] setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    checked = {k: check_setting(known[k], v, f"{where}: [{section}] {k}" if where else None)
               for k, v in changes.items()}
    if section == "train" and "epochs" in checked:  # a layer's epochs replace an earlier layer's budget
        checked.setdefault("compute_budget", None)
    return dataclasses.replace(obj, **checked)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None
    quirks: list[str] = field(default_factory=list)  # study flaws reproduced on purpose

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """From `to_dict()`'s output (a run's config.json); settings added since it was written take
        their defaults, so run directories of earlier versions still load."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: not a JSON object")
        model = d.get("model") or {}
        if not isinstance(model, dict) or not isinstance(model.get("name", ""), str) \
                or not isinstance(model.get("overrides", {}), dict):
            raise UserError(f"{where}: model must be an object with a name and overrides")
        sections = {}
        for section, cls_ in SECTIONS.items():
            values = d.get(section) or {}
            if not isinstance(values, dict):
                raise UserError(f"{where}: {section} must be an object, got {type(values).__name__}")
            sections[section] = apply_changes(cls_(), values, section, where)
        return cls(model=ModelConfig(name=current_name(model.get("name", ModelConfig.name)),
                                     overrides=dict(model.get("overrides", {}))),
                   data=sections["data"], train=sections["train"], preset=current_name(d.get("preset")),
                   quirks=list(d.get("quirks") or []))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> RunConfig:
        """Raise UserError naming the first impossible value and the flag that sets it."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in fields_of(section).values():
                check_setting(f, getattr(obj, f.name))
        t, d = self.train, self.data
        if t.compute_budget and t.schedule_epochs is not None:
            raise UserError("--schedule-epochs and --compute-budget: the schedule spans the steps the budget buys; "
                            "drop --schedule-epochs")
        if t.schedule_epochs is not None and t.schedule_epochs < t.epochs:
            raise UserError(f"--schedule-epochs {t.schedule_epochs}: need at least --epochs ({t.epochs}): "
                            f"the schedule must cover the run")
        for size in (d.img_size, *d.train_sizes):
            if size > d.prepare_size:
                flag = "--img-size" if size == d.img_size else "--train-sizes"
                raise UserError(f"{flag} {size}: need at most --prepare-size ({d.prepare_size}); raise "
                                f"--prepare-size to train larger")
        if len(d.train_sizes) > t.epochs and not t.compute_budget:
            raise UserError(f"--train-sizes has {len(d.train_sizes)} sizes for {t.epochs} epoch(s); give at "
                            f"most one size per epoch")
        check_device_name(t.device)
        return self

    def train_size(self, epoch: int) -> int:
        """The training image size of `epoch` (0-based) of an --epochs run: --train-sizes split evenly."""
        return split_sizes(self.data.train_sizes, self.data.img_size, self.train.epochs)[epoch]


def describe_setting(f: Field) -> str:
    """Help text with the type and the default, for --help and docs."""
    default = f.default
    shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{f.help} ({describe_kind(f.kind)}; default {shown})".replace("%", "%%")
