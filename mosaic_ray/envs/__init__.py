"""Sandboxed tool worlds: typed tools over an in-memory world, seven domains, no host access.

`TOOLS` maps every tool name to its `ToolSpec`; `DOMAINS` maps a domain to its tool names. A task exposes one
domain's tools plus the protocol's built-in `refuse` (which the episode handles, not the sandbox).
"""

from __future__ import annotations

from mosaic_ray.envs.domains import DOMAIN_TOOLS
from mosaic_ray.envs.runtime import Depends, Limits, Sandbox, ToolCall, ToolCallError, ToolError, ToolSpec, make_tool
from mosaic_ray.envs.worlds import WORLD_SHAPES, WorldError, validate_world

TOOLS: dict[str, ToolSpec] = {}
DOMAINS: dict[str, tuple[str, ...]] = {}
for _domain, _fns in DOMAIN_TOOLS.items():
    DOMAINS[_domain] = tuple(f.__name__ for f in _fns)
    for _fn in _fns:
        TOOLS[_fn.__name__] = make_tool(_fn, domain=_domain)


def all_tool_specs() -> list[ToolSpec]:
    """Every registered tool, domain by domain."""
    return list(TOOLS.values())


def tool_specs(names: list[str] | tuple[str, ...]) -> list[ToolSpec]:
    """Specs for `names` (unknown names and `refuse` are skipped: refuse is the protocol's, not a sandbox tool)."""
    return [TOOLS[n] for n in names if n in TOOLS]


def make_sandbox(world: dict, tools: list[str] | tuple[str, ...], limits: Limits | None = None) -> Sandbox:
    """A fresh sandbox over a deep copy of `world` exposing only `tools`."""
    return Sandbox(world, {n: TOOLS[n] for n in tools if n in TOOLS}, limits or Limits())


__all__ = [
    "DOMAINS",
    "TOOLS",
    "WORLD_SHAPES",
    "Depends",
    "Limits",
    "Sandbox",
    "ToolCall",
    "ToolCallError",
    "ToolError",
    "ToolSpec",
    "WorldError",
    "all_tool_specs",
    "make_sandbox",
    "make_tool",
    "tool_specs",
    "validate_world",
]
