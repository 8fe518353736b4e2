"""Check a tool call's arguments against the tool's JSON schema, returning a problem string or None.

A deliberately small subset of JSON Schema — the part tool schemas use: `type` (one or a list), `enum`,
`items`, nested `properties` / `required`, `additionalProperties: false` and `anyOf`. Whatever else a schema
says is not the policy's fault and is ignored here; the sandbox validates again when it runs the tool.
Integral floats count as integers (JSON Schema semantics: 1.0 is an integer). Booleans are never numbers, and
neither are `NaN`, `Infinity` or integers past float range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 16
"""Nesting depth checked; deeper values are accepted unchecked (bounded work on adversarial JSON)."""


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_finite_number(v: Any) -> bool:
    """JSON numbers only: Python's `json` also reads `NaN` / `Infinity`, and an integer past float range
    (a 401-digit amount) cannot become a float; both are the model's mistake, never a value to act on."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_int,
    "number": _is_finite_number,
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def json_type(v: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object" if isinstance(v, dict) else type(v).__name__


def _number_text(v: float) -> str:
    # bit_length, not str(): str() of a huge int is itself limited (and slow)
    return f"an integer of about {int(v.bit_length() * math.log10(2)) + 1} digits" if isinstance(v, int) else repr(v)


def check_value(v: Any, schema: Any, depth: int = 0) -> str | None:
    """Why `v` does not match `schema` ("must be integer, got string"), or None when it does."""
    if not isinstance(schema, Mapping) or depth > MAX_DEPTH:
        return None
    any_of = schema.get("anyOf")
    if isinstance(any_of, list) and any_of:
        problems = [check_value(v, s, depth + 1) for s in any_of]
        if all(problems):
            return problems[0]
    want = schema.get("type")
    names = [want] if isinstance(want, str) else [t for t in want if isinstance(t, str)] if isinstance(want, list) else []
    known = [t for t in names if t in _TYPE_CHECKS]
    if known and not any(_TYPE_CHECKS[t](v) for t in known):
        if "number" in known and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"must be a finite number, got {_number_text(v)}"
        return f"must be {' or '.join(known)}, got {json_type(v)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and v not in enum:
        return f"must be one of {enum[:10]}, got {v!r:.60}"
    if isinstance(v, list):
        for i, item in enumerate(v):
            problem = check_value(item, schema.get("items"), depth + 1)
            if problem:
                return f"item {i} {problem}"
    if isinstance(v, dict) and ("properties" in schema or "required" in schema):
        problem = check_object(v, schema, extra_allowed=schema.get("additionalProperties") is not False,
                               depth=depth + 1)
        if problem:
            return problem
    return None


def check_object(obj: Mapping[str, Any], schema: Mapping[str, Any], *, extra_allowed: bool,
                 depth: int = 0) -> str | None:
    """Required keys present, no unknown keys unless allowed, each value matching its property schema."""
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = schema.get("required")
    for key in required if isinstance(required, list) else []:
        if key not in obj:
            return f"missing required argument '{key}'"
    for key, value in obj.items():
        if key not in props:
            if not extra_allowed:
                return f"unexpected argument '{key:.60}'"
            continue
        problem = check_value(value, props[key], depth)
        if problem:
            return f"argument '{key}' {problem}"
    return None


def check_arguments(tool: str, arguments: Mapping[str, Any], schema: Any) -> str | None:
    """Top-level check of one call: unknown arguments are always errors (a typo must not pass silently)."""
    if not isinstance(schema, Mapping):
        return None
    problem = check_object(arguments, schema, extra_allowed=False)
    return f"tool '{tool}': {problem}" if problem else None
