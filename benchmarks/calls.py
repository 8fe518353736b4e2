"""The project's call format for benchmark policies: write a turn as text, parse it back with the protocol.

Every benchmark policy — scripted or model — answers in MOSAIC turn text (`<think>…</think>` then one
`<tool_call>{"name", "arguments"}</tool_call>`, a `refuse` call, or a final answer), and adapters act only on what
`mosaic_ray.protocol.parse_turn` makes of that text. BFCL's parallel categories need several calls in one turn,
which the MOSAIC protocol calls "two actions" (a format error): `parse_calls` splits such a turn into one
`<tool_call>` block per call and parses each block with the protocol's own parser.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mosaic_ray.protocol import format_call, parse_turn
from mosaic_ray.types import ParsedTurn

FAMILY = "hermes"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
POLICY_KINDS = ("scripted", "model")


def split_spec(policy_spec: str) -> tuple[str, str]:
    """`scripted:NAME` or `model:DIR` → (kind, NAME|DIR); anything else is a ValueError naming the spec."""
    kind, sep, arg = policy_spec.partition(":")
    if not sep or kind not in POLICY_KINDS or not arg:
        raise ValueError(f"--policy {policy_spec!r}: expected scripted:NAME or model:DIR")
    return kind, arg


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """One MOSAIC turn that calls `name` (what a well-formed policy writes)."""
    return f"<think>Call {name}.</think>\n{format_call(name, dict(arguments), FAMILY)}"


def tool_calls_text(calls: list[tuple[str, Mapping[str, Any]]]) -> str:
    """One turn with several calls (BFCL parallel): one `<tool_call>` block each; read back with `parse_calls`."""
    return "<think>Call the tools.</think>\n" + "\n".join(format_call(n, dict(a), FAMILY) for n, a in calls)


def answer_text(answer: str) -> str:
    """One MOSAIC turn that gives a final answer (an empty answer becomes "Done.", which the parser accepts)."""
    return f"<think>Answer the user.</think>\n{answer.strip() or 'Done.'}"


def parse_one(text: str, tools: Mapping[str, dict] | None) -> ParsedTurn:
    """The protocol's verdict on one turn; `tools` maps tool name → argument JSON schema (None: names unchecked)."""
    return parse_turn(text, family=FAMILY, tools=tools)


def parse_calls(text: str, tools: Mapping[str, dict] | None) -> list[ParsedTurn]:
    """A turn with any number of `<tool_call>` blocks → one ParsedTurn per block (or one for a plain turn).

    The think block (if any) is kept in front of each block so each parses as a well-formed single-call turn.
    A stray or unclosed tag leaves the text unsplit, so the protocol reports the format error itself.
    """
    blocks = _BLOCK.findall(text)
    if len(blocks) < 2 or text.count(CALL_OPEN) != len(blocks):
        return [parse_one(text, tools)]
    head = text[: text.find(CALL_OPEN)]
    return [parse_one(f"{head}{CALL_OPEN}{b}{CALL_CLOSE}", tools) for b in blocks]
