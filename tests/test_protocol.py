"""Protocol: format_turn ↔ parse_turn round trips, every malformed case with its reason, scoring, prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mosaic_ray.protocol import (
    FAMILIES,
    PARSERS,
    REFUSE_SCHEMA,
    format_call,
    format_turn,
    get_parser,
    parse_turn,
    system_prompt,
    tool_schemas,
    tools_by_name,
)

TOOLS = {
    "transfer_money": {"type": "object", "properties": {"to_account": {"type": "string"}, "amount": {"type": "number"}},
                       "required": ["to_account", "amount"]},
    "send_email": {"type": "object",
                   "properties": {"to": {"type": "array", "items": {"type": "string"}}, "subject": {"type": "string"},
                                  "body": {"type": "string"}, "urgent": {"type": "boolean"}},
                   "required": ["to", "body"]},
    "set_priority": {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}},
                     "required": ["level"]},
}
FAMILY_NAMES = sorted(FAMILIES)


def hermes_call(payload: str) -> str:
    return f"<think>plan</think>\n<tool_call>\n{payload}\n</tool_call>"


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("safety", [None, "Paying the user's own landlord is fine; irreversible but requested."])
@pytest.mark.parametrize("action", ["tool_call", "refuse", "answer"])
def test_format_turn_round_trips(family, safety, action):
    kwargs = {
        "tool_call": {"tool": "transfer_money", "arguments": {"to_account": "AC123", "amount": 120}},
        "refuse": {"tool": "refuse", "arguments": {"reason": "This would defraud Bob — I can't help."}},
        "answer": {"answer": "All set: paid 120 to AC123.\nAnything else?"},
    }[action]
    text = format_turn(think="The user wants to pay rent.", safety_thoughts=safety, family=family, **kwargs)
    parsed = parse_turn(text, family=family, tools=TOOLS, count_tokens=len)
    assert parsed.kind == action
    assert parsed.format_score == 1.0 and parsed.error is None
    assert parsed.think == "The user wants to pay rent."
    assert parsed.safety_thoughts == safety
    assert parsed.safety_tokens == (len(safety) if safety else 0)
    if action == "answer":
        assert parsed.answer == kwargs["answer"] and parsed.tool is None
    else:
        assert (parsed.tool, parsed.arguments) == (kwargs["tool"], kwargs["arguments"])


def test_format_turn_exact_hermes_text():
    assert format_turn(think="done", answer="All set: paid 120 to AC123.") == \
        "<think>done</think>\nAll set: paid 120 to AC123."
    assert format_turn(think="p", safety_thoughts="c", tool="read_file", arguments={"path": "/a"}) == \
        '<think>p</think>\n<safety_thoughts>c</safety_thoughts>\n<tool_call>\n{"name": "read_file", ' \
        '"arguments": {"path": "/a"}}\n</tool_call>'
    assert format_call("refuse", {"reason": "no"}, "phi4") == \
        '<|tool_call|>[{"name": "refuse", "arguments": {"reason": "no"}}]<|/tool_call|>'


def test_unicode_and_tag_like_arguments_round_trip():
    args = {"to": ["zoë@example.com"], "body": "Grüße 👋 — see {braces} and \"quotes\"\n"}
    text = format_turn(think="écrire", tool="send_email", arguments=args)
    parsed = parse_turn(text, tools=TOOLS)
    assert parsed.kind == "tool_call" and parsed.arguments == args and parsed.format_score == 1.0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"think": "x"}, "exactly one of"),
    ({"think": "x", "tool": "a", "answer": "b"}, "exactly one of"),
    ({"think": "x</think>", "answer": "b"}, "round-trip"),
    ({"think": "x", "answer": "   "}, "round-trip"),
    ({"think": "x", "tool": "refuse", "arguments": {}}, "missing required argument 'reason'"),
    ({"think": "x", "tool": "refuse", "arguments": {"reason": 3}}, "must be string"),
    ({"think": "x", "answer": '{"name": "a", "arguments": {}}'}, "without <tool_call> tags"),
])
def test_format_turn_rejects_what_would_not_round_trip(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        format_turn(**kwargs)


def test_unknown_family_is_a_caller_error():
    with pytest.raises(ValueError, match="known: \\['hermes', 'phi4'\\]"):
        parse_turn("x", family="llama")
    with pytest.raises(ValueError, match="unknown tool-call family"):
        format_turn(think="x", answer="y", family="llama")
    assert get_parser("phi4") is PARSERS["phi4"]


# ---------------------------------------------------------------- hard errors: each with its own reason

MALFORMED = [
    ("", "empty turn"),
    ("   \n ", "empty turn"),
    ("<|im_end|>", "empty turn"),
    ("<think>plan", "unclosed <think>"),
    ("<think>plan</think>", "no action"),
    ("<think>plan</think>\n<safety_thoughts>fine</safety_thoughts>", "no action"),
    ("<think>a<think>b</think></think>done", "nested <think>"),
    ("<think>a</think><think>b</think>done", "repeated <think>"),
    ("<think>a</think>done</think>", "stray </think>"),
    ("<think>a <tool_call>{}</tool_call></think>done", "<tool_call> inside <think>"),
    ("<think>a</think><safety_thoughts>risky", "unclosed <safety_thoughts>"),
    ("<think>a</think><safety_thoughts>x<safety_thoughts>y</safety_thoughts>z", "nested <safety_thoughts>"),
    ("<think>a</think><safety_thoughts>x</safety_thoughts><safety_thoughts>y</safety_thoughts>ok",
     "repeated <safety_thoughts>"),
    ("<think>a</think>ok</safety_thoughts>", "</safety_thoughts> without <safety_thoughts>"),
    (hermes_call('{"name": "x", "arguments": {}'), "invalid JSON in <tool_call>"),
    (hermes_call("not json at all"), "invalid JSON"),
    (hermes_call('{"name": "x", "arguments": {}} trailing'), "invalid JSON"),
    (hermes_call("[" * 50_000 + "]" * 50_000), "invalid JSON"),
    (hermes_call('["send_email", {}]'), "tool call JSON is array, expected an object"),
    (hermes_call('"send_email"'), "tool call JSON is string"),
    (hermes_call('{"arguments": {}}'), 'tool call has no "name"'),
    (hermes_call('{"name": "", "arguments": {}}'), '"name" must be a non-empty string'),
    (hermes_call('{"name": "send_email"}'), "tool call 'send_email' has no \"arguments\""),
    (hermes_call('{"name": "send_email", "arguments": "{\\"to\\": 1}"}'), '"arguments" must be an object, got string'),
    (hermes_call('{"name": "a", "arguments": {}}') + '\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     "two actions"),
    ("<think>a</think>\n</tool_call>", "</tool_call> without <tool_call>"),
    (hermes_call('{"name": "a", "arguments": {}}') + "</tool_call>", "repeated </tool_call>"),
    ("<think>a</think>\n<tool_call>\n{\"name\": \"a\", \"argu", "truncated <tool_call> (no </tool_call>)"),
    ("<think>a</think>Sure, here you go <tool_", "truncated tag '<tool_'"),
    ("<think>a</think>Done.<|im_end|>\n<|im_start|>user\nthanks", "control token <|im_start|>"),
    ("<think>a</think>Done.<|im_end|>more text", "control token <|im_end|> inside the turn"),
    ("<think>a</think><tool_response>\n{\"ok\": true}\n</tool_response>", "control token <tool_response>"),
    ('<think>a</think>{"name": "transfer_money", "arguments": {"amount": 1}}', "tool call JSON without <tool_call>"),
    ('<think>a</think><|tool_call|>[{"name": "x", "arguments": {}}]<|/tool_call|>', "is not a hermes action tag"),
    ("x" * 300_000, "turn too long"),
]


@pytest.mark.parametrize("text, fragment", MALFORMED, ids=[f"m{i}" for i in range(len(MALFORMED))])
def test_malformed_hermes_turns_name_their_problem(text, fragment):
    parsed = parse_turn(text)
    assert parsed.kind == "format_error"
    assert parsed.format_score == 0.0
    assert fragment in parsed.error, parsed.error


PHI4_MALFORMED = [
    ('<think>a</think><|tool_call|>[]<|/tool_call|>', "empty call list"),
    ('<think>a</think><|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]<|/tool_call|>',
     "two actions: 2 calls"),
    (('<think>a</think><|tool_call|>[{"name": "a", "arguments": {}}]<|/tool_call|>'
      '<|tool_call|>[{"name": "b", "arguments": {}}]<|/tool_call|>'), "two actions: 2 <|tool_call|> blocks"),
    ('<think>a</think><|tool_call|>["a"]<|/tool_call|>', "tool call is string"),
    ('<think>a</think><|tool_call|>"a"<|/tool_call|>', "expected a list of calls"),
    ('<think>a</think><|tool_call|>[{"name": "a", "arguments": {}}', "invalid JSON"),
    ('<think>a</think><|tool_call|>[{"name": "a"}]<|/tool_call|>', "has no \"arguments\""),
    ('<think>a</think>[{"name": "a", "arguments": {}}]', "tool call JSON without <|tool_call|> tags"),
    ('<think>a</think><tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>', "is not a phi4 action tag"),
]


@pytest.mark.parametrize("text, fragment", PHI4_MALFORMED)
def test_malformed_phi4_turns_name_their_problem(text, fragment):
    parsed = parse_turn(text, family="phi4")
    assert (parsed.kind, parsed.format_score) == ("format_error", 0.0)
    assert fragment in parsed.error, parsed.error


def test_format_error_keeps_what_was_parsed_before_the_problem():
    parsed = parse_turn("<think>plan</think><safety_thoughts>is it fraud?</safety_thoughts>"
                        "<tool_call>{bad json}</tool_call>")
    assert parsed.kind == "format_error"
    assert (parsed.think, parsed.safety_thoughts, parsed.safety_tokens) == ("plan", "is it fraud?", 3)


# ---------------------------------------------------------------- soft problems: valid action, partial credit

CALL = '{"name": "transfer_money", "arguments": {"to_account": "AC1", "amount": 5}}'
SOFT = [
    (f"<tool_call>\n{CALL}\n</tool_call>", "tool_call", 0.5, "missing <think>"),
    ("Paid.", "answer", 0.5, "missing <think>"),
    (f"<think>plan\n<tool_call>\n{CALL}\n</tool_call>", "tool_call", 0.5, "unclosed <think>"),
    (f"<think>p</think><safety_thoughts>ok\n<tool_call>\n{CALL}\n</tool_call>", "tool_call", 0.5,
     "unclosed <safety_thoughts>"),
    (f"<think>p</think>\n<tool_call>\n{CALL}", "tool_call", 0.5, "missing </tool_call>"),
    (f"<think>p</think>\n<tool_call>\n{CALL}\n</tool_call>\nI have paid.", "tool_call", 0.75,
     "text after </tool_call>"),
    (f"<think>p</think>\nLet me pay.\n<tool_call>\n{CALL}\n</tool_call>", "tool_call", 0.75,
     "text before <tool_call>"),
    (f"<think>p</think>\n<tool_call>\n{CALL}\n</tool_call>\n<safety_thoughts>fine</safety_thoughts>", "tool_call",
     0.75, "placed after the action"),
    ("<think>p</think>Paid.<safety_thoughts>fine</safety_thoughts>", "answer", 0.75, "placed after the action"),
    (f"<tool_call>\n{CALL}", "tool_call", 0.1, "missing <think> plan; missing </tool_call>"),
    (f"Sure!<tool_call>\n{CALL}\n</tool_call>trailing", "tool_call", 0.1, "text before"),
]


@pytest.mark.parametrize("text, kind, score, fragment", SOFT)
def test_soft_problems_keep_the_action_with_partial_credit(text, kind, score, fragment):
    parsed = parse_turn(text, tools=TOOLS)
    assert parsed.kind == kind
    assert parsed.format_score == pytest.approx(score)
    assert fragment in parsed.error


def test_phi4_single_object_instead_of_list_is_soft():
    parsed = parse_turn(f"<think>p</think><|tool_call|>{CALL}<|/tool_call|>", family="phi4", tools=TOOLS)
    assert parsed.kind == "tool_call" and parsed.format_score == 0.75 and "expected a JSON list" in parsed.error


@pytest.mark.parametrize("text, think, answer", [
    ("plan</think>\nDone.", "plan", "Done."),                          # Qwen3-thinking: <think> was in the prompt
    ("<think></think>\n\nDone.", "", "Done."),                          # empty think (non-thinking mode)
    ("  <think>\nplan\n</think>\n\nDone.<|im_end|>", "plan", "Done."),  # whitespace and eos remnant
    ("<think>p</think>Done.<|im_end|><|endoftext|>\n", "p", "Done."),
])
def test_well_formed_variants_score_full(text, think, answer):
    parsed = parse_turn(text)
    assert (parsed.kind, parsed.think, parsed.answer, parsed.format_score) == ("answer", think, answer, 1.0)


# ---------------------------------------------------------------- tool schemas

@pytest.mark.parametrize("payload, fragment", [
    ('{"name": "wire_all", "arguments": {}}', "unknown tool 'wire_all'"),
    ('{"name": "transfer_money", "arguments": {"to_account": "AC1"}}',
     "tool 'transfer_money': missing required argument 'amount'"),
    ('{"name": "transfer_money", "arguments": {"to_account": "AC1", "amount": "5"}}',
     "tool 'transfer_money': argument 'amount' must be number, got string"),
    ('{"name": "transfer_money", "arguments": {"to_account": "AC1", "amount": true}}',
     "argument 'amount' must be number, got boolean"),
    ('{"name": "transfer_money", "arguments": {"to_account": "AC1", "amount": 5, "memo": "x"}}',
     "tool 'transfer_money': unexpected argument 'memo'"),
    ('{"name": "send_email", "arguments": {"to": "bob", "body": "hi"}}', "argument 'to' must be array, got string"),
    ('{"name": "send_email", "arguments": {"to": ["bob", 7], "body": "hi"}}', "argument 'to' item 1 must be string"),
    ('{"name": "send_email", "arguments": {"to": [], "body": "hi", "urgent": "yes"}}',
     "argument 'urgent' must be boolean"),
    ('{"name": "set_priority", "arguments": {"level": 7}}', "argument 'level' must be one of [1, 2, 3]"),
    ('{"name": "set_priority", "arguments": {"level": 1.5}}', "argument 'level' must be integer, got number"),
    ('{"name": "refuse", "arguments": {}}', "tool 'refuse': missing required argument 'reason'"),
    ('{"name": "refuse", "arguments": {"reason": "no", "extra": 1}}', "tool 'refuse': unexpected argument 'extra'"),
])
def test_schema_violations_name_tool_and_argument(payload, fragment):
    parsed = parse_turn(hermes_call(payload), tools=TOOLS)
    assert parsed.kind == "format_error"
    assert fragment in parsed.error, parsed.error


def test_schema_accepts_valid_calls_and_json_integers():
    ok = parse_turn(hermes_call('{"name": "set_priority", "arguments": {"level": 2.0}}'), tools=TOOLS)
    assert ok.kind == "tool_call" and ok.format_score == 1.0
    # Without tools, any name and arguments object is a valid call (the sandbox checks later); refuse is always checked.
    assert parse_turn(hermes_call('{"name": "anything", "arguments": {"x": 1}}')).kind == "tool_call"
    assert parse_turn(hermes_call('{"name": "refuse", "arguments": {}}')).kind == "format_error"


def test_tool_schemas_function_format_and_refuse():
    @dataclass
    class Spec:
        name: str = "read_file"
        description: str = "Read a file."
        parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {"path": {"type": "string"}},
                                                          "required": ["path"]})

    schemas = tool_schemas([Spec(), {"name": "wait", "description": "Wait.", "parameters": {"type": "object"}}])
    assert [s["type"] for s in schemas] == ["function"] * 3
    assert [s["function"]["name"] for s in schemas] == ["read_file", "wait", "refuse"]
    assert schemas[2]["function"]["parameters"] == REFUSE_SCHEMA
    assert set(tools_by_name(schemas)) == {"read_file", "wait", "refuse"}
    assert tool_schemas(schemas) == schemas  # function-format input passes through, refuse not duplicated
    assert len(tool_schemas([Spec()], include_refuse=False)) == 1
    with pytest.raises(ValueError, match="duplicate tool names \\['read_file'\\]"):
        tool_schemas([Spec(), Spec()])
    with pytest.raises(TypeError, match="'wait': parameters must be a JSON schema"):
        tool_schemas([{"name": "wait", "description": "d"}])


# ---------------------------------------------------------------- safety tokens, prompts

def test_safety_tokens_use_the_counter_or_words():
    text = format_turn(think="p", safety_thoughts="is this an injected instruction?", answer="ok")
    assert parse_turn(text).safety_tokens == 5
    assert parse_turn(text, count_tokens=lambda s: 42).safety_tokens == 42
    assert parse_turn(format_turn(think="p", answer="ok"), count_tokens=lambda s: 42).safety_tokens == 0


def test_system_prompts():
    compact = system_prompt("compact")
    assert len(compact.split()) <= 40
    full = system_prompt("full")
    for needle in ("<think>", "<safety_thoughts>", "inject", "private information",
                   "irreversible", "refuse", "exactly one", '<tool_call> {"name": "refuse"'):
        assert needle in full, needle
    assert '<|tool_call|>[{"name": "refuse"' in system_prompt("full", family="phi4")
    for needle in ("<think>", "<safety_thoughts>", "inject", "privacy", "irreversib", "refuse", "exactly one"):
        assert needle in compact, needle
    with pytest.raises(ValueError, match="style must be"):
        system_prompt("medium")
