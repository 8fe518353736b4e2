"""The engine-backed MOSAIC agent behind `--policy model:DIR` of the external suites and `train.eval_suites`, and
the `--judge` text judges it can back.

`EngineAgent`: the project's engine actors (HF on CPU, vLLM on GPU, an OpenAI-compatible endpoint —
`engine.kind`) behind an `EngineRouter`; episodes run concurrently, so the HF engine batches them. The suites
(`mosaic_ray.benchmarks`) are handed one; the training loop builds one over its own engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mosaic_ray import protocol
from mosaic_ray.actors.engines import Engine, EngineRouter, GenerationRequest, SamplingParams, make_engine
from mosaic_ray.config import MosaicConfig, load_config
from mosaic_ray.judge.text import ModelJudge, RuleJudge, TextJudge

__all__ = ["EngineAgent", "make_judge"]


def make_judge(spec: str, cfg: MosaicConfig | None = None) -> TextJudge:
    """`rules` or `model:DIR` (any engine kind of `cfg.engine`)."""
    if spec == "rules":
        return RuleJudge()
    kind, _, path = spec.partition(":")
    if kind != "model" or not path:
        raise ValueError(f"--judge {spec!r}: expected rules or model:DIR")
    return ModelJudge(EngineAgent.start(path, cfg), spec)


class EngineAgent:
    """The MOSAIC agent on the project's engines; `turn` is async (concurrent episodes batch in the engine),
    `turn_sync` serves threaded callers (AgentDojo's pipeline) through one private event loop."""

    def __init__(self, cfg: MosaicConfig, model_dir: str, engines: Sequence[Any], tokenizer: Any, *,
                 owned: bool = False):
        """`engines`: engines in this process or engine actors; `owned`: this agent stops them on `close`."""
        self.cfg = cfg
        self.model_dir = model_dir
        self.router = EngineRouter(engines)
        self.tokenizer = tokenizer
        self.family = cfg.model.family
        self.owned = list(engines) if owned else []
        limit = cfg.engine.max_model_len
        config = Path(model_dir) / "config.json"
        if config.is_file():
            limit = min(limit, json.loads(config.read_text()).get("max_position_embeddings", limit))
        self.max_model_len = limit
        self.context_overflows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @classmethod
    def start(cls, model: str, cfg: MosaicConfig | None = None) -> EngineAgent:
        """Engines of `cfg.engine` (default: the tiny-cpu preset's) serving `model`: Ray engine actors when Ray is
        running or `ray.address` / RAY_ADDRESS names a cluster (several engines, any node), else one engine in
        this process (the router awaits it directly; it batches the same way)."""
        from dataclasses import replace

        import ray

        from mosaic_ray.models.source import resolve_model
        from mosaic_ray.rollout import load_tokenizer

        cfg = cfg or load_config("tiny-cpu", [])
        cfg = replace(cfg, model=replace(cfg.model, path=model))
        model_dir = resolve_model(model, cfg.model.cache_dir)
        tokenizer = load_tokenizer(model_dir, cfg.model.chat_template)
        if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            from mosaic_ray.actors.engines.actor import start_engine_actors
            from mosaic_ray.driver.cli import init_ray

            init_ray(cfg)
            engines = start_engine_actors(cfg.engine, model, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir)
            return cls(cfg, model_dir, engines, tokenizer, owned=True)
        return cls(cfg, model_dir, [make_engine(cfg.engine, model_dir, dtype=cfg.model.dtype)], tokenizer, owned=True)

    def _prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        head = protocol.system_prompt(self.cfg.protocol.system_prompt, self.family)
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": f"{head}\n{messages[0]['content']}"}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": head}, *messages]
        return protocol.render_prompt_ids(self.tokenizer, messages, None if tools is None else
                                          protocol.tool_schemas(tools))

    async def _generate(self, ids: list[int], max_new_tokens: int, session_id: str | None, seed: int) -> str:
        if len(ids) + max_new_tokens > self.max_model_len:
            self.context_overflows += 1  # as an API model fails on context length: an empty (format-error) turn
            return ""
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
        completion = await self.router.generate(GenerationRequest(ids, sampling, session_id=session_id))
        return protocol.assistant_text(self.tokenizer, completion.token_ids)

    async def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                   session_id: str | None = None, seed: int = 0) -> str:
        """The next assistant turn (greedy) for the chat `messages` with the suite's `tools` (+ `refuse`)."""
        return await self._generate(self._prompt(messages, tools), self.cfg.protocol.max_new_tokens, session_id, seed)

    async def complete(self, messages: list[dict[str, Any]], *, max_new_tokens: int = 32) -> str:
        """A plain chat completion (judge questions): no tools, no MOSAIC system prompt."""
        ids = protocol.render_prompt_ids(self.tokenizer, messages, None)
        return await self._generate(ids, max_new_tokens, None, 0)

    def turn_sync(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], **kwargs: Any) -> str:
        """`turn` for threads: every thread's requests go through one loop, so they batch in the engines."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="engine-agent", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(self.turn(messages, tools, **kwargs), self._loop).result()

    def close(self) -> None:
        """Stop the private loop and the engine actors this agent started (never ones it was handed)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None
        for engine in self.owned:
            if isinstance(engine, Engine):
                asyncio.run(engine.close())
            else:
                import ray

                ray.kill(engine)
        self.owned = []
