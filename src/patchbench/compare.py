"""Run a study: every (model, seed) or (sweep cell, seed) as a run directory under STUDY/runs/.

    plan = plan_compare(models, seeds=[0, 1, 2], preset=get_preset("quick"))
    run_study("studies/quick", plan, work=train_work(progress=True))   # trains what is missing

A study is idempotent: a finished run is skipped, an interrupted one resumes from its checkpoint
(`train_run(..., resume=True)`), so running the same command again does only what is missing.
Several processes, on one machine or many sharing the folder, can work on one study at once: a
worker takes a run only by creating its lock file `STUDY/locks/<run>.lock` with O_CREAT|O_EXCL,
refreshes the file's mtime while it trains (a heartbeat), and removes it when done. A lock whose
process is gone (same host, dead pid) or whose heartbeat stopped longer than `stale_after` seconds
ago is stale and is taken over.

Matched budgets (`match_budget`) size each family by its width argument so that the model has
`budget` parameters within ±5% at the study's image size and class count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from patchbench import rundir
from patchbench.compute import macs_tag
from patchbench.config import Recipe, RunConfig, build_config
from patchbench.errors import UserError
from patchbench.flops import count_macs, count_params
from patchbench.models import check_overrides, create_model, describe
from patchbench.train import TrainingDiverged, train_run

BUDGET_TOLERANCE = 0.05


# --------------------------------------------------------------------------------------------------
# Parsing command-line values


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


def typed_grid(model: str, grid: dict[str, list]) -> dict[str, list]:
    """Each grid value typed and checked against `model`'s constructor (UserError naming the key)."""
    return {key: list(dict.fromkeys(check_overrides(model, {key: v}, "--grid")[key] for v in values))
            for key, values in grid.items()}


# --------------------------------------------------------------------------------------------------
# Matched parameter budgets


def model_params(model: str, *, num_classes: int, img_size: int, **overrides) -> int:
    """Parameter count of `model` built with `overrides`, on the meta device (no memory, instant)."""
    with torch.device("meta"):
        return count_params(create_model(model, num_classes=num_classes, img_size=img_size, **overrides))


def model_macs(model: str, *, num_classes: int, img_size: int, **overrides) -> int:
    """MACs of one forward pass on one `img_size` image, counted on the meta device."""
    with torch.device("meta"):
        return count_macs(create_model(model, num_classes=num_classes, img_size=img_size, **overrides), img_size)


MEASURES = {"params": (model_params, "--param-budget", "parameters"), "macs": (model_macs, "--mac-budget", "MACs")}


def width_knob(model: str, *, num_classes: int, img_size: int,
               base: dict | None = None) -> tuple[str, int, Callable[[int], dict], str | None]:
    """(what is varied, its value in `base` in steps, width -> overrides, a finer knob or None), as the
    model's family declares it (`width()`): ConvMixer and the isotropic backbone `dim`, ResNets `width`,
    ViTs `dim` in steps of the head count with the MLP in proportion, then `mlp_dim` alone."""
    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, img_size=img_size, **(base or {}))
    if not hasattr(net, "width"):
        raise UserError(f"model {model!r} ({type(net).__name__}) declares no width to size for a budget; "
                        f"use a convmixer_*, vit_*, resnet* or iso_* model")
    w = net.width()  # each family declares its own (patchbench.models.layers.Width)
    return w.knob, w.value // w.step, w.overrides, w.fine


def _closest(params: Callable[[int], int], budget: int, start: int, limit: int) -> int:
    """The integer w in [1, limit] whose params(w) is closest to budget; params must grow with w."""
    lo, hi = 1, max(2, start)
    while params(hi) < budget and hi < limit:  # grow the bracket until it holds the budget
        lo, hi = hi, min(limit, hi * 2)
    while hi - lo > 1:  # params(lo) < budget <= params(hi), or lo == 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < budget else (lo, mid)
    return min((lo, hi), key=lambda w: abs(params(w) - budget))


