"""Total parsers of one assistant turn: any string → a `ParsedTurn` (an action, or a format error with a reason).

A turn is `<think>plan</think>`, an optional `<safety_thoughts>check</safety_thoughts>`, then exactly one action:
a tool call, the terminal `refuse` tool, or a final answer (plain text). The parsers never raise on a `str`:
failures are values (`kind="format_error"`, `error=reason`), so a rollout can score a broken turn instead of
crashing. Work is linear in the input (`str.find` / `str.count`, one `json.loads`) and the input is capped at
`MAX_TURN_CHARS`.

Scoring: a hard problem (no action, two actions, bad JSON, unknown tool, wrong argument types, forged
`<tool_response>`, …) is a format error with score 0. A soft problem on an otherwise valid action (missing or
unclosed `<think>`, safety check after the action, text around the tool call, missing close tag) keeps the action
and subtracts its penalty, so the format reward still ranks "almost right" above "broken". A `</think>` without
`<think>` counts as a think block opened by the prompt: Qwen3-thinking templates put `<think>\\n` in the
generation prompt, so the completion starts inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from mosaic_ray.protocol.argcheck import check_arguments, json_type
from mosaic_ray.protocol.families import (
    ACTION_TAGS,
    ALL_TAGS,
    CONTROL_TOKENS,
    EOS_REMNANTS,
    HERMES,
    PHI4,
    REFUSE_SCHEMA,
    SAFETY_CLOSE,
    SAFETY_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    Family,
)
from mosaic_ray.types import REFUSE_TOOL, ParsedTurn

MAX_TURN_CHARS = 200_000
"""Longer turns are format errors without being scanned (a real turn is a few thousand characters)."""

MIN_VALID_SCORE = 0.1
"""Floor of the score of a turn whose action is valid, so it always beats a format error (0)."""

PENALTY = {
    "missing_think": 0.5,
    "unclosed_think": 0.5,
    "unclosed_safety": 0.5,
    "unclosed_call": 0.5,
    "late_safety": 0.25,
    "text_before_call": 0.25,
    "text_after_call": 0.25,
    "call_not_list": 0.25,
}
"""Score lost per soft problem (1 − Σ, floored at MIN_VALID_SCORE)."""

CountTokens = Callable[[str], int]


class _Fail(Exception):
    """Internal control flow only: `_parse` turns it into a format-error ParsedTurn before returning."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Turn:
    """Mutable scratch state of one parse."""

    def __init__(self) -> None:
        self.think: str | None = None
        self.safety: str | None = None
        self.soft: list[tuple[str, str]] = []  # (penalty key, reason)

    def flag(self, key: str, reason: str) -> None:
        self.soft.append((key, reason))


# ---------------------------------------------------------------- public: one pure function per family

def parse_hermes(text: str, *, tools: Mapping[str, dict] | None = None,
                 count_tokens: CountTokens | None = None) -> ParsedTurn:
    """Qwen/Hermes family: the action is `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`."""
    return _parse(text, HERMES, tools, count_tokens)


def parse_phi4(text: str, *, tools: Mapping[str, dict] | None = None,
               count_tokens: CountTokens | None = None) -> ParsedTurn:
    """Phi-4 family: the action is `<|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>` (one list item)."""
    return _parse(text, PHI4, tools, count_tokens)


Parser = Callable[..., ParsedTurn]
PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "phi4": parse_phi4}


def get_parser(family: str) -> Parser:
    """The registered parser of `family` (a ValueError lists the known families)."""
    try:
        return PARSERS[family]
    except KeyError:
        raise ValueError(f"no parser for family {family!r}; known: {sorted(PARSERS)}") from None


def parse_turn(text: str, *, family: str = "hermes", tools: Mapping[str, dict] | None = None,
               count_tokens: CountTokens | None = None) -> ParsedTurn:
    """Parse one assistant turn with the parser of `family`.

    `tools` maps tool name → JSON schema of its arguments; when given, unknown tools and argument problems are
    format errors naming the tool and argument (`refuse` is always checked against `REFUSE_SCHEMA` unless
    `tools` overrides it). `count_tokens` measures `safety_tokens`; without it, whitespace words are counted.
    Never raises for a `str` (an unknown `family` is a caller bug and raises ValueError).
    """
    return get_parser(family)(text, tools=tools, count_tokens=count_tokens)


# ---------------------------------------------------------------- shared machinery

def _parse(text: str, fam: Family, tools: Mapping[str, dict] | None, count_tokens: CountTokens | None) -> ParsedTurn:
    turn = _Turn()
    try:
        kind, tool, arguments, answer = _parse_body(text, fam, tools, turn)
    except _Fail as fail:
        return ParsedTurn(kind="format_error", think=turn.think, safety_thoughts=turn.safety, error=fail.reason,
                          format_score=0.0, safety_tokens=_safety_tokens(turn.safety, count_tokens))
    score = max(MIN_VALID_SCORE, 1.0 - sum(PENALTY[key] for key, _ in turn.soft)) if turn.soft else 1.0
    return ParsedTurn(kind=kind, think=turn.think, safety_thoughts=turn.safety, tool=tool, arguments=arguments,
                      answer=answer, error="; ".join(r for _, r in turn.soft) or None, format_score=score,
                      safety_tokens=_safety_tokens(turn.safety, count_tokens))


