"""Typed records shared by the protocol, sandboxes, graders, judge and rollouts.

Plain dataclasses with no Ray or torch imports. Arrow twins of `Step` and `Outcome` live in
`mosaic_ray.schema`; field names here are the column names there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Category = Literal["harmful", "benign", "injection", "privacy"]
CATEGORIES: tuple[str, ...] = ("harmful", "benign", "injection", "privacy")

ActionKind = Literal["tool_call", "refuse", "answer", "format_error"]
"""What one assistant turn did: call a tool, call the terminal `refuse` tool, give a final answer
(terminal), or fail to parse (a format error, which ends the turn without acting)."""

REFUSE_TOOL = "refuse"


@dataclass(frozen=True)
class ParsedTurn:
    """The parser's verdict on one assistant turn. The parser is total: every string maps to one."""

    kind: ActionKind
    think: str | None = None
    """Text inside `<think>…</think>`, or None when the tag is absent."""
    safety_thoughts: str | None = None
    """Text inside `<safety_thoughts>…</safety_thoughts>`, or None when the check was skipped."""
    tool: str | None = None
    """Tool name for `tool_call` and `refuse` (`"refuse"`)."""
    arguments: dict[str, Any] | None = None
    answer: str | None = None
    """Final answer text for `answer`."""
    error: str | None = None
    """Why the turn is a format error (or a soft format problem on a valid action)."""
    format_score: float = 0.0
    """Per-turn format score in [0, 1]: 1 = well-formed think / optional check / exactly one action."""
    safety_tokens: int = 0
    """Tokens (or whitespace words when no tokenizer is given) spent inside `<safety_thoughts>`."""


@dataclass(frozen=True)
class Step:
    """One assistant turn of an episode and what the sandbox answered."""

    think: str | None
    safety_thoughts: str | None
    action_kind: ActionKind
    tool: str | None
    arguments_json: str | None
    observation: str | None
    format_ok: bool
    num_tokens: int = 0
    safety_tokens: int = 0
    answer: str | None = None
    """The final answer's text (`action_kind == "answer"`), else None."""


@dataclass
class Outcome:
    """Programmatic grade of one episode (from the action trace and the final world state)."""

    terminal: str
    """How the episode ended: refused | answered | max_steps | max_tokens | format_error | error."""
    refused_at_step: int | None = None
    """0-based step index of the `refuse` call, or None."""
    harmful_action_step: int | None = None
    """0-based step index of the first harmful tool call that executed (harmful tasks), or None."""
    benign_success: bool = False
    """The user's legitimate goal was achieved (benign, injection and privacy tasks)."""
    benign_progress: float = 0.0
    """Partial credit in [0, 1] towards the user's goal."""
    injection_followed: bool = False
    """An injected goal was executed (injection tasks)."""
    leaked_items: list[str] = field(default_factory=list)
    """Sensitive items that reached an unauthorised recipient (privacy and injection tasks)."""
    unsafe_before_refusal: bool = False
    """A harmful / injected / leaking call executed before the episode refused or stopped."""
    over_refused: bool = False
    """A legitimate task (benign, injection user goal, privacy) was refused."""
    num_steps: int = 0
    num_tokens: int = 0
    safety_tokens: int = 0
    safety_checks: int = 0
    format_errors: int = 0
    error: str | None = None
