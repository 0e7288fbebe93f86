"""Values checked against a type, from text (flags, `--model-arg`, `--grid`) or from TOML/JSON.

One function, `coerce`, for every way a setting can arrive: the config dataclasses'
fields (`config.py`), the model constructors' signatures (`models.check_overrides`) and the
command line (`commands/options.py`). A bad value raises `UserError` naming where it came from
(`what`: the flag, the TOML key or the model argument) and what it needs, on one line.

Kinds are type annotations: `int`, `float`, `bool`, `str`, `Literal[...]`, `X | None`, `X | Y`
(the first kind the value fits, e.g. `bool | Literal["auto"]`),
`tuple[float, float]`, `tuple[int, ...]`, `list[str]`, `dict`, or `Any` (guessed from the text).
In text, `none` means None for every `X | None`; `true`/`false` (also yes/no, on/off, 1/0) are
booleans; a tuple is comma-separated (`0.35,1`) or a JSON list (`[2,2,2,2]`).
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import types
import typing
from typing import Any, Literal

from patchbench.errors import UserError

NONE_WORDS = ("none", "null")
SI_SUFFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


class SI(float):
    """The kind of a count written with an optional SI suffix: `40T` = 4.0e13, `2.5G`, `800k`, `1e12`."""
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def _args(kind) -> tuple:
    return typing.get_args(kind)


def _is_optional(kind) -> bool:
    return _origin(kind) in (typing.Union, types.UnionType) and type(None) in _args(kind)


def _origin(kind):
    return typing.get_origin(kind)


def _is_union(kind) -> bool:
    return _origin(kind) in (typing.Union, types.UnionType) and type(None) not in _args(kind)


def _first_fit(parse, value, kind, what: str):
    """`parse(value, member)` for the first member of the union `kind` that takes the value."""
    for member in _args(kind):
        try:
            return parse(value, member, what)
        except UserError:
            continue
    raise _fail(what, value, kind)


def _strip_none(kind):
    rest = [a for a in _args(kind) if a is not type(None)]
    return rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)


def describe_kind(kind) -> str:
    """What a value of `kind` looks like, for error messages and help."""
    if kind is Any or kind is typing.Any:
        return "a value"
    if _is_optional(kind):
        return f"{describe_kind(_strip_none(kind))} or none"
    if _is_union(kind):
        return " or ".join(describe_kind(a) for a in _args(kind))
    if _origin(kind) is Literal:
        args = [str(a) for a in _args(kind)]
        return args[0] if len(args) == 1 else "one of " + ", ".join(args)
    if _origin(kind) is tuple:
        args = _args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {describe_kind(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"{len(args)} comma-separated numbers" if all(a in (int, float) for a in args) else \
            f"{len(args)} comma-separated values"
    if _origin(kind) is list:
        return "a list"
    if kind is SI:
        return "a positive number with an optional SI suffix (k, M, G, T, P), e.g. 40T"
    return {int: "a whole number", float: "a finite number", bool: "true or false", str: "text",
            dict: "a table of keys and values"}.get(kind, f"a {getattr(kind, '__name__', kind)}")


def _fail(what: str, value, kind) -> UserError:
    shown = value if isinstance(value, str) else json.dumps(value) if _jsonable(value) else repr(value)
    return UserError(f"{what} {shown!r}: need {describe_kind(kind)}" if isinstance(value, str)
                     else f"{what} = {shown}: need {describe_kind(kind)}")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def coerce(value, kind, what: str):
    """A value of `kind` from text (a flag, `--model-arg`, `--grid`) or from TOML/JSON, or UserError
    naming `what`. Text is parsed as the kind needs (a typed value is checked, int -> float, list ->
    tuple), so a setting reads the same whichever way it arrives."""
    text = isinstance(value, str)
    if text:
        value = value.strip()
    if kind is Any or kind is typing.Any:
        return guess(value) if text else value
    if _is_optional(kind):
        if value is None or (text and value.lower() in NONE_WORDS):
            return None
        return coerce(value, _strip_none(kind), what)
    if _is_union(kind):
        return _first_fit(coerce, value, kind, what)
    origin = _origin(kind)
    if origin is Literal:
        if value not in _args(kind):
            raise _fail(what, value, kind)
        return value
    if origin in (tuple, list):
        items = value
        if text and value.startswith("["):
            try:
                items = json.loads(value)
            except ValueError:
                raise _fail(what, value, kind) from None
        elif text:
            items = [p.strip() for p in value.split(",")] if value else []
        if not isinstance(items, (list, tuple)):
            raise _fail(what, value, kind)
        args = _args(kind)
        if origin is list or args[1:] == (Ellipsis,):
            kinds = [args[0] if args else Any] * len(items)
        elif len(items) != len(args):
            raise _fail(what, value, kind)
        else:
            kinds = list(args)
        try:
            out = [coerce(v, k, what) for v, k in zip(items, kinds)]
        except UserError:
            raise _fail(what, value, kind) from None
        return tuple(out) if origin is tuple else out
    if kind is dict or origin is dict:
        doc = value
        if text:
            try:
                doc = json.loads(value)
            except ValueError:
                raise _fail(what, value, kind) from None
        if not isinstance(doc, dict):
            raise _fail(what, value, kind)
        return dict(doc)
    if kind is str:
        if not text:
            raise _fail(what, value, kind)
        return value
    scalar = _scalar(value, kind) if text else _typed_scalar(value, kind)
    if scalar is None:
        raise _fail(what, value, kind)
    return scalar


def _scalar(text: str, kind):
    """A number or a flag from text (None when it is not one)."""
    if kind is bool:
        low = text.lower()
        return (low in TRUE_WORDS) if low in TRUE_WORDS or low in FALSE_WORDS else None
    if kind is SI:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]?)", text)
        value = float(m.group(1)) * SI_SUFFIXES[m.group(2)] if m else 0.0
        return value if value > 0 else None
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    raise TypeError(f"values.coerce: no parser for {kind!r}")  # a bug of ours, not the user's


def _typed_scalar(value, kind):
    """A number or a flag from TOML/JSON (None when it is not one): no bool as a number, ints as floats,
    whole floats as ints."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if kind is SI:
        return float(value) if value > 0 else None
    if kind is float:
        return float(value)
    if kind is int:
        return value if isinstance(value, int) else int(value) if value.is_integer() else None
    raise TypeError(f"values.coerce: no checker for {kind!r}")


def guess(text: str):
    """A value of unknown type from text: a whole number, a number, true/false, none, a JSON list, or text."""
    low = text.strip().lower()
    if low in NONE_WORDS:
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if cast is float and not math.isfinite(value):
            break
        return value
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def model_label(name: str, overrides: dict[str, Any]) -> str:
    """A model's name with the constructor arguments that make it what it is, e.g.
    `convmixer_256_8(dim=128, depth=6)`; the image size (a property of the data) is left out."""
    shown = {k: v for k, v in overrides.items() if k != "img_size"}
    if not shown:
        return name
    def short(v):
        return "(" + ",".join(map(str, v)) + ")" if isinstance(v, (list, tuple)) else f"{v:g}" \
            if isinstance(v, float) else str(v)
    return f"{name}(" + ", ".join(f"{k}={short(v)}" for k, v in shown.items()) + ")"