def _safety_tokens(safety: str | None, count_tokens: CountTokens | None) -> int:
    if not safety:
        return 0
    return int(count_tokens(safety)) if count_tokens is not None else len(safety.split())


def _parse_body(text: Any, fam: Family, tools: Mapping[str, dict] | None, turn: _Turn):
    if not isinstance(text, str):
        raise _Fail(f"turn is {type(text).__name__}, not str")
    if len(text) > MAX_TURN_CHARS:
        raise _Fail(f"turn too long: {len(text)} chars > {MAX_TURN_CHARS}")
    body = _strip_remnants(text)
    if not body:
        raise _Fail("empty turn")
    for token in CONTROL_TOKENS:
        if token in body:
            raise _Fail(f"control token {token} inside the turn")
    rest = _take_think(body, fam, turn)
    rest = _take_safety(rest, fam, turn)
    if fam.call_open in rest or fam.call_close in rest:
        return _take_call(rest, fam, tools, turn)
    return _take_answer(rest, fam)


def _strip_remnants(text: str) -> str:
    """Drop surrounding whitespace and trailing end-of-turn markers (an engine may decode the eos it stopped on).
    Moves an end index instead of slicing per marker, so a text of 20k repeated markers stays linear."""
    end = len(text)
    changed = True
    while changed:
        changed = False
        while end > 0 and text[end - 1].isspace():
            end -= 1
        for remnant in EOS_REMNANTS:
            if text.endswith(remnant, 0, end):
                end -= len(remnant)
                changed = True
    return text[:end].strip()


