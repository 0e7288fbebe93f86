"""Parsing the study commands' own values: names, seeds, counts with SI suffixes, a grid of overrides."""

from __future__ import annotations

import re

from patchbench.errors import UserError


def parse_names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"{what} {text!r} is empty; give a comma-separated list")
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in parse_names(text, "--seeds")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if min(seeds) < 0 or max(seeds) > 2**32 - 1:
        raise UserError(f"--seeds {text!r}: seeds must be whole numbers in [0, 4294967295]")
    return seeds


def parse_budget(text: str, flag: str = "--param-budget") -> int:
    """'1.0M', '800K', '1500000' -> a count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{flag} {text!r}: give a positive count such as 1.0M, 800K or 1500000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return round(float(m.group(1)) * scale)


def parse_grid(text: str) -> dict[str, list[str]]:
    """'patch_size=2,4,8 kernel_size=3,5' -> {"patch_size": ["2", "4", "8"], "kernel_size": ["3", "5"]}.

    The values stay text here; `typed_grid` types them by the model's constructor signature."""
    grid: dict[str, list] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not key.isidentifier() or not values.strip(","):
            raise UserError(f"--grid item {item!r}: write KEY=V1,V2,... (space-separated items), "
                            f"e.g. 'patch_size=2,4,8 kernel_size=3,5,7,9'")
        if key in grid:
            raise UserError(f"--grid names {key!r} twice; give each key once")
        grid[key] = list(dict.fromkeys(v.strip() for v in values.split(",") if v.strip()))
    if not grid:
        raise UserError("--grid is empty; e.g. --grid 'patch_size=2,4,8 kernel_size=3,5,7,9'")
    return grid


def parse_budgets(text: str | None) -> list[float] | None:
    """'5T,10T,20T' -> [5e12, 1e13, 2e13]; [] for 'none' (no budgets, not even a preset's); None when not given."""
    from patchbench.values import SI, coerce

    if text is None:
        return None
    return [] if text.strip().lower() == "none" else sorted(set(coerce(text, list[SI], "--budgets")))
