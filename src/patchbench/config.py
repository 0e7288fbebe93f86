"""Configuration as data: the dataclasses saved with every run, recipes (presets and config files).

A run is fully described by a `RunConfig` (model + data + train), written to `RUN_DIR/config.json`
and read back with `RunConfig.from_dict`, so a run directory alone reproduces the run.

Every setting is written once, here, as a dataclass field with its metadata: help text, the flag
that sets it (default `--field-name`), its bounds, and whether a resumed run may change it. The
command line (`commands/options.py`), TOML recipes and validation are all built from these fields,
and values go through one parser per type (`patchbench.values`).

A run's config is built in layers, each overriding the one before:

    dataclass defaults  <  preset (--preset)  <  config file (--config FILE.toml)  <  flags

A preset and a config file are both `Recipe`s, read from TOML files of the same shape (the built-in
presets are `patchbench/presets/*.toml`): `[data]` and `[train]` tables of settings, `[models.NAME]`
tables of per-model settings (`train`, `data`, and `overrides` for the model's constructor), and
for a preset its `name`, `description`, `models` and `quirks`. A config file may also name a base
`preset` and hold a `[model]` table (`name`, `overrides`): that is what `train --dump-config` prints,
the fully resolved config, which `--config` reads back to the same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from patchbench.compute import split_sizes
from patchbench.device import check_device_name
from patchbench.errors import UserError
from patchbench.values import SI, check_value, describe

SCHEDULES = ("onecycle", "piecewise", "constant")
INITS = ("default", "kaiming")
AMPS = ("auto", "none", "bf16", "fp16")
Switch = bool | Literal["auto"]  # a speed setting that may be left to the machine (patchbench.autotune)
AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # what the study's notebook normalised with
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

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
    schedule: Literal["onecycle", "piecewise", "constant"] = setting(
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
    value = check_value(value, f.kind, what)
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
        return cls(model=ModelConfig(name=model.get("name", ModelConfig.name), overrides=dict(model.get("overrides", {}))),
                   data=sections["data"], train=sections["train"], preset=d.get("preset"),
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


# --------------------------------------------------------------------------------------------------
# Recipes: presets and config files


TOP_KEYS = ("name", "description", "models", "quirks", "preset", "model", "data", "train", "per_model",
            "param_budget", "reference", "tune", "budgets")
PER_MODEL_KEYS = ("data", "train", "overrides")


@dataclass
class Recipe:
    """A layer of settings over the defaults: a built-in preset or a `--config` file.

    `data` and `train` hold only the settings the recipe sets; `per_model[NAME]` may hold `data`,
    `train` and `overrides` (constructor arguments) for one model; `model` ({name, overrides}) and
    `preset` (a base preset applied first) come from config files.
    """

    name: str | None = None
    description: str = ""
    models: list[str] = field(default_factory=list)
    quirks: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, dict]] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    preset: str | None = None
    param_budget: int | None = None  # compare/ablate: size every model to this many parameters (±5%)
    reference: dict[str, Any] | None = None  # published figures to set the study's against (report)
    tune: dict[str, Any] | None = None  # the search `patchbench tune` runs (patchbench.study.search.check_space)
    budgets: list[float] | None = None  # compare: train every (model, seed) at each of these compute budgets
    where: str = "recipe"  # the file it came from, for messages

    def apply(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with this recipe's settings on top (its per-model settings for cfg's model included).

        Model overrides stack: earlier layers, then this recipe's per-model `overrides`, then its [model].
        A recipe based on another preset (`preset = "name"`) applies that one first."""
        if self.preset and self.preset != self.name:
            cfg = get_preset(self.preset).apply(cfg)
        if self.model and self.model.get("name"):
            cfg.model = ModelConfig(name=self.model["name"], overrides=dict(cfg.model.overrides))
        mine = self.per_model.get(cfg.model.name, {})
        cfg.model.overrides = {**cfg.model.overrides, **mine.get("overrides", {}),
                               **(self.model or {}).get("overrides", {})}
        cfg.data = apply_changes(apply_changes(cfg.data, self.data, "data", self.where),
                                 mine.get("data", {}), "data", self.where)
        cfg.train = apply_changes(apply_changes(cfg.train, self.train, "train", self.where),
                                  mine.get("train", {}), "train", self.where)
        if self.name:
            cfg.preset = self.name
        elif self.preset:
            cfg.preset = self.preset
        if self.quirks is not None:
            cfg.quirks = list(self.quirks)
        return cfg

    def config_for(self, model: str, seed: int | None = None, **overrides: Any) -> RunConfig:
        """The defaults with this recipe on top, for `model` (and `seed`, and constructor `overrides`)."""
        return build_config(model, preset=self, seed=seed, overrides=overrides)

    @property
    def data_config(self) -> DataConfig:
        return apply_changes(DataConfig(), self.data, "data", self.where)

    @property
    def train_config(self) -> TrainConfig:
        return apply_changes(TrainConfig(), self.train, "train", self.where)

    def inherited(self, attr: str):
        """This recipe's `attr`, or its base preset's when it sets none."""
        own = getattr(self, attr)
        if own or not self.preset or self.preset == self.name:
            return own
        return get_preset(self.preset).inherited(attr)

    def model_overrides(self, model: str) -> dict[str, Any]:
        return dict(self.per_model.get(model, {}).get("overrides", {}))


