"""Transformers engine (CPU and GPU): dynamic batching and a hand-written KV-cache decode loop.

Why our own loop instead of `model.generate`: we need (1) the log-prob of every sampled token under the raw
model distribution, taken from the very logits the token was sampled from (gather - logsumexp, no second
forward pass), and (2) per-request seeded sampling that does not depend on which other requests share the
batch. `generate` offers neither.

Batching: `generate()` only enqueues. A background asyncio task (the scheduler) takes up to `max_batch_size`
queued requests, waiting at most `max_wait_ms` after the first one for more, and runs the batch on one worker
thread so the event loop keeps accepting requests meanwhile. Prompts are left-padded (attention mask +
explicit position ids, so padding changes nothing a real token sees); rows that finish are dropped from the
batch and its KV cache, so long rows do not drag short ones' compute along.

Sampling per row: temperature (0 = argmax), then top-p, then inverse-CDF sampling with one uniform drawn from
the row's own `torch.Generator` (seeded from `SamplingParams.seed`, else from the engine's generator). The
uniform is drawn on the CPU whatever the device, so a seed gives the same stream everywhere.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .base import (
    Completion,
    Engine,
    FinishReason,
    GenerationRequest,
    PauseMode,
    WeightsLike,
    check_version,
    validate_request,
)

__all__ = ["HFEngine", "resolve_device", "torch_dtype"]


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {', '.join(table)}, got {name!r}")
    return table[name]


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when a CUDA device is visible, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch sees no CUDA device (torch {torch.__version__})")
    return device


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class HFEngine(Engine):
    """A Hugging Face causal LM served with dynamic batching. See the module docstring for the design."""

    def __init__(self, model_path: str, *, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 dtype: str = "float32", device: str = "auto", max_model_len: int | None = None, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mosaic_ray.hygiene import set_torch_threads

        set_torch_threads(1)
        if max_batch_size < 1:
            raise ValueError(f"HFEngine: max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"HFEngine: the tokenizer at {self.model_path} has no eos token")
        self.eos_id = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        model_max = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_model_len = min(max_model_len or model_max, model_max)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._rng = torch.Generator().manual_seed(seed)  # rows without a seed draw from here
        self._version = 0
        self._model_lock = threading.Lock()  # one batch or one weight update at a time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._abort = threading.Event()
        self._running_rows = 0
        self._stats = {"batches": 0, "requests": 0, "generated_tokens": 0, "max_batch_rows": 0}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        for req in requests:
            validate_request(req, self.vocab_size)
            if len(req.prompt_ids) >= self.max_model_len:
                raise ValueError(f"GenerationRequest(request_id={req.request_id!r}).prompt_ids: {len(req.prompt_ids)} "
                                 f"tokens leave no room to generate (max_model_len={self.max_model_len})")
        self._ensure_scheduler()
        loop = asyncio.get_running_loop()
        pending = [_Pending(req, loop.create_future()) for req in requests]
        self._queue.extend(pending)
        self._has_work.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _ensure_scheduler(self) -> None:
        """Start the scheduler on the running loop (again if the caller moved to a new loop, e.g. asyncio.run)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and not self._scheduler.done():
            return
        self._loop = loop
        self._queue: list[_Pending] = []
        self._has_work = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._scheduler = loop.create_task(self._schedule(), name="hf-engine-scheduler")

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has_work.wait()
            await self._unpaused.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self._queue) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._has_work.clear()
                try:
                    await asyncio.wait_for(self._has_work.wait(), left)
                except TimeoutError:
                    break
            if not self._unpaused.is_set():  # paused while we were collecting
                continue
            batch = [p for p in self._queue[: self.max_batch_size] if not p.future.done()]
            del self._queue[: self.max_batch_size]
            if not self._queue:
                self._has_work.clear()
            else:
                self._has_work.set()
            if not batch:
                continue
            self._idle.clear()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.request for p in batch])
            except Exception as exc:  # noqa: BLE001 - a failing batch fails its own callers, never the scheduler
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p, completion in zip(batch, results):
                    if not p.future.done():
                        p.future.set_result(completion)
            finally:
                self._idle.set()

    def _run_batch(self, requests: list[GenerationRequest]) -> list[Completion]:
        import torch

        with self._model_lock, torch.inference_mode():
            version = self._version
            self._running_rows = len(requests)
            try:
                tokens, logprobs, finish = self._decode(requests)
            finally:
                self._running_rows = 0
        self._stats["batches"] += 1
        self._stats["requests"] += len(requests)
        self._stats["generated_tokens"] += sum(len(t) for t in tokens)
        self._stats["max_batch_rows"] = max(self._stats["max_batch_rows"], len(requests))
        return [Completion(r.request_id, tokens[i], logprobs[i], finish[i], version) for i, r in enumerate(requests)]

    def _decode(self, requests: list[GenerationRequest]) -> tuple[list[list[int]], list[list[float]], list[Any]]:
        """Prefill the left-padded batch, then decode one token per step, dropping finished rows."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        n = len(requests)
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, width - len(r.prompt_ids):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        # Real tokens get positions 0..len-1 whatever the padding; pad slots get 1 (masked out anyway).
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
        budget = [min(r.sampling.max_new_tokens, self.max_model_len - len(r.prompt_ids)) for r in requests]
        stops = [{*r.sampling.stop_token_ids, *(() if r.sampling.ignore_eos else (self.eos_id,))}
                 for r in requests]
        gens = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else self._rng
                for r in requests]
        temps = torch.tensor([r.sampling.temperature for r in requests], dtype=torch.float32, device=dev)
        top_ps = torch.tensor([r.sampling.top_p for r in requests], dtype=torch.float32, device=dev)

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        last_pos = positions[:, -1]
        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        finish: list[FinishReason | None] = [None] * n
        active = list(range(n))  # original row of each row of the (compacted) batch
        while True:
            logits = out.logits[:, -1, :].float()
            next_tok, next_lp = sample_tokens(logits, temps, top_ps, [gens[i] for i in active])
            keep: list[int] = []
            for j, (t, lp) in enumerate(zip(next_tok.tolist(), next_lp.tolist())):
                i = active[j]
                tokens[i].append(t)
                logprobs[i].append(lp)
                if t in stops[i]:
                    finish[i] = "stop"
                elif len(tokens[i]) >= budget[i]:
                    finish[i] = "length"
                else:
                    keep.append(j)
            if keep and self._abort.is_set():
                for j in keep:
                    finish[active[j]] = "abort"
                keep = []
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                attn, last_pos, next_tok = attn[idx], last_pos[idx], next_tok[idx]
                temps, top_ps = temps[idx], top_ps[idx]
                active = [active[j] for j in keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=next_tok[:, None], attention_mask=attn, position_ids=last_pos[:, None],
                             past_key_values=cache, use_cache=True)
        return tokens, logprobs, finish

    # --------------------------------------------------------------------------------- control plane

    def update_weights(self, weights: WeightsLike, version: int) -> None:
        import torch

        check_version(self._version, version)
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        errors = []
        for name, tensor in items:
            if name not in targets:
                errors.append(f"{name}: no such parameter")
            elif tuple(tensor.shape) != tuple(targets[name].shape):
                errors.append(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(targets[name].shape)}")
        if errors:
            raise ValueError(f"update_weights(version={version}): {len(errors)} bad tensor(s), nothing loaded: "
                             + "; ".join(errors[:5]))
        with self._model_lock, torch.no_grad():  # waits for the running batch to finish on the old weights
            check_version(self._version, version)  # another update may have won the lock meanwhile
            for name, tensor in items:
                dst = targets[name]
                dst.copy_(torch.as_tensor(tensor).to(device=dst.device, dtype=dst.dtype))
            self._version = version

    @property
    def version(self) -> int:
        return self._version

    def health(self) -> dict:
        loop_ok = self._loop is None or not self._scheduler.done()
        return {"ok": loop_ok, "kind": "hf", "version": self._version, "device": self.device, "dtype": self.dtype,
                "pending": len(self._queue) if self._loop else 0, "running": self._running_rows,
                "paused": bool(self._loop and not self._unpaused.is_set()), **self._stats}

    async def pause(self, mode: PauseMode = PauseMode.WAIT) -> None:
        """Stop starting batches; with ABORT also cut the running one. Returns once nothing runs."""
        self._ensure_scheduler()
        self._unpaused.clear()
        if mode is PauseMode.ABORT:
            self._abort.set()
        await self._idle.wait()
        self._abort.clear()

    async def resume(self) -> None:
        self._ensure_scheduler()
        self._unpaused.set()

    async def close(self) -> None:
        if self._loop is not None and not self._scheduler.done():
            self._scheduler.cancel()
            for p in self._queue:
                if not p.future.done():
                    p.future.cancel()
        self._executor.shutdown(wait=True)


def sample_tokens(logits, temps, top_ps, generators) -> tuple[Any, Any]:
    """Sample one token per row and return (tokens (B,), raw log-probs of those tokens (B,)).

    logits: (B, V) float32 raw model logits. temps, top_ps: (B,). generators: one CPU torch.Generator per row.
    The returned log-prob is gather - logsumexp of the *raw* logits, whatever temperature/top-p chose the token.
    """
    import torch

    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if bool((top_ps < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass strictly before it is below top_p (the first token is always kept).
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_ps[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep_sorted)
    # Inverse-CDF sampling with u in (0, 1]: the first index whose cumulative mass reaches u * total always has
    # non-zero probability, so filtered tokens can never be drawn.
    u = torch.stack([1.0 - torch.rand((), generator=g) for g in generators]).to(logits.device)
    cdf = probs.cumsum(-1)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)
    return tokens, logprobs
