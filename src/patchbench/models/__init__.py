"""The model registry: names -> constructors, as timm does it (sized for a handful of models).

    from patchbench.models import create_model, list_models
    model = create_model("convmixer_256_12", num_classes=10)

A registered variant is a function decorated with `@register_model(**defaults)`: its defaults (the
variant's dim, depth, ...) are merged under the caller's overrides and the function builds the
model class named in its return annotation. The class's signature is what overrides are checked
against (`check_overrides`), and the defaults are what `label` leaves out of a model's name.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from patchbench.config import current_name
from patchbench.errors import UserError
from patchbench.values import coerce, model_label


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., Any]  # fn(num_classes=..., **kwargs) -> nn.Module
    defaults: dict[str, Any]  # the variant's arguments
    cls: type  # the nn.Module class it builds (its signature types the arguments)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(fn: Callable | None = None, **defaults):
    """Decorator: register `fn` under its own name, with the variant's `defaults` under any override."""
    def register(fn):
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        cls = typing.get_type_hints(fn, globalns=fn.__globals__)["return"]
        _REGISTRY[fn.__name__] = ModelSpec(fn.__name__, fn, dict(defaults), cls)
        return fn

    return register(fn) if fn is not None else register


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    name = current_name(name, "model")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list_models())}"
        raise UserError(f"unknown model {name!r}; {hint} (see `patchbench models`)")
    return _REGISTRY[name]


@functools.cache
def arguments(name: str) -> dict[str, tuple[Any, Any]]:
    """The constructor arguments of model `name`: {argument: (type, default)}, the variant's defaults
    applied (num_classes, set by the data, is left out)."""
    s = spec(name)
    hints = typing.get_type_hints(s.cls.__init__)
    out = {}
    for p in inspect.signature(s.cls.__init__).parameters.values():
        if p.name in ("self", "num_classes") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = s.defaults.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
        out[p.name] = (hints.get(p.name, Any), default)
    return out


def check_overrides(name: str, overrides: dict[str, Any], what: str = "--model-arg") -> dict[str, Any]:
    """`overrides` typed and checked against model `name`'s constructor (text is parsed as on the
    command line); UserError naming the argument when one is unknown or of the wrong type."""
    args = arguments(name)
    out = {}
    for key, value in overrides.items():
        if key not in args:
            raise UserError(f"{what} {key}: {name} takes no argument {key!r}; it takes {', '.join(args)}")
        kind = args[key][0]
        out[key] = coerce(value, kind, f"{what} {key}")
    return out


def create_model(name: str, num_classes: int = 10, **overrides):
    """Build a registered model; unknown names and arguments, and values the model cannot take, raise
    UserError naming them."""
    s = spec(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"model {name}: num_classes must be a whole number >= 1, got {num_classes!r}")
    overrides = check_overrides(name, overrides, f"model {name} argument")
    try:
        return s.build(num_classes=num_classes, **{**s.defaults, **overrides})
    except ValueError as e:  # a constructor's check of its arguments: the caller's values
        raise UserError(f"model {name}: {str(e).splitlines()[0]}") from None


def label(name: str, overrides: dict[str, Any] | None = None) -> str:
    """What a model is, by name: the registered name, plus the arguments that differ from its
    defaults, e.g. `convmixer_256_8(dim=128, depth=6, patch_size=4)` (the image size is left out)."""
    if name not in _REGISTRY:
        return model_label(name, overrides or {})
    args = arguments(name)
    return model_label(name, {k: v for k, v in (overrides or {}).items() if k not in args or args[k][1] != v})


# Importing the families fills the registry.
from patchbench.models import convmixer, isotropic, resnet, vit  # noqa: F401
