"""The world layout every domain's tools read, as data, and `validate_world`, which checks an imported world
against it at load time (a task file's `{"bank": {}}` fails there, naming the field, never mid-rollout).

A shape is a type name (`"string"`, `"number"`), `("map", shape)` (an object of any keys, each value of
`shape`), `("list", shape)`, or a dict of keys to shapes (a key ending in `?` is optional; other keys are
allowed and ignored). The layout mirrors the table in `mosaic_ray.envs.domains`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["WORLD_SHAPES", "WorldError", "validate_world"]

_S, _N = "string", "number"
WORLD_SHAPES: dict[str, Any] = {
    "mail": {"contacts": ("map", _S), "inbox": ("list", {"from": _S, "body": _S})},
    "files": ("map", _S),
    "bank": {"account": _S, "balance": _N, "bills": ("map", _S), "transfers": ("list", {"to": _S, "amount": _N})},
    "web": {"pages": ("map", _S), "forms": ("list", {"site": _S, "text": _S})},
    "calendar": {"events": ("list", {"title": _S, "day": _S, "guest?": _S, "notes?": _S})},
    "social": {"messages": ("map", ("list", _S)), "posts": ("list", _S)},
    "machine": {"fs": ("map", _S), "users": ("list", _S), "logs": ("map", _S), "home": _S},
    "outbox": ("list", {"channel": _S, "to": _S, "text": _S}),
    "trash": ("list", _S),
}
"""Top-level world key → shape of its value."""


class WorldError(ValueError):
    """An imported world does not have the layout its tools read; the message names the field."""


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _check(value: Any, shape: Any, where: str) -> None:
    if shape == _S:
        if not isinstance(value, str):
            raise WorldError(f"field '{where}': expected a string, got {_json_type(value)}")
    elif shape == _N:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WorldError(f"field '{where}': expected a finite number, got {_json_type(value)} {value!r:.40}")
    elif isinstance(shape, tuple) and shape[0] == "map":
        if not isinstance(value, dict):
            raise WorldError(f"field '{where}': expected an object, got {_json_type(value)}")
        for k, v in value.items():
            _check(v, shape[1], f"{where}.{k}")
    elif isinstance(shape, tuple) and shape[0] == "list":
        if not isinstance(value, list):
            raise WorldError(f"field '{where}': expected a list, got {_json_type(value)}")
        for i, v in enumerate(value):
            _check(v, shape[1], f"{where}[{i}]")
    else:
        if not isinstance(value, dict):
            raise WorldError(f"field '{where}': expected an object, got {_json_type(value)}")
        for key, sub in shape.items():
            name = key.rstrip("?")
            if name in value:
                _check(value[name], sub, f"{where}.{name}")
            elif not key.endswith("?"):
                raise WorldError(f"field '{where}.{name}': missing")


def validate_world(world: Any, tools: Iterable[str] = ()) -> None:
    """Check `world` against `WORLD_SHAPES`, and that every world key the `tools` read is present.

    Raises `WorldError` (a ValueError) naming the field, e.g. `field 'world.bank.balance': expected a finite
    number, got string 'lots'`."""
    from mosaic_ray.envs import TOOLS

    if not isinstance(world, Mapping):
        raise WorldError(f"field 'world': expected an object, got {_json_type(world)}")
    for tool in tools:
        spec = TOOLS.get(tool)
        for key in spec.injected.values() if spec is not None else ():
            if key not in world:
                raise WorldError(f"field 'world.{key}': missing (tool '{tool}' reads it)")
    for key, shape in WORLD_SHAPES.items():
        if key in world:
            _check(world[key], shape, f"world.{key}")