def _first(text: str, needles: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest needle in text[start:], or -1."""
    hits = [i for i in (text.find(n, start) for n in needles) if i >= 0]
    return min(hits) if hits else -1


def _take_think(body: str, fam: Family, turn: _Turn) -> str:
    """Fill turn.think and return what follows the think block."""
    s = body.lstrip()
    if s.startswith(THINK_OPEN):
        start = len(THINK_OPEN)
        close = s.find(THINK_CLOSE, start)
        if close < 0:
            nxt = _first(s, (SAFETY_OPEN, fam.call_open), start)
            if nxt < 0:
                raise _Fail("unclosed <think>: no </think> and no action after it (truncated turn?)")
            turn.think = s[start:nxt].strip()
            turn.flag("unclosed_think", "unclosed <think> (no </think> before the action)")
            rest = s[nxt:]
        else:
            turn.think = s[start:close].strip()
            rest = s[close + len(THINK_CLOSE):]
        if THINK_OPEN in turn.think:
            raise _Fail("nested <think> inside <think>")
    elif THINK_CLOSE in s:
        close = s.find(THINK_CLOSE)
        head = s[:close]
        if any(tag in head for tag in ALL_TAGS):
            raise _Fail("</think> after other tags (misplaced </think>)")
        turn.think = head.strip()
        rest = s[close + len(THINK_CLOSE):]
    else:
        turn.flag("missing_think", "missing <think> plan")
        rest = s
    for tag in (SAFETY_OPEN, fam.call_open):
        if tag in (turn.think or ""):
            raise _Fail(f"{tag} inside <think>")
    if THINK_OPEN in rest:
        raise _Fail("repeated <think> block")
    if THINK_CLOSE in rest:
        raise _Fail("stray </think> after the think block")
    return rest


def _take_safety(rest: str, fam: Family, turn: _Turn) -> str:
    """Fill turn.safety (a check after the action is accepted with a penalty) and return the action text."""
    s = rest.lstrip()
    at = s.find(SAFETY_OPEN)
    if at < 0:
        if SAFETY_CLOSE in s:
            raise _Fail("</safety_thoughts> without <safety_thoughts>")
        return s
    start = at + len(SAFETY_OPEN)
    close = s.find(SAFETY_CLOSE, start)
    if close < 0:
        nxt = s.find(fam.call_open, start) if at == 0 else -1
        if nxt < 0:
            raise _Fail("unclosed <safety_thoughts>: no </safety_thoughts> (truncated turn?)")
        turn.safety = s[start:nxt].strip()
        turn.flag("unclosed_safety", "unclosed <safety_thoughts> (no </safety_thoughts> before the action)")
        remaining = s[nxt:]
    else:
        turn.safety = s[start:close].strip()
        remaining = s[:at] + s[close + len(SAFETY_CLOSE):]
    if at > 0 and (fam.call_open in s[:at] or fam.call_open not in remaining[at:]):
        turn.flag("late_safety", "<safety_thoughts> placed after the action")
    if SAFETY_OPEN in turn.safety:
        raise _Fail("nested <safety_thoughts> inside <safety_thoughts>")
    if fam.call_open in turn.safety:
        raise _Fail(f"{fam.call_open} inside <safety_thoughts>")
    if SAFETY_OPEN in remaining:
        raise _Fail("repeated <safety_thoughts> block")
    if SAFETY_CLOSE in remaining:
        raise _Fail("stray </safety_thoughts>")
    return remaining.strip()


def _take_call(rest: str, fam: Family, tools: Mapping[str, dict] | None, turn: _Turn):
    opens = rest.count(fam.call_open)
    if opens > 1:
        raise _Fail(f"two actions: {opens} {fam.call_open} blocks in one turn")
    if opens == 0:
        raise _Fail(f"{fam.call_close} without {fam.call_open}")
    at = rest.find(fam.call_open)
    if rest.count(fam.call_close) > 1:
        raise _Fail(f"repeated {fam.call_close}")
    if rest[:at].strip():
        turn.flag("text_before_call", f"text before {fam.call_open}")
    start = at + len(fam.call_open)
    close = rest.find(fam.call_close, start)
    if 0 <= close < at:
        raise _Fail(f"{fam.call_close} before {fam.call_open}")
    payload = rest[start:close] if close >= 0 else rest[start:]
    call = _decode_call(payload, fam, turn, closed=close >= 0)
    if close < 0:
        turn.flag("unclosed_call", f"missing {fam.call_close}")
    elif rest[close + len(fam.call_close):].strip():
        turn.flag("text_after_call", f"text after {fam.call_close}")
    tool, arguments = _check_call(call, tools)
    return ("refuse" if tool == REFUSE_TOOL else "tool_call"), tool, arguments, None


def _decode_call(payload: str, fam: Family, turn: _Turn, *, closed: bool) -> Any:
    """The single call object inside the tags (for `list` families: the single list item)."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
        where = "" if closed else f"truncated {fam.call_open} (no {fam.call_close}) and "
        raise _Fail(f"{where}invalid JSON in {fam.call_open}: {str(exc)[:120]}") from None
    if fam.payload == "object":
        if not isinstance(value, dict):
            raise _Fail(f"tool call JSON is {json_type(value)}, expected an object with \"name\" and \"arguments\"")
        return value
    if isinstance(value, dict):
        turn.flag("call_not_list", f"{fam.call_open} holds an object, expected a JSON list")
        return value
    if not isinstance(value, list):
        raise _Fail(f"tool call JSON is {json_type(value)}, expected a list of calls")
    if not value:
        raise _Fail(f"empty call list in {fam.call_open}: no action")
    if len(value) > 1:
        raise _Fail(f"two actions: {len(value)} calls in one {fam.call_open} list")
    if not isinstance(value[0], dict):
        raise _Fail(f"tool call is {json_type(value[0])}, expected an object with \"name\" and \"arguments\"")
    return value[0]


def _check_call(call: dict, tools: Mapping[str, dict] | None) -> tuple[str, dict]:
    if "name" not in call:
        raise _Fail("tool call has no \"name\"")
    name = call["name"]
    if not isinstance(name, str) or not name.strip():
        raise _Fail(f"tool call \"name\" must be a non-empty string, got {json_type(name)}")
    if "arguments" not in call:
        raise _Fail(f"tool call '{name:.60}' has no \"arguments\"")
    arguments = call["arguments"]
    if not isinstance(arguments, dict):
        raise _Fail(f"tool call '{name:.60}': \"arguments\" must be an object, got {json_type(arguments)}")
    if name == REFUSE_TOOL:
        schema = tools.get(REFUSE_TOOL, REFUSE_SCHEMA) if tools is not None else REFUSE_SCHEMA
    elif tools is not None:
        if name not in tools:
            known = ", ".join([*sorted(set(tools) - {REFUSE_TOOL})[:12], REFUSE_TOOL])
            raise _Fail(f"unknown tool '{name:.60}' (known: {known})")
        schema = tools[name]
    else:
        return name, arguments
    problem = check_arguments(name, arguments, schema)
    if problem:
        raise _Fail(problem)
    return name, arguments


def _take_answer(rest: str, fam: Family):
    answer = rest.strip()
    if not answer:
        raise _Fail("no action: nothing after the think/safety blocks")
    for tag in ACTION_TAGS:
        if tag in answer:
            raise _Fail(f"{tag} is not a {fam.name} action tag")
    for tag in ALL_TAGS:
        for cut in range(2, len(tag)):
            if answer.endswith(tag[:cut]):
                raise _Fail(f"truncated tag {tag[:cut]!r} at the end of the turn")
    if answer[0] in "{[":
        try:
            value = json.loads(answer)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = value[0]
        if isinstance(value, dict) and "name" in value:
            raise _Fail(f"tool call JSON without {fam.call_open} tags")
    return "answer", None, None, answer
