"""The model registry: names -> constructors, as timm does it (sized for a handful of models).

    from patchbench.models import create_model, list_models
    model = create_model("convmixer_256_12", num_classes=10)
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from patchbench.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn` under its own name. `fn(num_classes=..., **overrides)`."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **overrides) -> nn.Module:
    """Build a registered model. Unknown names raise UserError listing the closest names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list_models())}"
        raise UserError(f"unknown model {name!r}; {hint} (see `patchbench models`)")
    try:
        return _REGISTRY[name](num_classes=num_classes, **overrides)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"model {name!r} does not take that argument ({e}); "
                        f"overrides given: {sorted(overrides)}") from None


# Importing the families fills the registry.
from patchbench.models import convmixer, resnet, vit  # noqa: E402,F401
