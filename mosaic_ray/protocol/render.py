"""Rendering turns through the tokenizer's own chat template, so every model family keeps its native format.

An episode's token sequence is built incrementally and never re-rendered:

    render_prompt_ids(system + user)  +  generated ids (ending in eos)  +  observation_ids(tool messages)  +  …

Re-rendering the whole history each step would be wrong for templates that rewrite earlier turns (Qwen3 drops
the `<think>` of assistant turns before the last user message), and would not reproduce the token ids the policy
actually sampled. `observation_ids` instead renders a fixed dummy conversation with the new tool messages and
keeps only the text after the dummy assistant's eos, which is exactly what the template puts between one
generated turn and the next generation. Cutting right after a special token keeps tokenization boundary-safe:
the suffix tokenizes the same alone as inside the full conversation.

Works with any HF tokenizer whose chat template accepts `tools=`; transformers is only touched through the
tokenizer object passed in, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mosaic_ray.protocol.families import REFUSE_DESCRIPTION, REFUSE_SCHEMA
from mosaic_ray.types import REFUSE_TOOL

_MARKER = "MOSAIC_DUMMY_ASSISTANT_TURN"
_DUMMY = [
    {"role": "system", "content": "system"},
    {"role": "user", "content": "user"},
    {"role": "assistant", "content": _MARKER},
]


class ToolSpecLike(Protocol):
    """What `tool_schemas` needs from a sandbox tool: a name, a one-line description, a JSON schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]


def _function_schema(spec: ToolSpecLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            return dict(spec["function"])
        name, description, parameters = spec.get("name"), spec.get("description", ""), spec.get("parameters")
    else:
        name, description, parameters = spec.name, spec.description, spec.parameters
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool spec without a name: {spec!r:.200}")
    if not isinstance(parameters, Mapping):
        raise TypeError(f"tool spec {name!r}: parameters must be a JSON schema object, got {parameters!r:.100}")
    return {"name": name, "description": description, "parameters": dict(parameters)}


def tool_schemas(tool_specs: Iterable[ToolSpecLike | Mapping[str, Any]], *,
                 include_refuse: bool = True) -> list[dict[str, Any]]:
    """Tool specs → OpenAI function format `{"type": "function", "function": {name, description, parameters}}`.

    Accepts objects with `name` / `description` / `parameters`, plain dicts with those keys, or dicts already
    in function format. The built-in `refuse` tool is appended unless present (the policy must see it to use it).
    """
    functions = [_function_schema(spec) for spec in tool_specs]
    names = [f["name"] for f in functions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tool_schemas: duplicate tool names {duplicates}")
    if include_refuse and REFUSE_TOOL not in names:
        functions.append({"name": REFUSE_TOOL, "description": REFUSE_DESCRIPTION, "parameters": REFUSE_SCHEMA})
    return [{"type": "function", "function": f} for f in functions]


def tools_by_name(schemas: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function-format schemas → `{name: parameters schema}`, the `tools=` argument of `parse_turn`."""
    return {s["function"]["name"]: s["function"]["parameters"] for s in schemas}


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
            add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote every special token; the tokenizer must not add BOS/EOS of its own.
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                      tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
    """Token ids of `messages` rendered by the chat template with `tools=` and the assistant generation prompt."""
    return _encode(tokenizer, _render(tokenizer, messages, tools, add_generation_prompt=True))


def observation_text(tokenizer: Any, tool_messages: Sequence[Mapping[str, Any]]) -> str:
    """The text the chat template puts after an assistant turn's eos: the tool response(s), then the next
    assistant generation prompt (for the tiny template: `\\n<|im_start|>user\\n<tool_response>…<|im_start|>assistant\\n`)."""
    if not tool_messages:
        raise ValueError("observation_text: no tool messages")
    for i, m in enumerate(tool_messages):
        if m.get("role") != "tool" or not isinstance(m.get("content"), str):
            raise ValueError(f"observation_text: tool_messages[{i}] must be {{'role': 'tool', 'content': str, "
                             f"'name': …}}, got {dict(m)!r:.200}")
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("observation_text: the tokenizer has no eos_token (generation could not stop at a turn end)")
    full = _render(tokenizer, [*_DUMMY, *tool_messages], None, add_generation_prompt=True)
    end = full.find(_MARKER + eos)
    if end < 0:
        raise ValueError(f"observation_text: the chat template does not end an assistant turn with eos {eos!r}; "
                         f"rendered: {full[:300]!r}")
    return full[end + len(_MARKER) + len(eos):]


def observation_ids(tokenizer: Any, tool_messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Ids to append after a generated turn (which ended with eos) so that the sequence continues exactly as the
    chat template renders `tool_messages` followed by the next assistant generation prompt.

    Tool messages are `{"role": "tool", "content": str, "name": tool_name}`; several are rendered together
    (templates group consecutive tool messages into one turn). A turn cut by `max_new_tokens` has no eos: append
    `tokenizer.eos_token_id` (as a non-generated, loss-masked id) before these ids.
    """
    return _encode(tokenizer, observation_text(tokenizer, tool_messages))


def assistant_text(tokenizer: Any, completion_ids: Sequence[int]) -> str:
    """Decode generated ids without the trailing eos (or pad) ids; protocol tags are kept for the parser."""
    ids = list(completion_ids)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    while ids and ids[-1] in stop:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
