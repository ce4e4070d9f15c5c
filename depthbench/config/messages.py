"""Pydantic's validation errors as the one line a user reads: the dotted key, what is wrong, what was written."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from depthbench.errors import did_you_mean


def first_error(err: ValidationError, model: type[BaseModel], booleans: Mapping[str, str] | None = None) -> str:
    """The first error as one line naming the dotted key; ``booleans`` quotes YAML booleans as written."""
    booleans = booleans or {}
    error = err.errors(include_url=False)[0]
    loc = _settings_path(model, tuple(error["loc"]))
    key = dotted(loc) or "config"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'{did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))}"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "boolean_number":
        return boolean_error(key, error, booleans)
    if kind == "non_finite":
        return f"{key}{error['ctx']['at']}: expected a finite number, got {error['ctx']['written']}"
    shown = error.get("input")
    if kind == "finite_number":  # text that pydantic would read as infinite or NaN, such as 'inf'
        return f"{key}: expected a finite number, got {shown!r}"
    written = booleans.get(key) if isinstance(shown, bool) else None  # quote `no` as written, not as False
    if kind == "literal_error":
        what = f"'{written}' (YAML reads it as a boolean)" if written else f"'{shown}'"
        return f"{key}: {what} is not allowed; {message[0].lower()}{message[1:]}"
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    got = ""
    if kind.endswith(("_type", "_parsing")) and not isinstance(shown, dict):
        got = f" (got '{written}', which YAML reads as a boolean)" if written else f" (got {shown!r})"
    return f"{key}: {message[0].lower()}{message[1:]}{got}"


def boolean_error(key: str, error: Any, booleans: Mapping[str, str]) -> str:
    key += error["ctx"]["at"]
    written = booleans.get(key, "")
    shown = f"'{written}' (YAML reads it as a boolean)" if written else "a boolean"
    hint = "; quote it to mean the text" if "text" in error["ctx"]["expected"] else ""
    return f"{key}: expected {error['ctx']['expected']}, got {shown}{hint}"


def dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


_ARM = object()  # where the next part of a loc names the arm of a union


def _settings_path(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without the names pydantic adds for the arm of a union it tried (``train.warmup.steps.int``
    is the user's ``train.warmup.steps``)."""
    path: list[Any] = []
    annotation: Any = model
    for part in loc:
        if annotation is _ARM:  # this part names the arm; what follows is inside it
            annotation = None
            continue
        path.append(part)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field else None
        elif get_origin(annotation) in (dict, tuple, list):
            annotation = get_args(annotation)[-1 if get_origin(annotation) is dict else 0]
        else:
            annotation = None
        if get_origin(annotation) in (Union, types.UnionType):
            arms = [arm for arm in get_args(annotation) if arm is not type(None)]
            annotation = _ARM if len(arms) > 1 else arms[0]  # X | None has no arm name
    return tuple(path)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that ``loc`` points into, for 'did you mean' hints."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
