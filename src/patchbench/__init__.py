"""patchbench: is it the patches or the attention?

Public API (kept small):
    create_model, list_models     -- the model registry (patchbench.models)
    train_run                     -- train one model into a run directory (patchbench.train)
    evaluate_run, predict         -- score a run/checkpoint on a val split; classify image files (patchbench.evaluate)
"""

__version__ = "0.1.0"

from patchbench.models import create_model, list_models  # noqa: E402
from patchbench.evaluate import evaluate_run, predict  # noqa: E402
from patchbench.train import train_run  # noqa: E402

__all__ = ["__version__", "create_model", "evaluate_run", "list_models", "predict", "train_run"]
