"""patchbench: is it the patches or the attention?

Public API (kept small):
    create_model, list_models     -- the model registry (patchbench.models)
"""

__version__ = "0.1.0"

from patchbench.models import create_model, list_models  # noqa: E402

__all__ = ["__version__", "create_model", "list_models"]
