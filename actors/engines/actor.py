"""`EngineActor`: one engine in a Ray async actor, and helpers to start engine actors from the config.

The actor is async with a high `max_concurrency`, so many rollout workers' `generate` calls are inside the
engine at once and the HF engine can batch them. Weight updates arrive either by value (a dict of tensors, or
an ObjectRef to one, which the driver `ray.put`s once for all engines) or by broadcast over a private
torch.distributed group (`init_weight_group` + `receive_weights`, see `mosaic_ray.weight_transfer`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import ray

from mosaic_ray.config import EngineConfig, MosaicConfig

from .base import Completion, GenerationRequest, PauseMode, check_version

__all__ = ["MAX_CONCURRENCY", "EngineActor", "engine_actor_options", "start_engine_actors"]

MAX_CONCURRENCY = 1024
"""Concurrent calls one engine actor accepts (requests beyond a batch wait inside the engine's queue)."""


@ray.remote
class EngineActor:
    """Hosts one engine (`make_engine(cfg, model_path)`) behind Ray; see the module docstring."""

    def __init__(self, cfg: EngineConfig, model_path: str | None, dtype: str = "float32"):
        from mosaic_ray.hygiene import set_torch_threads

        from . import make_engine

        set_torch_threads(1)  # an HF engine then sets its own `cpu_threads`
        self.engine = make_engine(cfg, model_path, dtype=dtype)
        self._weight_group = None

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return await self.engine.generate(requests)

    # --------------------------------------------------------------------------------- control plane

    async def update_weights(self, weights: Any, version: int) -> int:
        """Load a dict / list of (name, tensor), or an ObjectRef to one (a top-level ref arrives resolved)."""
        if isinstance(weights, ray.ObjectRef):
            weights = await weights
        await self.engine.update_weights_async(weights, version)
        return self.engine.version

    async def init_weight_group(self, host: str, port: int, world_size: int, rank: int,
                                backend: str = "gloo") -> None:
        """Join the learner's broadcast group as receiver `rank` (blocks until every rank has joined)."""
        from mosaic_ray.weight_transfer import WeightGroup

        if rank == 0:
            raise ValueError("init_weight_group: rank 0 is the sender (the learner); engines take ranks >= 1")
        self._weight_group = await asyncio.to_thread(WeightGroup.create, host, port, rank, world_size,
                                                     backend=backend)

    async def receive_weights(self, version: int, meta: list | None = None) -> int:
        """Receive one broadcast from the learner and load it as `version`. The tensors are always received
        (the sender blocks until every rank does) before a stale version is rejected."""
        from mosaic_ray.weight_transfer import recv_weights

        if self._weight_group is None:
            raise RuntimeError("receive_weights: call init_weight_group first")
        if meta is not None:
            meta = [(name, tuple(shape), dtype) for name, shape, dtype in meta]
        tensors = await asyncio.to_thread(recv_weights, self._weight_group, meta)
        check_version(self.engine.version, version)
        await self.engine.update_weights_async(tensors, version)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def health(self) -> dict:
        return {**self.engine.health(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

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


def engine_actor_options(cfg: EngineConfig) -> dict[str, Any]:
    """Ray options for one engine actor: CPUs/GPUs (and the engine node resource on clusters that advertise
    it) from `mosaic_ray.resources.actor_options`, plus a high max_concurrency."""
    from mosaic_ray.resources import actor_options

    return {**actor_options("engine", MosaicConfig(engine=cfg)), "max_concurrency": MAX_CONCURRENCY}


def start_engine_actors(cfg: EngineConfig, model_path: str | None, *, dtype: str = "float32",
                        num_engines: int | None = None, wait: bool = True) -> list:
    """Start `num_engines` (default `cfg.num_engines`) engine actors; with `wait`, return once all serve."""
    options = engine_actor_options(cfg)
    handles = [EngineActor.options(**options).remote(cfg, model_path, dtype)
               for _ in range(cfg.num_engines if num_engines is None else num_engines)]
    if wait:
        ray.get([h.ping.remote() for h in handles])
    return handles
