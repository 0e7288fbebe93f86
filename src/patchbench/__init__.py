"""patchbench: is it the patches or the attention?

Public API (kept small, imported on first use so that `import patchbench` and `--version` stay cheap):
    create_model, list_models     -- the model registry (patchbench.models)
    train_run                     -- train one model into a run directory (patchbench.train)
    evaluate_run, predict         -- score a run/checkpoint on a val split; classify image files (patchbench.evaluate)
    get_preset, build_config      -- recipes and run configs (patchbench.recipes)
"""

__version__ = "0.2.0"

_API = {"create_model": "patchbench.models", "list_models": "patchbench.models", "train_run": "patchbench.train",
        "evaluate_run": "patchbench.evaluate", "predict": "patchbench.evaluate", "get_preset": "patchbench.recipes",
        "build_config": "patchbench.recipes"}

__all__ = [
    "__version__",
    "build_config",
    "create_model",
    "evaluate_run",
    "get_preset",
    "list_models",
    "predict",
    "train_run",
]  # the keys of _API


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'patchbench' has no attribute {name!r}")
