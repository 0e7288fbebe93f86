"""Values checked against a type, from text (flags, `--model-arg`, `--grid`) or from TOML/JSON.

One parser per kind of value, used by every way a setting can arrive: the config dataclasses'
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


def describe(kind) -> str:
    """What a value of `kind` looks like, for error messages and help."""
    if kind is Any or kind is typing.Any:
        return "a value"
    if _is_optional(kind):
        return f"{describe(_strip_none(kind))} or none"
    if _is_union(kind):
        return " or ".join(describe(a) for a in _args(kind))
    if _origin(kind) is Literal:
        args = [str(a) for a in _args(kind)]
        return args[0] if len(args) == 1 else "one of " + ", ".join(args)
    if _origin(kind) is tuple:
        args = _args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
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
    return UserError(f"{what} {shown!r}: need {describe(kind)}" if isinstance(value, str)
                     else f"{what} = {shown}: need {describe(kind)}")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_text(text: str, kind, what: str):
    """Text from the command line -> a value of `kind` (UserError naming `what` when it does not fit)."""
    text = text.strip()
    if kind is Any or kind is typing.Any:
        return guess(text)
    if _is_optional(kind):
        return None if text.lower() in NONE_WORDS else parse_text(text, _strip_none(kind), what)
    if _is_union(kind):
        return _first_fit(parse_text, text, kind, what)
    origin = _origin(kind)
    if origin is Literal:
        if text not in _args(kind):
            raise _fail(what, text, kind)
        return text
    if origin in (tuple, list):
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise _fail(what, text, kind) from None
            return check_value(items, kind, what)
        parts = [p.strip() for p in text.split(",")] if text else []
        args = _args(kind)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(parts) != len(args):
            raise _fail(what, text, kind)
        item_kinds = [args[0]] * len(parts) if (origin is list or args[1:] == (Ellipsis,)) else list(args)
        try:
            values = [parse_text(p, k, what) for p, k in zip(parts, item_kinds)]
        except UserError:
            raise _fail(what, text, kind) from None
        return tuple(values) if origin is tuple else values
    if kind is SI:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]?)", text)
        if not m or float(m.group(1)) * SI_SUFFIXES[m.group(2)] <= 0:
            raise _fail(what, text, kind)
        return float(m.group(1)) * SI_SUFFIXES[m.group(2)]
    if kind is bool:
        low = text.lower()
        if low in TRUE_WORDS or low in FALSE_WORDS:
            return low in TRUE_WORDS
        raise _fail(what, text, kind)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise _fail(what, text, kind) from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise _fail(what, text, kind) from None
        if not math.isfinite(value):
            raise _fail(what, text, kind)
        return value
    if kind is str:
        return text
    if kind is dict or origin is dict:
        try:
            value = json.loads(text)
        except ValueError:
            raise _fail(what, text, kind) from None
        return check_value(value, kind, what)
    raise TypeError(f"values.parse_text: no parser for {kind!r} ({what})")  # a bug of ours, not the user's


def check_value(value, kind, what: str):
    """An already-typed value (from TOML or JSON) -> the same value as `kind` (int -> float, list ->
    tuple), or UserError naming `what`. Text given where a number or a flag belongs is parsed as
    on the command line (`"none"` for an unset optional setting)."""
    if kind is Any or kind is typing.Any:
        return value
    if _is_optional(kind):
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return check_value(value, _strip_none(kind), what)
    if _is_union(kind):
        return _first_fit(check_value, value, kind, what)
    origin = _origin(kind)
    if origin is Literal:
        if value not in _args(kind):
            raise _fail(what, value, kind)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str):
                return parse_text(value, kind, what)
            raise _fail(what, value, kind)
        args = _args(kind)
        if origin is list or args[1:] == (Ellipsis,):
            kinds = [args[0] if args else Any] * len(value)
        else:
            if len(value) != len(args):
                raise _fail(what, value, kind)
            kinds = list(args)
        try:
            items = [check_value(v, k, what) for v, k in zip(value, kinds)]
        except UserError:
            raise _fail(what, value, kind) from None
        return tuple(items) if origin is tuple else items
    if kind is SI:
        if isinstance(value, str):
            return parse_text(value, kind, what)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
        raise _fail(what, value, kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _fail(what, value, kind)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise _fail(what, value, kind)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _fail(what, value, kind)
            return float(value)
        raise _fail(what, value, kind)
    if kind is str:
        if isinstance(value, str):
            return value
        raise _fail(what, value, kind)
    if kind is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _fail(what, value, kind)
    raise TypeError(f"values.check_value: no checker for {kind!r} ({what})")


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
