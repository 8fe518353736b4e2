"""`EngineChat`: a `mosaic_ray.judge.llm.ChatBackend` on a project engine (HF on CPU, vLLM on GPU) and its
tokenizer, in this process. The replicas of the `mosaic-judge` Serve app (`mosaic_ray.actors.judge_service`) and
`mosaic-ray judge-eval` without `judge.endpoint` judge through it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import make_engine
from .base import Engine, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from mosaic_ray.config import EngineConfig

__all__ = ["EngineChat"]


class EngineChat:
    """A project engine plus its tokenizer, in this process; greedy replies."""

    def __init__(self, engine: Engine, tokenizer: Any, model: str = "judge", seed: int = 0) -> None:
        self.engine, self.tokenizer, self.model, self.seed = engine, tokenizer, model, seed

    @classmethod
    def load(cls, source: str, model: str, engine_cfg: EngineConfig, dtype: str,
             cache_dir: str | None = None) -> EngineChat:
        """The judge model `source` (`mosaic_ray.models.source`), resolved on this node, behind an engine of
        `engine_cfg.kind` running `engine_cfg.cpu_threads` torch threads."""
        from transformers import AutoTokenizer

        from mosaic_ray.hygiene import set_torch_threads
        from mosaic_ray.models.source import resolve_model

        set_torch_threads(engine_cfg.cpu_threads)
        model_dir = resolve_model(source, cache_dir)
        return cls(make_engine(engine_cfg, model_dir, dtype=dtype), AutoTokenizer.from_pretrained(model_dir), model)

    async def chat(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """One greedy reply per conversation, generated as one batch of requests."""
        eos = self.tokenizer.eos_token_id
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, seed=self.seed,
                                  stop_token_ids=() if eos is None else (int(eos),))
        requests = []
        for i, messages in enumerate(conversations):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            requests.append(GenerationRequest(prompt_ids=ids, sampling=sampling, request_id=f"judge-{i}"))
        completions = await self.engine.generate(requests)
        return [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