def _aligned(count: Callable[[int], int], budget: int, w: int, tolerance: float,
             channels: Callable[[int], int], reach: int = 256) -> int:
    """Among the widths near `w` whose size is within `tolerance` of `budget`, the one whose channel count
    is a multiple of 16, else of 8 (the widths oneDNN's vector kernels and patchbench.kernels run
    fastest), else `w`; the closest to the budget among equals."""
    def within(v: int) -> bool:
        return v >= 1 and abs(count(v) - budget) <= tolerance * budget

    if not within(w):
        return w
    near = [w]
    for step in (-1, 1):
        v = w + step
        while abs(v - w) <= reach and within(v):
            near.append(v)
            v += step

    def rank(v: int) -> tuple:
        c = channels(v)
        return (0 if c % 16 == 0 else 1 if c % 8 == 0 else 2, abs(count(v) - budget))
    return min(near, key=rank)


def match_budget(model: str, budget: int, *, num_classes: int, img_size: int, base: dict | None = None,
                 tolerance: float = BUDGET_TOLERANCE, measure: str = "params") -> tuple[dict, int]:
    """(overrides, size): `base` (the preset's overrides: depth, patch size, ...) unchanged when it is
    within `tolerance` of `budget` already, else with the width whose size is closest. The size is the
    parameter count, or with measure="macs" the MACs of one forward pass at `img_size`.

    Within the tolerance, a width that is a multiple of 16 (else 8) channels is preferred to the closest
    one (`_aligned`). Raises UserError when even the closest width misses by more than `tolerance`.
    """
    size_of, flag, unit = MEASURES[measure]
    base = dict(base or {})
    knob, default, width_overrides, fine = width_knob(model, num_classes=num_classes, img_size=img_size, base=base)

    def overrides_for(w: int) -> dict:
        return {**base, **width_overrides(w)}

    def count(overrides: dict) -> int:
        return size_of(model, num_classes=num_classes, img_size=img_size, **overrides)

    if abs(count(base) - budget) <= tolerance * budget:
        return base, count(base)  # already within the budget: keep the model as designed (its width may be
        # chosen for speed, e.g. a multiple of 16 channels for patchbench.kernels)
    w = _closest(lambda v: count(overrides_for(v)), budget, default, 1 << 14)
    w = _aligned(lambda v: count(overrides_for(v)), budget, w, tolerance, lambda v: overrides_for(v)[knob])
    overrides = overrides_for(w)
    if fine and abs(count(overrides) - budget) > tolerance * budget:
        coarse = dict(overrides)
        fit = _closest(lambda v: count({**coarse, fine: v}), budget, coarse[fine], 1 << 16)
        overrides[fine] = _aligned(lambda v: count({**coarse, fine: v}), budget, fit, tolerance, lambda v: v)
    got = count(overrides)
    if abs(got - budget) > tolerance * budget:
        near = f"{knob}={overrides[knob]} has {got:,}"
        neighbour = w + 1 if got < budget else w - 1  # the width on the budget's other side
        if neighbour >= 1 and not fine:
            other = overrides_for(neighbour)
            near += f", {knob}={other[knob]} has {count(other):,}"
        raise UserError(f"{flag} {budget:,} is more than {tolerance:.0%} from every {model}: {near} "
                        f"{unit}; choose a budget near one of these")
    return overrides, got


# --------------------------------------------------------------------------------------------------
# Planning runs


@dataclass
class PlannedRun:
    name: str  # directory name under STUDY/runs/
    config: RunConfig


def run_name(model: str, seed: int, cell: dict | None = None) -> str:
    parts = [model, *(f"{k}={v}" for k, v in (cell or {}).items()), f"s{seed}"]
    return "-".join(parts)


@dataclass(frozen=True)
class Layers:
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


