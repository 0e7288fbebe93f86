"""study.json and samples.npz: a study's own files, and the one precision a study keeps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from patchbench import rundir
from patchbench.errors import UserError
from patchbench.study.plan import PlannedRun

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
        if old.get("runs") and bool(old.get("budgets")) != bool(meta.get("budgets")):
            raise UserError(f"{study} holds a study " + ("over compute budgets" if old.get("budgets") else
                                                         "without compute budgets") + "; its runs and these would "
                            "not compare: use another --out (or `--budgets none` to train without a preset's budgets)")
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
