"""Tool runtime: typed Python functions become validated, sandboxed tools over an in-memory world.

A tool is a plain function with a one-line summary and an `Args:` docstring section naming every argument.
`make_tool` reads the signature and the docstring and builds the JSON schema the model sees; a missing summary
or argument description is a `ValueError` at import time, so no tool ships undocumented. World state comes in
through `Annotated[dict, Depends("key")]` parameters, which the schema hides: the model cannot name them, the
sandbox fills them from the episode's world (a JSON-like dict tree, deep-copied per episode).

Why errors are values: a model's bad call (unknown tool, wrong type, missing file, insufficient funds) is an
observation the agent can react to, never a crash of the rollout worker. `strict=True` turns them back into
exceptions, for ground-truth replay in tests where any error is a bug in the scenario.

No tool touches the host: tools only read and write the world dict passed in. The sandbox adds the limits:
argument size, observation size (truncated with a marker) and per-call time (a call over budget is rolled back
and reported). The time limit is enforced while the call runs: the tool runs in its own thread on a copy of
the world, and at the limit the episode gets the error at once, the copy is dropped and the thread is asked
to stop (an exception raised into it at its next bytecode; a call stuck inside C code ends on its own).
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import json
import math
import re
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

__all__ = ["Depends", "Limits", "Sandbox", "ToolCall", "ToolCallError", "ToolError", "ToolSpec", "make_tool"]


class ToolError(Exception):
    """Raised by a tool body for a domain failure (missing file, insufficient funds); shown as `ToolError: …`."""


class ToolCallError(Exception):
    """Raised by `Sandbox.call(strict=True)`; the message is the observation a non-strict call would return."""


@dataclass(frozen=True)
class Depends:
    """Marks a tool parameter as injected from the world: `Annotated[dict, Depends("bank")]` gets `world["bank"]`."""

    key: str


@dataclass(frozen=True)
class ToolCall:
    """One call a policy makes: tool name and JSON arguments."""

    tool: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "args": dict(self.args)}


_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
MAX_INT = 2**63 - 1
"""Largest integer argument a tool accepts (a model's 401-digit number is a validation error, not a crash)."""


@dataclass(frozen=True)
class ToolSpec:
    """A registered tool: its public schema plus the function and which parameters are injected."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the visible arguments (`{"type": "object", "properties", "required"}`)."""
    fn: Callable[..., str]
    injected: dict[str, str]
    """Parameter name → world key for `Depends` parameters."""
    arg_types: dict[str, Any]
    domain: str = ""

    def schema(self) -> dict[str, Any]:
        """OpenAI / `apply_chat_template(tools=...)` function schema."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _parse_docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.partition("\n\n")[0]
    args: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            m = re.match(r"\s+(\w+):\s*(.+)", line)
            if m:
                args[m.group(1)] = m.group(2).strip()
            elif line.strip():
                in_args = False
    if summary.strip().startswith("Args:"):
        summary = ""
    return " ".join(summary.split()), args


def make_tool(fn: Callable[..., str], *, domain: str = "") -> ToolSpec:
    """Build a `ToolSpec` from a typed, documented function; `ValueError` names what is missing."""
    summary, arg_docs = _parse_docstring(fn)
    if not summary:
        raise ValueError(f"tool {fn.__name__}: docstring summary is missing")
    hints = typing.get_type_hints(fn, include_extras=True)
    props: dict[str, Any] = {}
    required: list[str] = []
    injected: dict[str, str] = {}
    arg_types: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        if hint is None:
            raise ValueError(f"tool {fn.__name__}: parameter {name!r} has no type annotation")
        if typing.get_origin(hint) is Annotated:
            dep = next((m for m in hint.__metadata__ if isinstance(m, Depends)), None)
            if dep is not None:
                injected[name] = dep.key
                continue
            hint = typing.get_args(hint)[0]
        if hint not in _JSON_TYPES:
            raise ValueError(f"tool {fn.__name__}: parameter {name!r} has unsupported type {hint!r}")
        if name not in arg_docs:
            raise ValueError(f"tool {fn.__name__}: parameter {name!r} has no description in the Args: section")
        props[name] = {"type": _JSON_TYPES[hint], "description": arg_docs[name]}
        arg_types[name] = hint
        if param.default is inspect.Parameter.empty:
            required.append(name)
    parameters = {"type": "object", "properties": props, "required": required}
    return ToolSpec(fn.__name__, summary, parameters, fn, injected, arg_types, domain)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Validate one argument; numeric strings are accepted for numbers (models often quote amounts)."""
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT:
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_INT:
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
            return int(value)
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float range (a 401-digit amount)
                number = None
        elif isinstance(value, str) and len(value) <= 64:
            try:
                number = float(value.strip().lstrip("$"))
            except ValueError:
                number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None or isinstance(value, (int, float)):
            raise ToolCallError(f"ValidationError: argument {name!r} must be a finite number, got {_short(value)}")
    raise ToolCallError(f"ValidationError: argument {name!r} must be {_JSON_TYPES[tp]}, got {_short(value)}")


def _short(value: Any) -> str:
    """repr of an argument, cut (a 401-digit number or a long string stays readable in the observation)."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Limits:
    """Per-call limits (defaults mirror `ProtocolConfig`)."""

    max_argument_chars: int = 2000
    max_observation_chars: int = 1200
    timeout_s: float = 2.0


class Sandbox:
    """One episode's world plus the tools it may call. The world is deep-copied on construction."""

    def __init__(self, world: Mapping[str, Any], tools: Mapping[str, ToolSpec], limits: Limits | None = None):
        self.world: dict[str, Any] = copy.deepcopy(dict(world))
        self.tools = dict(tools)
        self.limits = limits or Limits()

    def call(self, name: str, args: Any, *, strict: bool = False) -> tuple[str, bool]:
        """Run one tool call → (observation, ok). Errors are observations unless `strict`, which raises."""
        try:
            return self._call(name, args), True
        except ToolCallError as e:
            if strict:
                raise
            return str(e), False

    def _call(self, name: str, args: Any) -> str:
        spec = self.tools.get(name)
        if spec is None:
            raise ToolCallError(f"ValidationError: unknown tool {name!r}; available: {', '.join(sorted(self.tools))}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ToolCallError(f"ValidationError: arguments of {name} must be an object, got {type(args).__name__}")
        try:
            size = len(json.dumps(args, default=str))
        except ValueError:  # an integer too long to print (Python's int-to-str limit)
            size = self.limits.max_argument_chars + 1
        if size > self.limits.max_argument_chars:
            raise ToolCallError(f"ValidationError: arguments of {name} are {size} chars "
                                f"(limit {self.limits.max_argument_chars})")
        unknown = sorted(set(args) - set(spec.arg_types))
        if unknown:
            raise ToolCallError(f"ValidationError: {name} has no argument {unknown[0]!r}; "
                                f"arguments: {', '.join(spec.arg_types) or 'none'}")
        missing = [a for a in spec.parameters["required"] if a not in args]
        if missing:
            raise ToolCallError(f"ValidationError: {name} is missing argument {missing[0]!r}")
        kwargs = {a: _coerce(v, spec.arg_types[a], a) for a, v in args.items()}
        for param, key in spec.injected.items():
            if key not in self.world:
                raise ToolCallError(f"ToolError: {name} is not available in this environment")
            kwargs[param] = self.world[key]
        # The call works on a copy of the world, committed only when it returns in time: a call over its limit
        # is abandoned at the limit (not measured after it returns), and whatever it keeps doing touches
        # nothing the episode sees.
        work = copy.deepcopy(self.world)
        for param, key in spec.injected.items():
            kwargs[param] = work[key]
        result = _run_with_deadline(spec.fn, kwargs, self.limits.timeout_s, name)
        self.world = work
        text = str(result)
        cap = self.limits.max_observation_chars
        if len(text) > cap:
            text = text[:cap] + f" …[truncated {len(text) - cap} chars]"
        return text


class _ToolTimeout(BaseException):
    """Raised into a tool thread that ran past its limit (BaseException: a tool's `except Exception` keeps
    running)."""


def _run_with_deadline(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float, name: str) -> Any:
    """`fn(**kwargs)` in a daemon thread; ToolCallError when it raises ToolError or runs past `timeout_s`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(**kwargs)
        except _ToolTimeout:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_ToolTimeout))
        raise ToolCallError(f"ToolError: {name} ran past its limit after {time.perf_counter() - start:.1f}s "
                            f"(limit {timeout_s}s); its effect was rolled back")
    if "error" in box:
        if isinstance(box["error"], ToolError):
            raise ToolCallError(f"ToolError: {box['error']}") from None
        raise box["error"]
    return box["result"]