def plan_compare(models: list[str], seeds: list[int], layers: Layers, chosen: dict[str, dict] | None = None,
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


def plan_sweep(model: str, grid: dict[str, list], seeds: list[int], layers: Layers) -> list[PlannedRun]:
    return [PlannedRun(run_name(model, s, cell), layers.config_for(model, s, cell))
            for s in seeds for cell in grid_cells(grid)]


# --------------------------------------------------------------------------------------------------
# Run locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive claim on one run, shared through the file system (see the module docstring).

    acquire() never waits: it returns False when a live worker holds the run.
    """

    def __init__(self, path: str | os.PathLike, *, stale_after: float = 600.0):
        self.path = Path(path)
        self.stale_after = stale_after
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> tuple[dict | None, float] | None:
        """(the lock's JSON or None if unreadable, its mtime); None when there is no lock."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text), mtime
        except ValueError:
            return None, mtime  # being written right now, or its writer died mid-write

    def is_stale(self, info: dict | None, mtime: float) -> bool:
        if time.time() - mtime > self.stale_after:
            return True
        return bool(info) and info.get("host") == self.host and not _pid_alive(int(info.get("pid", -1)))

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._remove_if_stale():
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": self.host, "time": time.time()}, f)
            self._start_heartbeat()
            return True
        return False

    def _remove_if_stale(self) -> bool:
        """Remove a stale lock; True when the path is free now. Only one worker may judge at a time
        (a second lock, `.break`), so two workers cannot both remove it, one of them the new holder's."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker that died in these few lines leaves its file; clear it after a while
                if time.time() - breaker.stat().st_mtime > 30:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            return False
        try:
            held = self.holder()
            if held is None:
                return True
            if self.is_stale(*held):
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        interval = max(0.05, min(60.0, self.stale_after / 4))

        def beat():
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._stop.clear()
        self._beat = threading.Thread(target=beat, daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        held = self.holder()
        if held and held[0] and held[0].get("pid") == os.getpid() and held[0].get("host") == self.host:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Running a study


def train_work(progress: bool) -> Callable[[RunConfig, Path], None]:
    """The real work: train (or resume) one run."""
    def work(cfg: RunConfig, out: Path) -> None:
        train_run(cfg, out, resume=True, progress=progress)

    return work


def run_study(study: str | os.PathLike, plan: list[PlannedRun], *, work: Callable[[RunConfig, Path], None],
              progress: bool = True, stale_after: float = 600.0) -> dict[str, list[str]]:
    """Do every planned run that is not finished and not held by another worker.

    Returns run names by outcome: "trained", "done" (already finished), "held" (another worker has
    it), "failed" (diverged now or before; delete its folder to try again), "stopped" ("name: why" of a run
    that could not go on, e.g. a damaged checkpoint or a full disk: the study goes on with the others).
    """
    study = Path(study)
    outcome: dict[str, list[str]] = {"trained": [], "done": [], "held": [], "failed": [], "stopped": []}
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with tqdm(total=len(plan), desc="study", unit="run", disable=not progress, file=sys.stderr) as bar:
        for p in plan:
            out = study / rundir.RUNS / p.name
            status = rundir.run_status(out)
            if status in (rundir.FINISHED, rundir.FAILED):
                outcome["done" if status == rundir.FINISHED else "failed"].append(p.name)
                bar.update()
                continue
            lock = RunLock(study / rundir.LOCKS / f"{p.name}.lock", stale_after=stale_after)
            if not lock.acquire():
                held = lock.holder()
                who = f"{held[0].get('host')}:{held[0].get('pid')}" if held and held[0] else "another worker"
                say(f"{p.name}: taken by {who}, skipped")
                outcome["held"].append(p.name)
                bar.update()
                continue
            try:
                if rundir.run_status(out) == rundir.FINISHED:  # finished by another worker since we looked
                    outcome["done"].append(p.name)
                else:
                    bar.set_postfix_str(p.name)
                    say(f"{p.name}: {'resuming' if status != rundir.NEW else 'starting'}")
                    work(p.config, out)
                    outcome["trained"].append(p.name)
            except TrainingDiverged as e:
                say(f"{p.name}: failed ({e})")
                outcome["failed"].append(p.name)
            except UserError as e:  # this run cannot go on; the others may
                say(f"{p.name}: stopped: {e}")
                outcome["stopped"].append(f"{p.name}: {e}")
            finally:
                lock.release()
            bar.update()
    return outcome


# --------------------------------------------------------------------------------------------------
# study.json and samples.npz

STUDY_IDENTITY = ("preset", "data", "grid", "param_budget", "mac_budget", "overrides", "config_file", "kind",
                  "ablation")


def same_results(a: dict | None, b: dict | None) -> bool:
    """Whether two sets of flags given to a study differ only in settings that do not change results (those
    a resumed run may change: threads, cache folder, device, ...)."""
    from patchbench.config import fields_of

    def kept(flags):
        return {section: {k: v for k, v in (values or {}).items()
                          if not (k in fields_of(section) and fields_of(section)[k].resumable)}
                for section, values in (flags or {}).items() if section in ("data", "train")}

    return {k: v for k, v in kept(a).items() if v} == {k: v for k, v in kept(b).items() if v}


def write_study_json(study: Path, meta: dict) -> dict:
    """Create or extend study.json. Runs, models, seeds and chosen configurations accumulate; a study of
    another preset, data, grid, budget, config file or flags in the same folder is refused."""
    rundir.make_dir(study)
    path = study / rundir.STUDY
    if path.exists():
        old = rundir.read_json(path)
        if "overrides" in old and same_results(old["overrides"], meta.get("overrides")):
            meta["overrides"] = old["overrides"]  # other threads, cache folder or device: the same study
        for key in STUDY_IDENTITY:
            if key in old and old.get(key) != meta.get(key):
                raise UserError(f"{study} holds a study with {key}={json.dumps(old.get(key))}, not "
                                f"{json.dumps(meta.get(key))}; use another --out (or the same settings to extend it)")
        for key in ("models", "seeds", "runs"):
            meta[key] = list(dict.fromkeys([*old.get(key, []), *meta[key]]))
        if old.get("budgets") or meta.get("budgets"):  # a study may grow by budgets, as by seeds
            meta["budgets"] = sorted({*old.get("budgets", []), *meta.get("budgets", [])})
        for key in ("chosen", "chosen_params", "chosen_macs", "patch_sizes", "labels"):
            meta[key] = {**old.get(key, {}), **meta.get(key, {})}
        if old.get("notes"):  # written by hand: what the numbers mean (the report shows them)
            meta["notes"] = old["notes"]
    rundir.atomic_write_json(path, meta)
    return meta


def write_samples(study: Path, data, n: int = 4) -> Path:
    """samples.npz: the first val image of `n` evenly spaced classes, at the prepared size."""
    labels = np.asarray(data.val.labels)
    classes = sorted({int(c) for c in np.linspace(0, len(data.classes) - 1, n).round()})
    idx = [int(np.flatnonzero(labels == c)[0]) for c in classes if (labels == c).any()]
    path = study / rundir.SAMPLES
    tmp = rundir.temp_path(path).with_suffix(".npz")
    try:
        np.savez(tmp, images=np.asarray(data.val.images[idx]), labels=labels[idx], classes=np.array(data.classes))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise rundir.output_error(path, e) from None
    rundir.commit(tmp, path)
    return path


def patch_size_of(model: str, overrides: dict, *, num_classes: int, img_size: int) -> int | None:
    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, img_size=img_size, **overrides)
    return getattr(net, "patch_size", None)


# --------------------------------------------------------------------------------------------------
# The entry points: compare (models x seeds) and sweep (grid cells x seeds)


@dataclass
class StudyResult:
    study: Path
    meta: dict
    outcome: dict[str, list[str]]
    reports: list[Path]
    estimates: dict[str, dict] | None = None  # compare --plan: run name -> `estimate`


def _prepare(cfg: RunConfig, progress: bool):
    from patchbench.data import prepare

    return prepare(cfg.data, progress=progress)


def _study_meta(kind: str, layers: Layers, models: list[str], seeds: list[int], sample: RunConfig) -> dict:
    meta = {"kind": kind, "preset": sample.preset, "models": models, "seeds": seeds, "data": sample.data.source,
            "config_file": layers.config.where if layers.config else None,
            "overrides": {k: v for k, v in (layers.changes or {}).items() if v} or None}
    if layers.reference:
        meta["reference"] = layers.reference
    return meta


def study_amp(study: Path, plan: list[PlannedRun]) -> dict:
    """Make every run's `amp=auto` concrete, the same for the whole study and for good: the precision
    study.json recorded when the study was created (on whatever machine extends or resumes it now), else
    bf16 where this machine computes it natively and fp32 elsewhere. Returns study.json's amp fields."""
    from patchbench.device import resolve_amp, resolve_device

    path = study / rundir.STUDY
    recorded = rundir.read_json(path).get("amp") if path.exists() else None
    if not isinstance(recorded, str):
        recorded = None
    auto = [p for p in plan if p.config.train.amp == "auto"]
    if recorded is not None:
        amp, why = recorded, "auto: as recorded when the study was created"
    elif auto:
        amp, why = resolve_amp("auto", resolve_device(auto[0].config.train.device))
    else:
        amp, why = None, "given"
    for p in auto:
        p.config.train = dataclasses.replace(p.config.train, amp=amp)
    mixed = sorted({p.config.train.amp for p in plan} - {amp})
    if recorded is not None and mixed:
        raise UserError(f"{study} was created with --amp {recorded}; a study keeps one precision: drop --amp {mixed[0]} "
                        f"(or start another study with another --out)")
    amps = {p.config.train.amp for p in plan}
    return {"amp": amps.pop() if len(amps) == 1 else None, "amp_rule": why}


def estimate(cfg: RunConfig, data, *, progress: bool = False) -> dict:
    """What one planned run will do: its steps, epochs and training compute, and its training time on
    this machine, estimated from the speed probe's step time (patchbench.autotune, cached) scaled by
    each size's MACs; evaluation is not included."""
    from patchbench.autotune import time_options
    from patchbench.data import holdout_split
    from patchbench.device import resolve_device
    from patchbench.train import Dist, build_model, check_sizes, plan_run, resolve_speed

    t, num_classes = cfg.train, len(data.classes)
    num_train = len(holdout_split(data.train, cfg.data.holdout, cfg.data.holdout_seed)[0]) if cfg.data.holdout \
        else len(data.train)
    macs_at = check_sizes(cfg, num_classes)
    if num_train < t.batch_size:
        raise UserError(f"--batch-size {t.batch_size}: more than the {num_train} training images; a run needs at "
                        f"least one full batch")
    steps = plan_run(cfg, num_train // t.batch_size, macs_at)
    device = resolve_device(t.device)
    speed = resolve_speed(cfg, Dist(0, 1, 0, device), num_classes, t.batch_size, None, progress)
    biggest = max(cfg.data.train_sizes or (cfg.data.img_size,))
    step_s = speed.step_s.get(str(speed.choice))
    if step_s is None:  # given settings, not probed: time them
        with torch.random.fork_rng():
            step_s = time_options(lambda: build_model(cfg, num_classes), [speed.choice], batch_size=t.batch_size,
                                  img_size=biggest, amp=t.amp, device=device, num_classes=num_classes)[0][speed.choice]
    seconds, begin = 0.0, 0
    for stop, size in steps.phases:
        seconds += (stop - begin) * step_s * macs_at[size] / macs_at[biggest]
        begin = stop
    return {"steps": steps.steps, "epochs": steps.epochs, "train_macs": steps.train_macs,
            "budget_macs": t.compute_budget, "train_seconds": seconds, "amp": t.amp, "speed": str(speed.choice)}


def _execute(study: Path, meta: dict, plan: list[PlannedRun], data, *, work, progress: bool,
             stale_after: float, report_formats, plan_only: bool = False) -> StudyResult:
    meta.update(study_amp(study, plan))
    if plan_only:  # print what would run, write nothing
        return StudyResult(study, meta, {"planned": [p.name for p in plan]}, [],
                           {p.name: estimate(p.config, data, progress=progress) for p in plan})
    for p in plan:
        p.config.validate()
    meta["runs"] = [p.name for p in plan]
    meta = write_study_json(study, meta)
    write_samples(study, data)
    outcome = run_study(study, plan, work=work or train_work(progress), progress=progress,
                        stale_after=stale_after)
    reports = []
    if report_formats:
        from patchbench.report import write_report

        reports = write_report(study, report_formats)
    return StudyResult(study, meta, outcome, reports)


def compare(models: list[str], seeds: list[int], out: str | os.PathLike, *, preset: Recipe | None = None,
            config: Recipe | None = None, changes: dict | None = None, param_budget: int | None = None,
            mac_budget: int | None = None, progress: bool = True, stale_after: float = 600.0,
            report_formats=("md", "html"), work=None, kind: str = "compare", extra_meta: dict | None = None,
            plan_only: bool = False, budgets: list[float] | None = None) -> StudyResult:
    """Train models x seeds into `out` (skipping finished runs), then write the report.

    With a budget (`param_budget`, else `mac_budget`, else the recipe's param_budget) every model is
    sized by its width to within ±5% of it; study.json records the chosen sizes, parameters and MACs.
    `plan_only`: train and write nothing; the result's `estimates` say what each run would do. `budgets`
    (else the recipe's): train every (model, seed) once per training-compute budget (curves over compute)."""
    study = Path(out) if plan_only else rundir.check_study_dir(out, "--out")
    layers = Layers(preset, config, changes)
    if param_budget and mac_budget:
        raise UserError("--param-budget and --mac-budget: give one of them")
    budget, measure = ((param_budget, "params") if param_budget else (mac_budget, "macs") if mac_budget
                       else (layers.param_budget, "params"))
    base = {m: layers.config_for(m).validate() for m in models}
    data = _prepare(base[models[0]], progress)
    num_classes = len(data.classes)
    chosen, chosen_params, chosen_macs = {}, {}, {}
    for m in models:
        img_size, overrides = base[m].data.img_size, base[m].model.overrides
        size = {"num_classes": num_classes, "img_size": img_size}
        chosen[m] = match_budget(m, budget, **size, base=overrides, measure=measure)[0] if budget else dict(overrides)
        chosen_params[m] = model_params(m, **size, **chosen[m])
        chosen_macs[m] = model_macs(m, **size, **chosen[m])
    meta = {**_study_meta(kind, layers, models, seeds, base[models[0]]),
            "param_budget": budget if measure == "params" else None,
            "mac_budget": budget if measure == "macs" else None, "chosen": chosen, "chosen_params": chosen_params,
            "chosen_macs": chosen_macs, "labels": {m: describe(m, chosen[m]) for m in models},
            "img_size": base[models[0]].data.img_size, "num_classes": num_classes,
            "patch_sizes": {m: patch_size_of(m, chosen[m], num_classes=num_classes, img_size=base[m].data.img_size)
                            for m in models}, **(extra_meta or {})}
    budgets = budgets or layers.budgets
    if budgets:
        given = (changes or {}).get("train", {})
        if given.get("compute_budget") or "epochs" in given:
            raise UserError("--budgets gives every run its compute budget; drop --compute-budget / --epochs")
        meta["budgets"] = sorted(budgets)
    plan = plan_compare(models, seeds, layers, chosen, budgets)
    return _execute(study, meta, plan, data, work=work, progress=progress, stale_after=stale_after,
                    report_formats=report_formats, plan_only=plan_only)


def ablate(mixers: list[str], stems: list[str], seeds: list[int], out: str | os.PathLike, **kw) -> StudyResult:
    """The controlled experiment: every (token mixer, stem) cell of the isotropic backbone x seeds, at the
    recipe's (or the given) matched budget; the report adds the mixer x stem table and each factor's effect."""
    from patchbench.models.isotropic import MIXERS, STEMS

    for what, given, known in (("--mixers", mixers, MIXERS), ("--stems", stems, STEMS)):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            raise UserError(f"{what} {','.join(given)}: choose from {', '.join(known)}")
    models = [f"iso_{m}_{s}" for m in mixers for s in stems]
    return compare(models, seeds, out, kind="ablation", extra_meta={"ablation": {"mixers": mixers, "stems": stems}},
                   **kw)


def sweep(model: str, grid: dict[str, list], seeds: list[int], out: str | os.PathLike, *,
          preset: Recipe | None = None, config: Recipe | None = None, changes: dict | None = None,
          progress: bool = True, stale_after: float = 600.0, report_formats=("md", "html"), work=None) -> StudyResult:
    """Train every grid cell (model overrides) x seed into `out`, then write the report with its heatmap."""
    study = rundir.check_study_dir(out, "--out")
    layers = Layers(preset, config, changes)
    grid = typed_grid(model, grid)
    base = layers.config_for(model).validate()
    data = _prepare(base, progress)
    num_classes, img_size = len(data.classes), base.data.img_size
    check_cells(model, grid_cells(grid), base.model.overrides, num_classes=num_classes, img_size=img_size)
    meta = {**_study_meta("sweep", layers, [model], seeds, base), "param_budget": None, "grid": grid,
            "chosen": {}, "chosen_params": {}, "img_size": img_size, "num_classes": num_classes,
            "patch_sizes": {model: patch_size_of(model, base.model.overrides, num_classes=num_classes,
                                                 img_size=img_size)}}
    plan = plan_sweep(model, grid, seeds, layers)
    return _execute(study, meta, plan, data, work=work, progress=progress, stale_after=stale_after,
                    report_formats=report_formats)
