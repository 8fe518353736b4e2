"""`mosaic-ray plan`: GPU memory of a preset's learners and engines, computed from the model's config.

No weights are read and nothing is downloaded. The model shape comes from `model.path/config.json` when that is
a local directory, from the config files the project ships for its GPU presets (`presets/models/`), or from a
`config.json` the user points to (`--model-config`).

Learner bytes per GPU, for P parameters over N ranks (N = 1 under DDP, which does not shard):

| term | bytes | why |
|---|---|---|
| parameters | 4P/N | FSDP2 keeps the sharded parameters in fp32 (the optimizer's master copy) |
| gradients | 4P/N | reduced in fp32, sharded like the parameters |
| optimizer | 8P/N | AdamW's two fp32 moments |
| KL reference | bP/N | only when `learner.kl_coef > 0`; sharded like the policy, in the training dtype (b bytes) |
| gathered parameters | b(2·layer + embeddings) | FSDP2 all-gathers a layer (and prefetches the next) in the training dtype; the root holds the embeddings and LM head |
| activations | see `activation_bytes` | at `learner.micro_batch_tokens`, with or without activation checkpointing |
| logits | 8·chunk·V | fp32 logits and their gradient for one `learner.logprob_chunk_size` chunk |

Engine bytes per GPU (vLLM, tensor parallel TP): weights bP/TP; the KV cache gets what is left of
`engine.gpu_memory_utilization` of the GPU after the weights and a sampler reserve, at 2·L·kv_heads·head_dim·b/TP
bytes per token; an engine fits when at least one sequence of `engine.max_model_len` tokens fits in its cache.
These are planning estimates (no allocator fragmentation, no CUDA context beyond `HEADROOM`), not measurements.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mosaic_ray.config import ConfigError, EngineConfig, LearnerConfig, MosaicConfig, load_config

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9
"""Share of a learner GPU's memory the plan lets the learner use (CUDA context, allocator slack)."""
SAMPLER_RESERVE_BYTES = GIB
"""Engine memory kept out of the KV cache besides the weights and the sampler's logits (vLLM's activation peak)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on (a Hugging Face `config.json`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    attention_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config") -> ModelShape:
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: model config lacks {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)),
                   qk_norm=cfg.get("model_type") == "qwen3")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden_size
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + bias + 3 * h * self.intermediate_size + norms

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when it is not tied to them."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def num_params(self) -> int:
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


@dataclass(frozen=True)
class GpuNode:
    """A GPU node type of a cluster config in `clusters/` (the test checks these against the files)."""

    cluster: str
    node_type: str
    instance: str
    gpus: int
    gpu_memory_gib: float


NODE_TYPES = (
    GpuNode("aws", "engine_gpu", "g6e.12xlarge", 4, 48),
    GpuNode("aws", "learner_gpu", "p4de.24xlarge", 8, 80),
    GpuNode("gcp", "engine_gpu", "a2-highgpu-4g", 4, 40),
    GpuNode("gcp", "learner_gpu", "a2-ultragpu-8g", 8, 80),
)


def shipped_model_config(model_path: str) -> Path | None:
    """The config file shipped for Hub id `model_path` (`org/name` → `presets/models/org--name.json`), if any."""
    name = model_path.strip("/").replace("/", "--") + ".json"
    ref = resources.files("mosaic_ray").joinpath("presets", "models", name)
    return Path(str(ref)) if ref.is_file() else None


def model_shape(cfg: MosaicConfig, model_config: str | None = None) -> tuple[ModelShape, str]:
    """The shape of `cfg.model`, and where it came from."""
    if model_config:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
    elif cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
        path = Path(cfg.model.path) / "config.json"
    elif cfg.model.path and (shipped := shipped_model_config(cfg.model.path)):
        path = shipped
    else:
        raise ConfigError(f"model.path={cfg.model.path!r}: no config.json to plan from; pass --model-config "
                          "PATH (a model directory or its config.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model-config {path}: cannot read a JSON model config ({e})") from None
    return ModelShape.from_hf_config(data, str(path)), str(path)


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Saved activations of one micro-batch of `tokens` tokens (flash attention: nothing quadratic is kept).

    Per layer and token a SwiGLU block keeps its two norm inputs (2h), q/k/v (q + 2kv), the attention output (q)
    and the MLP's gate, up and product (3i). With checkpointing only each layer's input (h) is kept, and one
    layer is recomputed at a time.
    """
    per_layer = (2 * shape.hidden_size + 2 * shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate_size)
    if checkpointing:
        return tokens * dtype_bytes * (shape.num_layers * shape.hidden_size + per_layer)
    return tokens * dtype_bytes * shape.num_layers * per_layer