def parse_recipe(doc: dict, where: str) -> Recipe:
    """A Recipe from a parsed TOML document; unknown keys and values of the wrong type name `where`."""
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; a recipe holds {', '.join(TOP_KEYS)}")

    def typed(key, kind):
        return check_value(doc[key], kind, f"{where}: {key}") if key in doc else None

    for section, cls in SECTIONS.items():
        if section in doc and not isinstance(doc[section], dict):
            raise UserError(f"{where}: [{section}] must be a table of settings")
        apply_changes(cls(), doc.get(section, {}), section, where)  # checks every value now
    per_model = typed("per_model", dict) or {}
    for name, tables in per_model.items():
        if not isinstance(tables, dict) or set(tables) - set(PER_MODEL_KEYS):
            raise UserError(f"{where}: [per_model.{name}] may hold only {', '.join(PER_MODEL_KEYS)} tables")
        for section, cls in SECTIONS.items():
            apply_changes(cls(), tables.get(section, {}), section, f"{where} [per_model.{name}]")
        if not isinstance(tables.get("overrides", {}), dict):
            raise UserError(f"{where}: [per_model.{name}.overrides] must be a table of constructor arguments")
    model = typed("model", dict)
    if model is not None and (set(model) - {"name", "overrides"} or not isinstance(model.get("name", ""), str)
                              or not isinstance(model.get("overrides", {}), dict)):
        raise UserError(f"{where}: [model] holds a name and an [model.overrides] table, nothing else")
    budget = typed("param_budget", int)
    if budget is not None and budget < 1:
        raise UserError(f"{where}: param_budget = {budget}: need a positive number of parameters")
    reference = typed("reference", dict)
    if reference is not None:
        for key, entry in reference.items():
            if key != "source" and not (isinstance(entry, dict) and set(entry) <= {"final", "best"}
                                        and all(isinstance(v, (int, float)) for v in entry.values())):
                raise UserError(f"{where}: [reference.{key}] holds final and best top-1 fractions, e.g. final = 0.808")
    return Recipe(name=typed("name", str), description=typed("description", str) or "",
                  models=typed("models", list[str]) or [], quirks=typed("quirks", list[str]),
                  data=dict(doc.get("data", {})), train=dict(doc.get("train", {})), per_model=per_model,
                  model=model, preset=typed("preset", str), param_budget=budget, reference=reference,
                  tune=typed("tune", dict), budgets=typed("budgets", list[SI]), where=where)


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe (a `--config` file or a preset file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--config {path}: is a folder; give a .toml file") from None
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from None
    return parse_recipe(doc, str(path))


PRESET_ORDER = ("seed", "study160", "quick", "smoke", "fair")
_PRESETS: dict[str, Recipe] = {}


def _load_presets() -> dict[str, Recipe]:
    if not _PRESETS:
        folder = resources.files("patchbench") / "presets"
        found = {}
        for entry in folder.iterdir():
            if entry.name.endswith(".toml"):
                recipe = parse_recipe(tomllib.loads(entry.read_text()), f"preset {entry.name}")
                found[recipe.name or entry.name[:-5]] = recipe
        order = [n for n in PRESET_ORDER if n in found] + sorted(set(found) - set(PRESET_ORDER))
        _PRESETS.update({n: found[n] for n in order})
    return _PRESETS


def get_preset(name: str) -> Recipe:
    presets = _load_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


def list_presets() -> list[str]:
    return list(_load_presets())


def build_config(model: str | None, *, preset: Recipe | None = None, config: Recipe | None = None,
                 changes: dict[str, dict] | None = None, overrides: dict | None = None,
                 seed: int | None = None) -> RunConfig:
    """defaults < preset < config file < flags (`changes`: {"data": {...}, "train": {...}}) < `overrides`.

    `model` may be None when the config file's [model] names it. A config file that names a base
    preset gets it applied first, unless a different --preset was given (an error)."""
    if config is not None and config.preset and preset is not None and preset.name != config.preset:
        raise UserError(f"--config {config.where} is based on preset {config.preset!r}, but --preset "
                        f"{preset.name} was given; drop one of them")
    named = (config.model or {}).get("name") if config is not None else None
    if model and named and model != named:
        raise UserError(f"--model {model}, but --config {config.where} is a config of {named}; drop one of them")
    name = model or named
    if not name:
        raise UserError("--model is required (see `patchbench models`), or a [model] name in --config")
    cfg = RunConfig(model=ModelConfig(name=name))
    for layer in (preset, config):
        if layer is not None:
            cfg = layer.apply(cfg)
    for section, values in (changes or {}).items():
        setattr(cfg, section, apply_changes(getattr(cfg, section), values, section))
    if overrides:
        cfg.model.overrides = {**cfg.model.overrides, **overrides}
    if seed is not None:
        cfg.train = dataclasses.replace(cfg.train, seed=check_setting(fields_of("train")["seed"], seed, "--seeds"))
    return cfg


# --------------------------------------------------------------------------------------------------
# Writing a config as TOML (tomllib only reads)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'  # TOML has no null; "none" reads back as None for every optional setting
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value} as TOML")
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(cfg: RunConfig) -> str:
    """The fully resolved config as a TOML recipe that `--config` reads back to the same config."""
    lines = ["# patchbench run config: `patchbench train --config FILE` reads it back", ""]
    if cfg.preset:
        lines.append(f"preset = {_toml_value(cfg.preset)}")
    lines.append(f"quirks = {_toml_value(cfg.quirks)}")
    lines += ["", "[model]", f"name = {_toml_value(cfg.model.name)}", "", "[model.overrides]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in cfg.model.overrides.items()]
    for section in SECTIONS:
        obj = getattr(cfg, section)
        lines += ["", f"[{section}]"]
        lines += [f"{name} = {_toml_value(getattr(obj, name))}" for name in fields_of(section)]
    return "\n".join(lines) + "\n"


def model_label(name: str, overrides: dict[str, Any]) -> str:
    """A model's name with the constructor arguments that make it what it is, e.g.
    `convmixer_256_8(dim=128, depth=6)`; the image size (a property of the data) is left out."""
    shown = {k: v for k, v in overrides.items() if k != "img_size"}
    if not shown:
        return name
    def short(v):
        return "(" + ",".join(map(str, v)) + ")" if isinstance(v, (list, tuple)) else f"{v:g}" \
            if isinstance(v, float) else str(v)
    return f"{name}(" + ", ".join(f"{k}={short(v)}" for k, v in shown.items()) + ")"


def describe_setting(f: Field) -> str:
    """Help text with the type and the default, for --help and docs."""
    default = f.default
    shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{f.help} ({describe(f.kind)}; default {shown})".replace("%", "%%")
