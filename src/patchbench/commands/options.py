"""The flags `train`, `compare` and `sweep` share, built once from the config fields (config.py).

Every field of DataConfig and TrainConfig is a flag (`--epochs`, `--batch-size`, `--data`, ...),
with the help text, type and bounds written on the field; a bool is `--x/--no-x`, and a switch that
may be left to the machine (`config.Switch`) is `--x [true|false|auto]/--no-x`. A flag given to
`compare` or `sweep` applies to every run of the study. Values are parsed by `patchbench.values`
(the same parser TOML recipes and `--model-arg` go through) and checked against the field's bounds,
so a bad value is a one-line error naming the flag.
"""

from __future__ import annotations

import argparse

from patchbench.config import (
    SECTIONS,
    Switch,
    check_setting,
    describe_setting,
    fields_of,
)
from patchbench.errors import UserError
from patchbench.recipes import load_recipe
from patchbench.values import coerce


def _dest(section: str, name: str) -> str:
    return f"cfg.{section}.{name}"


def add_recipe_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """--config FILE.toml and one flag per data/train setting (all default to "not given")."""
    parser.add_argument("--config", metavar="FILE.toml", help="a recipe file (the shape of "
                        "`patchbench train --dump-config`'s output): applied over the preset, under the flags")
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} settings (override the preset and --config)")
        for f in fields_of(section).values():
            if not f.cli or f.name in exclude:
                continue
            if f.kind is bool:
                group.add_argument(f.flag, dest=_dest(section, f.name), default=None,
                                   action=argparse.BooleanOptionalAction, help=describe_setting(f))
            elif f.kind == Switch:
                group.add_argument(f.flag, dest=_dest(section, f.name), default=None, nargs="?", const="true",
                                   metavar="true|false|auto", help=describe_setting(f))
                group.add_argument("--no-" + f.flag[2:], dest=_dest(section, f.name), action="store_const",
                                   const="false", help=argparse.SUPPRESS)
            else:
                group.add_argument(f.flag, dest=_dest(section, f.name), default=None, metavar="V",
                                   help=describe_setting(f))


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """--progress/--no-progress, the same spelling in every command (--quiet is an alias of --no-progress)."""
    parser.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                        help="progress bars and per-epoch lines on stderr (default: on)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help=argparse.SUPPRESS)


def recipe_changes(args: argparse.Namespace, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{"data": {...}, "train": {...}}: the settings given as flags, typed and checked."""
    changes: dict[str, dict] = {section: {} for section in SECTIONS}
    for section in SECTIONS:
        for f in fields_of(section).values():
            if f.name in exclude:
                continue
            value = getattr(args, _dest(section, f.name), None)
            if value is None:
                continue
            if isinstance(value, str):
                value = coerce(value, f.kind, f.flag)
            changes[section][f.name] = check_setting(f, value)
    if {"epochs", "compute_budget"} <= set(changes["train"]) and changes["train"]["compute_budget"]:
        raise UserError("--epochs and --compute-budget both given; a run is as long as one of them says: drop one")
    return changes


def config_file(args: argparse.Namespace):
    """The --config recipe, its [per_model.NAME] tables checked against the registered models."""
    if not getattr(args, "config", None):
        return None
    recipe = load_recipe(args.config)
    if recipe.per_model or (recipe.model or {}).get("overrides"):
        from patchbench.models import check_overrides, list_models

        unknown = sorted(set(recipe.per_model) - set(list_models()))
        if unknown:
            raise UserError(f"--config {args.config}: [per_model.{unknown[0]}] names no registered model; check "
                            f"the spelling (`patchbench models` lists them)")
        for name, tables in recipe.per_model.items():  # constructor arguments: named with their file and table
            check_overrides(name, tables.get("overrides", {}), f"--config {args.config}: [per_model.{name}.overrides]")
        if recipe.model and recipe.model.get("name") in list_models():
            check_overrides(recipe.model["name"], recipe.model.get("overrides", {}),
                            f"--config {args.config}: [model.overrides]")
    return recipe
