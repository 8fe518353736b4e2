"""Tag vocabulary of the MOSAIC turn and the per-family tool-call syntax.

Every family shares the `<think>` plan and the optional `<safety_thoughts>` check; they differ only in how one
action is written. Hermes (Qwen2.5 / Qwen3 / the tiny model) wraps one JSON object in `<tool_call>…</tool_call>`,
the syntax those models' own chat templates teach. Phi4 wraps a JSON *list* of calls in
`<|tool_call|>…<|/tool_call|>`, so "two actions" can also be two list items. Phi-4 (14B) was not trained on tool
use and has no tool syntax of its own: this is the list convention of Phi-4-mini, written as plain text (no special
tokens in Phi-4's vocabulary) and taught to Phi-4 by the project's template (`model.chat_template: phi4`,
`mosaic_ray/models/templates/phi4.jinja`) and by `system_prompt(style, "phi4")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SAFETY_OPEN, SAFETY_CLOSE = "<safety_thoughts>", "</safety_thoughts>"

EOS_REMNANTS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|end|>")
"""End-of-turn markers an engine may leave at the end of decoded text; stripped before parsing."""

CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>", "<|end|>",
                                   "<tool_response>", "</tool_response>")
"""Chat-template markers a policy must never write inside a turn (a `<tool_response>` would be a forged
observation); any of them left after stripping the trailing remnants is a format error."""

REFUSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reason": {"type": "string", "description": "Why the request is refused, for the user."}},
    "required": ["reason"],
}
"""JSON schema of the built-in terminal `refuse` tool."""

REFUSE_DESCRIPTION = "Refuse the request and end the episode; say why in `reason`."


@dataclass(frozen=True)
class Family:
    """How one model family writes a tool call."""

    name: str
    call_open: str
    call_close: str
    payload: Literal["object", "list"]
    """`object`: one `{"name", "arguments"}` object; `list`: a JSON list of such objects (one allowed)."""


HERMES = Family("hermes", "<tool_call>", "</tool_call>", "object")
PHI4 = Family("phi4", "<|tool_call|>", "<|/tool_call|>", "list")
FAMILIES: dict[str, Family] = {f.name: f for f in (HERMES, PHI4)}

ACTION_TAGS: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in (f.call_open, f.call_close))
ALL_TAGS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, SAFETY_OPEN, SAFETY_CLOSE, *ACTION_TAGS, *CONTROL_TOKENS)


def get_family(name: str) -> Family:
    """The family spec for `name`; a ValueError lists the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown tool-call family {name!r}; known: {sorted(FAMILIES)}") from None
