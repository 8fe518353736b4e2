"""The parser is total: ≥ 10,000 random and mutated turns never raise and always give a valid ParsedTurn.

A seeded mutation fuzzer (truncation, tag duplication and deletion, character flips, JSON corruption, random
unicode, splices, adversarial repetition) runs over well-formed and malformed seed turns of both families, and
hypothesis adds random tag/text soups plus a round-trip property for `format_turn`.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mosaic_ray.protocol import FAMILIES, format_turn, parse_turn
from mosaic_ray.protocol.argcheck import check_arguments
from mosaic_ray.protocol.families import ALL_TAGS
from mosaic_ray.protocol.parse import MAX_TURN_CHARS
from mosaic_ray.types import ParsedTurn

KINDS = {"tool_call", "refuse", "answer", "format_error"}
TOOLS = {
    "transfer_money": {"type": "object", "properties": {"to_account": {"type": "string"}, "amount": {"type": "number"}},
                       "required": ["to_account", "amount"]},
    "send_email": {"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"}},
                                                    "body": {"type": "string"}}, "required": ["to", "body"]},
}
JSON_NOISE = ['{', '}', '[', ']', '"', ':', ',', '\\', '\\u12', 'null', 'NaN', '1e999', '-', '{"name": ', '"arguments"',
              '{"name": "refuse", "arguments": {"reason": "x"}}']
UNICODE = ["\x00", "\u200b", "\ufeff", "\U0001f600", "é", "中文", "\u202e", "\r\n", "\t", "\udcff", "\ud800", "￿"]
FAMILY_NAMES = sorted(FAMILIES)


def seed_turns(family: str) -> list[str]:
    seeds = [
        format_turn(think="pay rent", tool="transfer_money", arguments={"to_account": "AC123", "amount": 900},
                    family=family),
        format_turn(think="harmful", safety_thoughts="this is fraud", tool="refuse",
                    arguments={"reason": "I can't help with fraud."}, family=family),
        format_turn(think="done", safety_thoughts="no private data shared", answer="All set: paid 120 to AC123.",
                    family=family),
        format_turn(think="email", tool="send_email", arguments={"to": ["bob@x.org"], "body": "Hi {name} 👋"},
                    family=family),
        "<think>plan</think>", "plain answer", "", "<|im_end|>",
        '<think>a</think><tool_call>\n{"name": "x", "arguments": {}}\n</tool_call><tool_call>{}</tool_call>',
        '<think>a</think><|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]<|/tool_call|>',
    ]
    return seeds


def mutate(text: str, rng: random.Random, pool: list[str]) -> str:
    op = rng.randrange(10)
    n = len(text)
    i = rng.randint(0, n)
    j = rng.randint(i, n)
    if op == 0:  # truncation (a generation cut by max_new_tokens)
        return text[:i]
    if op == 1:  # duplicate a tag or insert a random one
        return text[:i] + rng.choice(ALL_TAGS) + text[i:]
    if op == 2:  # delete a span (drops tags, quotes, braces)
        return text[:i] + text[j:]
    if op == 3:  # flip characters
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            if chars:
                chars[rng.randrange(len(chars))] = chr(rng.randrange(0x20, 0x250))
        return "".join(chars)
    if op == 4:  # JSON corruption
        return text[:i] + rng.choice(JSON_NOISE) + text[i:]
    if op == 5:  # random unicode, including lone surrogates and control characters
        return text[:i] + "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 3))) + text[i:]
    if op == 6:  # splice with another seed
        other = rng.choice(pool)
        return text[:i] + other[rng.randint(0, len(other)):]
    if op == 7:  # repeat a span
        return text[:i] + text[i:j] * rng.randint(2, 5) + text[j:]
    if op == 8:  # eos remnants and whitespace
        return text[:i] + rng.choice(["<|im_end|>", "<|endoftext|>", "<|end|>", "\n\n", "  "]) + text[i:]
    # swap the order of two halves (tags out of order)
    return text[i:] + text[:i]


def check_invariants(parsed: ParsedTurn, tools: dict | None) -> None:
    assert isinstance(parsed, ParsedTurn)
    assert parsed.kind in KINDS
    assert 0.0 <= parsed.format_score <= 1.0
    assert isinstance(parsed.safety_tokens, int) and parsed.safety_tokens >= 0
    if parsed.kind == "format_error":
        assert parsed.format_score == 0.0 and parsed.error
    else:
        assert parsed.format_score > 0.0
        assert (parsed.error is None) == (parsed.format_score == 1.0)
    if parsed.kind in ("tool_call", "refuse"):
        assert isinstance(parsed.tool, str) and parsed.tool and isinstance(parsed.arguments, dict)
        assert (parsed.kind == "refuse") == (parsed.tool == "refuse")
        if tools is not None and parsed.kind == "tool_call":
            assert parsed.tool in tools and check_arguments(parsed.tool, parsed.arguments, tools[parsed.tool]) is None
        if parsed.kind == "refuse":
            assert isinstance(parsed.arguments.get("reason"), str)
    if parsed.kind == "answer":
        assert isinstance(parsed.answer, str) and parsed.answer.strip()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mutation_fuzz_never_raises(family):
    rng = random.Random(f"mosaic-protocol-{family}")
    pool = seed_turns(family) + seed_turns("hermes" if family == "phi4" else "phi4")
    kinds: dict[str, int] = {}
    for case in range(6_000):  # 2 families × 6,000 = 12,000 mutated turns
        text = rng.choice(pool)
        for _ in range(rng.randint(1, 4)):
            text = mutate(text, rng, pool)
        tools = TOOLS if case % 2 else None
        parsed = parse_turn(text, family=family, tools=tools, count_tokens=len if case % 3 == 0 else None)
        check_invariants(parsed, tools)
        kinds[parsed.kind] = kinds.get(parsed.kind, 0) + 1
    # The fuzzer reaches every outcome (otherwise it is not exercising the parser).
    assert set(kinds) == KINDS, kinds


ADVERSARIAL = [
    "<think>" * 25_000,
    "</think>" * 25_000,
    "<|im_end|>" * 19_000,
    "<think>a</think>" + "<tool_call>" * 15_000,
    "<think>a</think>" + "<" * (MAX_TURN_CHARS - 20),
    "<think>a</think><tool_call>" + "[" * 100_000 + "</tool_call>",
    "<think>a</think><tool_call>" + '{"a":' * 30_000 + "</tool_call>",
    '<think>a</think><tool_call>{"name": "x", "arguments": {"n": ' + "9" * 10_000 + "}}</tool_call>",
    "<think>a</think>" + "x" * (MAX_TURN_CHARS - 16),
    "x" * (MAX_TURN_CHARS + 1),
    "\ud800" * 1000,
]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("index", range(len(ADVERSARIAL)))
def test_huge_and_adversarial_inputs(family, index):
    check_invariants(parse_turn(ADVERSARIAL[index], family=family, tools=TOOLS), TOOLS)


TAG_SOUP = st.lists(st.one_of(st.sampled_from(ALL_TAGS + tuple(JSON_NOISE)), st.text(max_size=12)), max_size=20)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(parts=TAG_SOUP, family=st.sampled_from(FAMILY_NAMES), with_tools=st.booleans())
def test_random_tag_soup_never_raises(parts, family, with_tools):
    tools = TOOLS if with_tools else None
    check_invariants(parse_turn("".join(parts), family=family, tools=tools), tools)


SAFE_TEXT = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=40)
JSON_TEXT = st.text(st.characters(blacklist_characters="<"), max_size=10)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | JSON_TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(think=SAFE_TEXT, safety=st.none() | SAFE_TEXT, family=st.sampled_from(FAMILY_NAMES),
       action=st.sampled_from(["call", "refuse", "answer"]), name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
       arguments=st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=4), answer=SAFE_TEXT)
def test_format_turn_round_trips_any_content(think, safety, family, action, name, arguments, answer):
    """Any tag-free content round-trips; a blank answer is refused up front."""
    assume(answer.strip()[:1] not in ("{", "["))  # JSON-looking answers: covered in test_protocol.py
    if action == "answer" and not answer.strip():
        with pytest.raises(ValueError):
            format_turn(think=think, safety_thoughts=safety, answer=answer, family=family)
        return
    if action == "answer":
        kwargs = {"answer": answer}
    elif action == "refuse":
        kwargs = {"tool": "refuse", "arguments": {"reason": answer}}
    else:
        kwargs = {"tool": name if name != "refuse" else "refuse_not", "arguments": arguments}
    parsed = parse_turn(format_turn(think=think, safety_thoughts=safety, family=family, **kwargs), family=family)
    assert parsed.format_score == 1.0 and parsed.think == think.strip()
    assert parsed.safety_thoughts == (safety.strip() if safety is not None else None)
    if action == "answer":
        assert parsed.answer == answer.strip()
    else:
        assert (parsed.tool, json.dumps(parsed.arguments)) == (kwargs["tool"], json.dumps(kwargs["arguments"]))
