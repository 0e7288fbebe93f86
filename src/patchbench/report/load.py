"""Reading a study: its run directories and study.json, into `Run`s, `Group`s and a `Study`.

Every file is read through patchbench.rundir, which names the file and what is wrong with it. A run
whose files are missing, unreadable or of the wrong shape is kept with its `problems` listed, so
the report can say so rather than crash; it is left out of the numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchbench import rundir
from patchbench.compute import macs_tag
from patchbench.config import current_name
from patchbench.errors import UserError
from patchbench.values import model_label


@dataclass
class Run:
    """What one run directory holds; `problems` says what was missing or unreadable."""

    name: str
    path: Path
    config: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    summary: dict | None = None
    eval: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "no summary")

    @property
    def finished(self) -> bool:
        return self.status == rundir.FINISHED and self.summary.get("final_top1") is not None

    @property
    def model(self) -> str:
        name = ((self.config or {}).get("model") or {}).get("name") or (self.summary or {}).get("model") or "?"
        return current_name(name)  # a run of the previous release: its model's current name

    @property
    def overrides(self) -> dict:
        return ((self.config or {}).get("model") or {}).get("overrides") or {}

    @property
    def label(self) -> str:
        """What the model is: summary.json's label (runs of this version), else its name and overrides."""
        return (self.summary or {}).get("label") or model_label(self.model, self.overrides)

    @property
    def seed(self) -> int | None:
        return ((self.config or {}).get("train") or {}).get("seed")

    @property
    def img_size(self) -> int | None:
        return (self.summary or {}).get("img_size") or ((self.config or {}).get("data") or {}).get("img_size")

    @property
    def eval_split(self) -> str:
        """The split the run's figures are measured on: "val", or "holdout" (part of train)."""
        return (self.summary or {}).get("eval_split") or "val"

    @property
    def budget(self) -> float | None:
        """The run's training-compute budget in MACs (None: an --epochs run)."""
        return (self.summary or {}).get("budget_macs") or ((self.config or {}).get("train") or {}).get("compute_budget")

    @property
    def patch_size(self) -> int | None:
        """The model override if given, else what train recorded in summary.json (None: no patches)."""
        return self.overrides.get("patch_size") or (self.summary or {}).get("patch_size")


@dataclass
class Group:
    """One configuration (model + overrides, and compute budget in a study of several) over its seeds."""

    label: str
    model: str
    overrides: dict
    runs: list[Run]
    budget: float | None = None

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    def finals(self) -> list[float]:
        return [r.summary["final_top1"] for r in self.done]


@dataclass
class Study:
    path: Path
    meta: dict  # study.json ({} when the folder is a plain collection of run directories)
    runs: list[Run]
    samples: dict | None  # samples.npz: images (N, S, S, 3) uint8, labels (N,), classes (C,)
    problems: list[str] = field(default_factory=list)


def _read(run: Run, name: str, reader):
    path = run.path / name
    if not path.exists():
        return None
    try:
        return reader(path)
    except rundir.RunFileError as e:
        run.problems.append(f"{e}; ignored")
        return None


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    run = Run(name=path.name, path=path)
    run.config = _read(run, rundir.CONFIG, lambda p: rundir.read_config(p.parent))
    run.metrics = _read(run, rundir.METRICS, lambda p: rundir.read_metrics(p, on_torn=run.problems.append)) or []
    run.summary = _read(run, rundir.SUMMARY, rundir.read_summary)
    run.eval = _read(run, rundir.EVAL, rundir.read_json)
    if run.config is None:
        run.problems.append("no readable config.json")
    if run.summary is None:
        run.problems.append("no readable summary.json (not started, or stopped before its first epoch)")
    elif run.status != rundir.FINISHED:
        done, total = run.summary.get("epochs_done"), run.summary.get("epochs")
        why = f": {run.summary['error']}" if run.summary.get("error") else ""
        run.problems.append(f"status {run.status}, {done} of {total} epochs done{why}")
    elif run.eval is None:
        run.problems.append("no eval.json (no confusion matrix)")
    return run


def load_study(path: str | os.PathLike) -> Study:
    """A study folder (study.json + runs/*), a folder of run directories, or a single run directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a study folder (study.json + runs/) or a run directory")
    if not path.is_dir():
        raise UserError(f"study folder {path} does not exist; run `patchbench compare --out {path}` first")
    problems: list[str] = []
    meta = {}
    if (path / rundir.STUDY).exists():
        try:
            meta = rundir.read_json(path / rundir.STUDY)
        except rundir.RunFileError as e:
            problems.append(f"{e}; the study's settings are unknown")
    if (path / rundir.RUNS).is_dir():
        run_dirs = sorted(p for p in (path / rundir.RUNS).iterdir() if p.is_dir())
    elif rundir.is_run_dir(path):
        run_dirs = [path]
    else:
        run_dirs = sorted(p for p in path.iterdir() if rundir.is_run_dir(p))
    if not run_dirs:
        raise UserError(f"no run directories in {path}; expected {path}/runs/<run>/ with config.json")
    runs = [load_run(p) for p in run_dirs]
    present = {r.name for r in runs}
    for name in meta.get("runs", []):
        if name not in present:
            problems.append(f"run {name} was planned but has no directory (not started yet)")
    samples = None
    # study.json's "samples" may name a file shared by several studies of the same data (relative path)
    where = path / str(meta.get("samples") or rundir.SAMPLES)
    if where.exists():
        try:
            with np.load(where, allow_pickle=False) as z:
                samples = {k: z[k] for k in ("images", "labels", "classes")}
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{where} is unreadable ({type(e).__name__}); no patch-grid figure")
    return Study(path=path, meta=meta, runs=runs, samples=samples, problems=problems)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs of the same model and overrides form a group, labelled by what the model is; in a study of several
    compute budgets, one group per budget (labelled `... @ 5T`)."""
    several = len({r.budget for r in runs}) > 1
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.model, json.dumps(run.overrides, sort_keys=True), run.budget if several else None)
        label = f"{run.label} @ {macs_tag(run.budget)}" if several and run.budget else run.label
        groups.setdefault(key, Group(label=label, model=run.model, overrides=run.overrides, runs=[],
                                     budget=run.budget))
        groups[key].runs.append(run)
    first = {}  # each model where it first appears; its budgets in increasing order
    for g in groups.values():
        first.setdefault(g.model, len(first))
    return sorted(groups.values(), key=lambda g: (first[g.model], g.budget or 0.0))
