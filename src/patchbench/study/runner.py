"""Running a study: every planned run that is not finished and not held by another worker."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from patchbench import rundir
from patchbench.config import RunConfig
from patchbench.errors import UserError
from patchbench.study.locks import RunLock
from patchbench.study.plan import PlannedRun
from patchbench.train import TrainingDiverged, train_run


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
            status = _status(out)
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
                if _status(out) == rundir.FINISHED:  # finished by another worker since we looked
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


def _status(out: Path) -> str:
    """The run's status; NEW when its summary.json cannot be read (another worker is writing it, or it is
    damaged): the run's lock, then the trainer (whose checkpoint decides), take it from there."""
    try:
        return rundir.run_status(out)
    except rundir.RunFileError:
        return rundir.NEW
