"""values.coerce: one path for text (flags) and TOML/JSON values, each kind checked both ways."""

from typing import Any, Literal

import pytest

from patchbench.errors import UserError
from patchbench.values import SI, coerce

Switch = bool | Literal["auto"]


@pytest.mark.parametrize("value, kind, expected", [
    ("3", int, 3), (3, int, 3), (3.0, int, 3), ("2.5e-3", float, 0.0025), (2, float, 2.0),
    ("on", bool, True), ("No", bool, False), (True, bool, True),
    ("40T", SI, 4e13), ("2.5G", SI, 2.5e9), (1e12, SI, 1e12), ("800k", SI, 8e5),
    ("auto", Switch, "auto"), ("true", Switch, True), (False, Switch, False),
    ("none", int | None, None), (None, float | None, None), ("7", int | None, 7),
    ("0.35,1", tuple[float, float], (0.35, 1.0)), ([0.35, 1], tuple[float, float], (0.35, 1.0)),
    ("[2,2,2,2]", tuple[int, ...], (2, 2, 2, 2)), ("5T,10T", list[SI], [5e12, 1e13]), ("", list[int], []),
    ('{"a": 1}', dict, {"a": 1}), ({"a": 1}, dict, {"a": 1}), (" text ", str, "text"),
    ("12", Any, 12), ("none", Any, None), ("[1, 2]", Any, [1, 2]), ([1], Any, [1]),
])
def test_text_and_typed_values_become_the_same_kind(value, kind, expected):
    got = coerce(value, kind, "--x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, kind, message", [
    ("3.5", int, "--x '3.5': need a whole number"), (3.5, int, "--x = 3.5: need a whole number"),
    (True, int, "--x = true: need a whole number"), ("nan", float, "--x 'nan': need a finite number"),
    ("maybe", bool, "--x 'maybe': need true or false"), (1, bool, "--x = 1: need true or false"),
    ("0T", SI, "need a positive number with an optional SI suffix"), (-1, SI, "--x = -1: need a positive"),
    ("fast", Switch, "need true or false or auto"), ("1,2,3", tuple[float, float], "need 2 comma-separated numbers"),
    ("[1,", tuple[int, ...], "--x '\\[1,': need a comma-separated list of whole numbers"),
    (3, str, "--x = 3: need text"), ("[1]", dict, "need a table of keys and values"),
    ("x", Literal["a", "b"], "--x 'x': need one of a, b"),
])
def test_a_value_that_does_not_fit_is_named(value, kind, message):
    with pytest.raises(UserError, match=message):
        coerce(value, kind, "--x")
