"""Recipes: the built-in presets and `--config` files, and how a run's config is built from them.

A run's config is built in layers, each overriding the one before:

    dataclass defaults  <  preset (--preset)  <  config file (--config FILE.toml)  <  flags

A preset and a config file are both `Recipe`s, read from TOML files of the same shape (the built-in
presets are `patchbench/presets/*.toml`): `[data]` and `[train]` tables of settings, `[models.NAME]`
tables of per-model settings (`train`, `data`, and `overrides` for the model's constructor), and
for a preset its `name`, `description`, `models` and `quirks`. A config file may also name a base
`preset` and hold a `[model]` table (`name`, `overrides`): that is what `train --dump-config` prints
(`to_toml`), the fully resolved config, which `--config` reads back to the same run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from patchbench.config import (
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_changes,
    check_setting,
    current_name,
    fields_of,
)
from patchbench.errors import UserError
from patchbench.values import SI, coerce

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
            cfg.model = ModelConfig(name=current_name(self.model["name"]), overrides=dict(cfg.model.overrides))
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
        return coerce(doc[key], kind, f"{where}: {key}") if key in doc else None

    for section, cls in SECTIONS.items():
        if section in doc and not isinstance(doc[section], dict):
            raise UserError(f"{where}: [{section}] must be a table of settings")
        apply_changes(cls(), doc.get(section, {}), section, where)  # checks every value now
    per_model = {current_name(k, "model"): v for k, v in (typed("per_model", dict) or {}).items()}
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
        reference = {current_name(k, "model"): v for k, v in reference.items()}
        for key, entry in reference.items():
            if key != "source" and not (isinstance(entry, dict) and set(entry) <= {"final", "best"}
                                        and all(isinstance(v, (int, float)) for v in entry.values())):
                raise UserError(f"{where}: [reference.{key}] holds final and best top-1 fractions, e.g. final = 0.808")
    return Recipe(name=typed("name", str), description=typed("description", str) or "",
                  models=[current_name(m, "model") for m in typed("models", list[str]) or []], quirks=typed("quirks", list[str]),
                  data=dict(doc.get("data", {})), train=dict(doc.get("train", {})), per_model=per_model,
                  model=model, preset=current_name(typed("preset", str), "preset"), param_budget=budget, reference=reference,
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


PRESET_ORDER = ("notebook", "study160", "quick", "smoke", "fair")
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
    name = current_name(name, "preset")
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
    name = current_name(model or named, "model")
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


def to_toml(cfg: RunConfig) -> str:
    """The fully resolved config as a TOML recipe that `--config` reads back to the same config."""
    def plain(value):  # TOML has no null: "none" reads back as None for every optional setting
        if value is None:
            return "none"
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    doc = {**({"preset": cfg.preset} if cfg.preset else {}), "quirks": list(cfg.quirks),
           "model": {"name": cfg.model.name, "overrides": plain(cfg.model.overrides)},
           **{section: {name: plain(getattr(getattr(cfg, section), name)) for name in fields_of(section)}
              for section in SECTIONS}}
    return "# patchbench run config: `patchbench train --config FILE` reads it back\n\n" + tomli_w.dumps(doc)
