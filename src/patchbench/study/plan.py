"""Planning a study: its runs (a name and a full config each), from the recipe layers, models, seeds,
compute budgets or a grid of model overrides."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from patchbench.compute import macs_tag
from patchbench.config import RunConfig
from patchbench.errors import UserError
from patchbench.models import check_overrides
from patchbench.recipes import Recipe, build_config
from patchbench.study.budget import model_params


def typed_grid(model: str, grid: dict[str, list]) -> dict[str, list]:
    """Each grid value typed and checked against `model`'s constructor (UserError naming the key)."""
    return {key: list(dict.fromkeys(check_overrides(model, {key: v}, "--grid")[key] for v in values))
            for key, values in grid.items()}


@dataclass
class PlannedRun:
    name: str  # directory name under STUDY/runs/
    config: RunConfig


def run_name(model: str, seed: int, cell: dict | None = None) -> str:
    parts = [model, *(f"{k}={v}" for k, v in (cell or {}).items()), f"s{seed}"]
    return "-".join(parts)


@dataclass(frozen=True)
class RecipeLayers:
    """The recipe of a study: preset < config file < flags (`changes`), applied to every run."""

    preset: Recipe | None = None
    config: Recipe | None = None
    changes: dict[str, dict] | None = None

    def config_for(self, model: str, seed: int | None = None, overrides: dict | None = None) -> RunConfig:
        return build_config(model, preset=self.preset, config=self.config, changes=self.changes,
                            overrides=overrides, seed=seed)

    def _lookup(self, attr: str):
        """The recipe setting `attr`: the config file's, else the preset's (each with its base presets)."""
        for recipe in (self.config, self.preset):
            if recipe is not None and recipe.inherited(attr):
                return recipe.inherited(attr)
        return None

    @property
    def param_budget(self) -> int | None:
        return self._lookup("param_budget")

    @property
    def budgets(self) -> list[float] | None:
        return self._lookup("budgets")

    @property
    def reference(self) -> dict | None:
        return self._lookup("reference")


def plan_compare(models: list[str], seeds: list[int], layers: RecipeLayers, chosen: dict[str, dict] | None = None,
                 budgets: list[float] | None = None) -> list[PlannedRun]:
    """Seed-major order, so the first seed of every model finishes before the second starts; with compute
    `budgets`, every (model, seed) at each budget as a run of its own (`<model>-budget=5T-s0`), the smallest
    budgets first."""
    chosen = chosen or {}
    if not budgets:
        return [PlannedRun(run_name(m, s), layers.config_for(m, s, chosen.get(m))) for s in seeds for m in models]
    plan = []
    for s in seeds:
        for b in sorted(budgets):
            for m in models:
                cfg = layers.config_for(m, s, chosen.get(m))
                cfg.train = dataclasses.replace(cfg.train, compute_budget=b)
                plan.append(PlannedRun(run_name(m, s, {"budget": macs_tag(b)}), cfg))
    return plan


def grid_cells(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def check_cells(model: str, cells: list[dict], base: dict, *, num_classes: int, img_size: int) -> None:
    """Build every cell (over the recipe's overrides `base`) on the meta device first, so a bad grid fails
    before any training."""
    for cell in cells:
        try:
            model_params(model, num_classes=num_classes, img_size=img_size, **{**base, **cell})
        except UserError as e:
            raise UserError(f"--grid cell {cell} does not build {model} at {img_size}px: "
                            f"{str(e).splitlines()[0]}") from None


def plan_sweep(model: str, grid: dict[str, list], seeds: list[int], layers: RecipeLayers) -> list[PlannedRun]:
    return [PlannedRun(run_name(model, s, cell), layers.config_for(model, s, cell))
            for s in seeds for cell in grid_cells(grid)]
