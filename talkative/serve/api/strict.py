"""Request bodies take numbers and booleans as JSON numbers and booleans, nothing else.

Pydantic's default (lax) mode turns `true` into 1 and `"2"` into 2 where an integer is declared, and `"yes"` or 1
into `true` where a boolean is: the API description says `integer` and `boolean`, and a client sending a string
or a boolean there has a bug it should hear about. `StrictBody` is the base of every request body (REST and
WebSocket): before validation it walks the body against the declared fields, nested models and lists included,
and refuses a loosely typed scalar with a 400 that names the field. Unlike `ConfigDict(strict=True)`, it leaves
everything else (strings into enums and literals, nested models defined outside the API, such as the engine's
`AnalyzeOptions`) as it was.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, model_validator

_EXPECTED = {int: "an integer", float: "a number", bool: "a boolean"}


def _strip_optional(annotation: Any) -> Any:
    """`X | None` and `Optional[X]` -> X; `Annotated[X, ...]` -> X; anything else as it is."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _strip_optional(members[0]) if len(members) == 1 else annotation
    return annotation


def _loose(annotation: Any, value: Any, where: str) -> str | None:
    """What is wrong with `value` for a field declared as `annotation`, or None."""
    if value is None:
        return None
    kind = _strip_optional(annotation)
    if kind in _EXPECTED:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is float:
            ok = number
        else:  # JSON Schema counts 2.0 as an integer; pydantic takes it as 2
            ok = number and (isinstance(value, int) or float(value).is_integer())
        if ok:
            return None
        return f"{where}: must be {_EXPECTED[kind]} (got {type(value).__name__} {value!r:.40})"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return loose_scalars(kind, value, where)
    if typing.get_origin(kind) is list and isinstance(value, list):
        (item,) = typing.get_args(kind) or (Any,)
        for i, element in enumerate(value):
            problem = _loose(item, element, f"{where}.{i}")
            if problem:
                return problem
    return None


def loose_scalars(model: type[BaseModel], data: Any, where: str = "") -> str | None:
    """The first field of `data` (a body for `model`) holding a string or a boolean where a number is declared,
    or anything but a boolean where a boolean is; None when there is none."""
    if not isinstance(data, dict):
        return None
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in data:
            problem = _loose(field.annotation, data[key], f"{where}.{key}" if where else key)
            if problem:
                return problem
    return None


class StrictBody(BaseModel):
    """A request body whose numbers and booleans must be JSON numbers and booleans (see the module)."""

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        problem = loose_scalars(cls, data)
        if problem:
            raise ValueError(problem)
        return data
