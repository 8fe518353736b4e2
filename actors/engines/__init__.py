"""Inference engines behind one interface (HF on CPU/GPU, vLLM on GPU, OpenAI-compatible HTTP), the Ray actor
that hosts one, and the router that spreads requests over many.

Importing this package is cheap (no torch, ray or vllm); backends import their libraries when constructed.
`EngineActor` lives in `mosaic_ray.actors.engines.actor` (it needs Ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Completion,
    Engine,
    GenerationRequest,
    PauseMode,
    SamplingParams,
    StaleWeightsError,
    check_version,
    validate_request,
)
from .router import EngineRouter

if TYPE_CHECKING:
    from mosaic_ray.config import EngineConfig

__all__ = ["Completion", "Engine", "EngineRouter", "GenerationRequest", "PauseMode", "SamplingParams",
           "StaleWeightsError", "check_version", "make_engine", "validate_request"]


def make_engine(cfg: EngineConfig, model_path: str | None, *, dtype: str = "float32") -> Engine:
    """Build the engine `cfg.kind` names, in this process. `dtype` comes from `model.dtype`."""
    if cfg.kind == "hf":
        from .hf import HFEngine

        return HFEngine(_need_path(model_path, cfg), max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                        dtype=dtype, device=cfg.device, max_model_len=cfg.max_model_len, seed=cfg.seed,
                        cpu_threads=cfg.cpu_threads, prefix_cache_mb=cfg.prefix_cache_mb)
    if cfg.kind == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(_need_path(model_path, cfg), tensor_parallel_size=cfg.tensor_parallel_size, dtype=dtype,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                          seed=cfg.seed, enforce_eager=cfg.enforce_eager, prefix_caching=cfg.prefix_cache_mb > 0,
                          weight_transfer_backend=None if cfg.weight_transfer_backend == "none"
                          else cfg.weight_transfer_backend)
    if cfg.kind == "openai":
        from .openai_http import OpenAIEngine

        if not cfg.base_url:
            raise ValueError("engine.base_url: required for engine.kind: openai (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIEngine(cfg.base_url, model=cfg.api_model or model_path or "default",
                            timeout_s=cfg.request_timeout_s)
    raise ValueError(f"engine.kind: unknown engine {cfg.kind!r} (known: hf, vllm, openai)")


def _need_path(model_path: str | None, cfg: EngineConfig) -> str:
    if not model_path:
        raise ValueError(f"make_engine: engine.kind {cfg.kind!r} needs a local model directory (model.path), got "
                         f"{model_path!r}")
    return str(model_path)
