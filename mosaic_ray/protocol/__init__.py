"""The MOSAIC agent protocol: plan in `<think>`, optional `<safety_thoughts>` check, then exactly one action.

- `parse_turn` / `PARSERS` / `get_parser`: total parsers, one pure function per model family (`parse.py`).
- `format_turn`, `format_call`, `system_prompt`: writing turns and the prompt (`format.py`).
- `tool_schemas`, `render_prompt_ids`, `observation_ids`, `assistant_text`: the tokenizer's chat template (`render.py`).
- `chat_template_text`, `apply_chat_template`: the chat templates the project ships (`templates.py`).

No torch, Ray or transformers at import.
"""

from mosaic_ray.protocol.families import FAMILIES, REFUSE_SCHEMA, Family, get_family
from mosaic_ray.protocol.format import format_call, format_hint, format_turn, system_prompt
from mosaic_ray.protocol.parse import PARSERS, get_parser, parse_hermes, parse_phi4, parse_turn
from mosaic_ray.protocol.render import (
    assistant_text,
    observation_ids,
    observation_text,
    render_prompt_ids,
    tool_schemas,
    tools_by_name,
)
from mosaic_ray.protocol.templates import apply_chat_template, chat_template_text

__all__ = [
    "FAMILIES",
    "PARSERS",
    "REFUSE_SCHEMA",
    "Family",
    "apply_chat_template",
    "assistant_text",
    "chat_template_text",
    "format_call",
    "format_hint",
    "format_turn",
    "get_family",
    "get_parser",
    "observation_ids",
    "observation_text",
    "parse_hermes",
    "parse_phi4",
    "parse_turn",
    "render_prompt_ids",
    "system_prompt",
    "tool_schemas",
    "tools_by_name",
]
