"""`EngineActor`: one engine in a Ray async actor, and helpers to start engine actors from the config.

The engine and its control plane are the plain class `EngineHost`; `EngineActor` serves it alone, and a colocated
rollout worker (`mosaic_ray.actors.rollout_worker.ColocatedWorker`, `rollout.colocate_engine`) serves it beside its
episodes, so weight sync, supervision and restarts treat both alike.

The actor is async with a high `max_concurrency`, so many rollout workers' `generate` calls are inside the
engine at once and the HF engine can batch them. The driver's weight sync streams buckets, either through the
object store (`begin_weight_update`, `load_weight_bucket` per bucket ref, `finish_weight_update`) or by broadcast
over a private torch.distributed group (`init_weight_group` once, then `receive_weights` per version, see
`mosaic_ray.weight_transfer`). `update_weights` loads a whole dict at once (tests, small updates).

Restarts: engine actors restart in place (`engine.max_restarts`; same handle) after a crash or a kill of a hung
engine (`EngineSupervisor`). A restarted engine holds the base model, so it refuses `generate` with
`EngineNotServingError` (routers retry elsewhere) until the current weights are loaded into it, or until
`serve_base_weights` says the base model is the current policy (version 0).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import ray

from mosaic_ray.config import EngineConfig, MosaicConfig

from .base import Completion, GenerationRequest, PauseMode
from .router import EngineNotServingError

__all__ = ["MAX_CONCURRENCY", "EngineActor", "EngineHost", "engine_actor_options", "start_engine_actors"]

MAX_CONCURRENCY = 1024
"""Concurrent calls one engine actor accepts (requests beyond a batch wait inside the engine's queue)."""


class EngineHost:
    """One engine (`make_engine(cfg, model_path)`) and its weight-sync and lifecycle methods, for a Ray actor to
    serve (plain Python: it must run inside an actor, for its restart flag); see the module docstring."""

    def __init__(self, cfg: EngineConfig, model_path: str | None, dtype: str = "float32",
                 cache_dir: str | None = None):
        """`model_path` is a model source (`mosaic_ray.models.source`), resolved here, on this actor's node."""
        from mosaic_ray.hygiene import set_torch_threads
        from mosaic_ray.models.source import resolve_model

        from . import make_engine

        set_torch_threads(1)  # an HF engine then sets its own `cpu_threads`
        if model_path is not None and cfg.kind != "openai":  # an OpenAI server owns its weights
            model_path = resolve_model(model_path, cache_dir)
        self.model_path = model_path
        self.engine = make_engine(cfg, model_path, dtype=dtype)
        self._weight_group = None
        self._weight_group_key: str | None = None
        self._serving = not ray.get_runtime_context().was_current_actor_reconstructed
        """False after a restart until the current weights are loaded (see the module docstring)."""

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        if not self._serving:
            raise EngineNotServingError("engine restarted and waits for the current weights")
        return await self.engine.generate(requests)

    # --------------------------------------------------------------------------------- control plane

    async def update_weights(self, weights: Any, version: int) -> int:
        """Load a dict / list of (name, tensor), or an ObjectRef to one (a top-level ref arrives resolved)."""
        if isinstance(weights, ray.ObjectRef):
            weights = await weights
        await self.engine.update_weights_async(weights, version)
        self._serving = True
        return self.engine.version

    async def init_weight_group(self, host: str, port: int, world_size: int, rank: int,
                                backend: str = "gloo") -> None:
        """Join the learner's broadcast group as receiver `rank` (blocks until every rank has joined)."""
        from mosaic_ray.weight_transfer import WeightGroup

        if rank == 0:
            raise ValueError("init_weight_group: rank 0 is the sender (the learner); engines take ranks >= 1")
        self._weight_group = await asyncio.to_thread(WeightGroup.create, host, port, rank, world_size,
                                                     backend=backend)
        self._weight_group_key = f"{host}:{port}"

    def weight_group_key(self) -> str | None:
        """`host:port` of the broadcast group this engine has joined; None after a restart (it must join again)."""
        return self._weight_group_key

    async def receive_weights(self, version: int, meta: list | None = None) -> int:
        """Receive one broadcast from the learner and load it as `version`, bucket by bucket (drain, load each
        bucket as it arrives, resume): the engine holds one bucket extra, never the model. Every bucket is received
        even when the update is refused (stale version, bad names), since the sender blocks until all ranks take
        each one; the refusal is raised after."""
        from mosaic_ray.weight_transfer import recv_buckets

        if self._weight_group is None:
            raise RuntimeError("receive_weights: call init_weight_group first")
        if meta is not None:
            meta = [(name, tuple(shape), dtype) for name, shape, dtype in meta]
        buckets = recv_buckets(self._weight_group, meta)
        refused: Exception | None = None
        try:
            await self.engine.begin_weight_update(version, meta)
        except ValueError as exc:   # StaleWeightsError is a ValueError
            refused = exc
        while (bucket := await asyncio.to_thread(next, buckets, None)) is not None:
            if refused is None:
                try:
                    await self.engine.load_weight_bucket(bucket)
                except ValueError as exc:
                    refused = exc
            del bucket
        if refused is not None:
            raise refused
        await self.engine.finish_weight_update(version)
        self._serving = True
        return self.engine.version

    async def begin_weight_update(self, version: int, meta: list | None = None) -> None:
        """Object-store path: drain and hold for `version` (see `Engine.begin_weight_update`)."""
        await self.engine.begin_weight_update(version, meta)

    async def load_weight_bucket(self, bucket: Any) -> int:
        """Load one bucket: a `PackedBucket` (a top-level ObjectRef arrives resolved, its buffer a zero-copy view
        of the object store), a dict or a list of (name, tensor). Returns the bucket's bytes."""
        from mosaic_ray.weight_transfer import PackedBucket, unpack_bucket

        items = unpack_bucket(bucket) if isinstance(bucket, PackedBucket) else bucket
        items = list(items.items()) if isinstance(items, dict) else items
        await self.engine.load_weight_bucket(items)
        return sum(t.numel() * t.element_size() for _, t in items)

    async def finish_weight_update(self, version: int) -> int:
        await self.engine.finish_weight_update(version)
        self._serving = True
        return self.engine.version

    def serve_base_weights(self) -> None:
        """Serve the base model after a restart: the current policy is version 0, which it already holds."""
        if self.engine.version != 0:
            raise ValueError(f"serve_base_weights: the engine holds version {self.engine.version}, not the base model")
        self._serving = True

    def version(self) -> int:
        return self.engine.version

    def health(self) -> dict:
        return {**self.engine.health(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "version": self.engine.version, "serving": self._serving}

    async def pause(self, mode: str = "wait") -> None:
        await self.engine.pause(PauseMode(mode))

    async def resume(self) -> None:
        await self.engine.resume()

    async def sleep(self, level: int = 1) -> None:
        await self.engine.sleep(level)

    async def wake_up(self) -> None:
        await self.engine.wake_up()

    def ping(self) -> str:
        return "pong"


@ray.remote
class EngineActor(EngineHost):
    """Serves one `EngineHost` behind Ray: generation requests from rollout workers' routers, and the driver's
    weight sync and supervision."""


def engine_actor_options(cfg: EngineConfig) -> dict[str, Any]:
    """Ray options for one engine actor: CPUs/GPUs (and the engine node resource on clusters that advertise
    it) from `mosaic_ray.actors.resources.actor_options`, plus a high max_concurrency."""
    from mosaic_ray.actors.resources import actor_options

    # restarts in place keep the handle every router holds; a call in flight at a crash fails (the router
    # retries it elsewhere) rather than re-running on the restarted engine's base weights
    return {**actor_options("engine", MosaicConfig(engine=cfg)), "max_concurrency": MAX_CONCURRENCY,
            "max_restarts": cfg.max_restarts, "max_task_retries": 0}


def start_engine_actors(cfg: EngineConfig, model_path: str | None, *, dtype: str = "float32",
                        num_engines: int | None = None, wait: bool = True, placement_group: Any = None,
                        cache_dir: str | None = None) -> list:
    """Start `num_engines` (default `cfg.num_engines`) engine actors; with `wait`, return once all serve.
    With `placement_group` (`mosaic_ray.actors.resources.reserve`), engine i sits in its bundle i."""
    from mosaic_ray.actors.resources import in_bundle

    options = engine_actor_options(cfg)
    handles = [EngineActor.options(**options, **(in_bundle(placement_group, i) if placement_group else {}))
               .remote(cfg, model_path, dtype, cache_dir)
               for i in range(cfg.num_engines if num_engines is None else num_engines)]
    if wait:
        ray.get([h.ping.remote() for h in handles])
    return handles