def learner_plan(shape: ModelShape, learner: LearnerConfig, dtype: str) -> dict[str, int]:
    """Bytes per learner GPU, term by term (the module docstring's table)."""
    b = DTYPE_BYTES[dtype]
    ranks = learner.num_learners if learner.strategy == "fsdp2" else 1
    p = shape.num_params
    chunk = min(learner.micro_batch_tokens, learner.logprob_chunk_size)
    return {
        "parameters": 4 * p // ranks,
        "gradients": 4 * p // ranks,
        "optimizer": 8 * p // ranks,
        "kl_reference": (b * p // ranks) if learner.kl_coef > 0 else 0,
        "gathered_parameters": b * (2 * shape.layer_params + shape.embedding_params) if ranks > 1 else 0,
        "activations": activation_bytes(shape, learner.micro_batch_tokens, b, learner.activation_checkpointing),
        "logits": 8 * chunk * shape.vocab_size,
    }


def engine_plan(shape: ModelShape, engine: EngineConfig, dtype: str, gpu_memory_gib: float) -> dict[str, int]:
    """Bytes per engine GPU: weights, reserve, KV cache, and how many full-length sequences the cache holds."""
    b = DTYPE_BYTES[dtype]
    tp = engine.tensor_parallel_size
    weights = b * shape.num_params // tp
    reserve = SAMPLER_RESERVE_BYTES + 4 * engine.max_batch_size * shape.vocab_size // tp
    budget = int(engine.gpu_memory_utilization * gpu_memory_gib * GIB)
    kv_cache = max(0, budget - weights - reserve)
    per_token = shape.kv_bytes_per_token(b) // tp
    return {"weights": weights, "reserve": reserve, "kv_cache": kv_cache, "kv_bytes_per_token": per_token,
            "kv_tokens": kv_cache // per_token,
            "full_length_sequences": kv_cache // (per_token * engine.max_model_len)}


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def plan(cfg: MosaicConfig, model_config: str | None = None,
         gpu_memory_gib: float | None = None) -> dict[str, Any]:
    """The preset's plan against each GPU node type (or one GPU of `gpu_memory_gib`): a JSON-able dict."""
    shape, source = model_shape(cfg, model_config)
    nodes = NODE_TYPES if gpu_memory_gib is None else (
        GpuNode("custom", "learner_gpu", "--gpu-memory-gib", 8, gpu_memory_gib),
        GpuNode("custom", "engine_gpu", "--gpu-memory-gib", 8, gpu_memory_gib))
    learner = learner_plan(shape, cfg.learner, cfg.model.dtype)
    learner_total = sum(learner.values())
    rows = []
    for node in nodes:
        if node.node_type == "learner_gpu":
            fits = learner_total <= HEADROOM * node.gpu_memory_gib * GIB
            rows.append({"role": "learner", "node": node.__dict__, "bytes": learner_total, "fits": fits})
        else:
            eng = engine_plan(shape, cfg.engine, cfg.model.dtype, node.gpu_memory_gib)
            fits = eng["full_length_sequences"] >= 1 and cfg.engine.tensor_parallel_size <= node.gpus
            rows.append({"role": "engine", "node": node.__dict__, "bytes": eng["weights"] + eng["reserve"],
                         "engine": eng, "fits": fits})
    clusters = sorted({r["node"]["cluster"] for r in rows})
    fitting = [c for c in clusters if all(r["fits"] for r in rows if r["node"]["cluster"] == c)]
    return {"preset": cfg.name, "model": cfg.model.path, "model_config": source, "num_params": shape.num_params,
            "dtype": cfg.model.dtype, "learner": learner, "learner_total": learner_total, "nodes": rows,
            "fits_on": fitting}


def print_plan(result: dict[str, Any], cfg: MosaicConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lr = cfg.learner
    table = Table(title=f"{result['preset']}: {result['model']} ({result['num_params'] / 1e9:.2f}B parameters, "
                        f"{result['dtype']}); learner per GPU, {lr.num_learners} × {lr.strategy}, "
                        f"micro_batch_tokens {lr.micro_batch_tokens}")
    table.add_column("learner term")
    table.add_column("per GPU", justify="right")
    for term, n in result["learner"].items():
        table.add_row(term, _gib(n))
    table.add_row("total", _gib(result["learner_total"]))
    console.print(table)
    nodes = Table(title=f"against the GPU node types (learner may use {HEADROOM:.0%} of a GPU; engine "
                        f"gpu_memory_utilization {cfg.engine.gpu_memory_utilization}, TP "
                        f"{cfg.engine.tensor_parallel_size}, max_model_len {cfg.engine.max_model_len})")
    for col in ("cluster", "node type", "GPU", "role", "needs", "KV cache", "full-length seqs", "verdict"):
        nodes.add_column(col)
    for r in result["nodes"]:
        n, eng = r["node"], r.get("engine")
        nodes.add_row(n["cluster"], f"{n['node_type']} ({n['instance']})", f"{n['gpus']}× {n['gpu_memory_gib']} GiB",
                      r["role"], _gib(r["bytes"]), _gib(eng["kv_cache"]) if eng else "",
                      str(eng["full_length_sequences"]) if eng else "", "fits" if r["fits"] else "does not fit")
    console.print(nodes)
    if result["fits_on"]:
        print(f"plan: {result['preset']} fits on {', '.join(result['fits_on'])}")
    else:
        print(f"plan: {result['preset']} does not fit on any GPU node type above")


def _plan_cmd(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    result = plan(cfg, args.model_config, args.gpu_memory_gib)
    print_plan(result, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"plan written to {args.json}")
    return 0 if result["fits_on"] else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="GPU memory per learner and engine of a preset, against the cluster "
                                           "node types (no download)")
    p.add_argument("--config", default="qwen2.5-7b", help="preset name or YAML path (default qwen2.5-7b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    p.add_argument("--model-config", default=None, metavar="PATH",
                   help="a model directory or config.json (default: model.path's, or the one shipped for the preset)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="plan for one GPU of this size instead")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    p.set_defaults(func=_plan_cmd)
