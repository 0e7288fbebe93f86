"""Studies: every (model, seed), (model, seed, compute budget) or (grid cell, seed) as a run directory under
STUDY/runs/, and the search that tunes every family alike.

    from patchbench.study import compare, tune
    compare(["convmixer_256_12", "resnet18"], [0, 1, 2], "studies/fair", preset=get_preset("fair"))

A study is idempotent: a finished run is skipped, an interrupted one resumes from its checkpoint
(`train_run(..., resume=True)`), so running the same command again does only what is missing.
Several processes, on one machine or many sharing the folder, can work on one study at once: a
worker takes a run only by creating its lock file `STUDY/locks/<run>.lock` with O_CREAT|O_EXCL,
refreshes the file's mtime while it trains (a heartbeat), and removes it when done. A lock whose
process is gone (same host, dead pid) or whose heartbeat stopped longer than `stale_after` seconds
ago is stale and is taken over.

One concept a module: `budget` (matched parameter or MAC budgets), `plan` (the runs of a study),
`locks`, `runner` (training what is missing), `files` (study.json, samples.npz, the study's one
precision), `studies` (compare, ablate, sweep, and `--plan`'s estimates) and `search` (`tune`).
"""

from patchbench.study.budget import (
           BUDGET_TOLERANCE,
           match_budget,
           model_macs,
           model_params,
           width_knob,
)
from patchbench.study.files import (
           STUDY_IDENTITY,
           same_results,
           study_amp,
           write_samples,
           write_study_json,
)
from patchbench.study.locks import RunLock
from patchbench.study.plan import (
           PlannedRun,
           RecipeLayers,
           grid_cells,
           plan_compare,
           plan_sweep,
           run_name,
           typed_grid,
)
from patchbench.study.runner import run_study, train_work
from patchbench.study.search import tune
from patchbench.study.studies import StudyResult, ablate, compare, estimate, sweep

__all__ = [
           "BUDGET_TOLERANCE",
           "STUDY_IDENTITY",
           "PlannedRun",
           "RecipeLayers",
           "RunLock",
           "StudyResult",
           "ablate",
           "compare",
           "estimate",
           "grid_cells",
           "match_budget",
           "model_macs",
           "model_params",
           "plan_compare",
           "plan_sweep",
           "run_name",
           "run_study",
           "same_results",
           "study_amp",
           "sweep",
           "train_work",
           "tune",
           "typed_grid",
           "width_knob",
           "write_samples",
           "write_study_json",
]
