"""`RolloutWorker`: an async Ray actor that runs many MOSAIC episodes at once and returns one record each.

A thin wrapper around the Ray-free runner `mosaic_ray.rollout.run_episode`: the actor loads the tokenizer
from the model directory, builds the policy (an `EngineRouter` over engine actors, or a scripted policy by
name), and serves `stream_episodes(specs)` calls. Up to `rollout.episodes_per_worker` episodes run concurrently
(an asyncio semaphore, across calls); while one episode awaits its engine, the others render, parse and run tools.

One call = several episodes (the fleet sizes them; see `actors/fleet.py`), run concurrently; the call is a Ray
streaming generator that yields episodes as they end. `stream_episodes(specs, sink)` (training) hands the records
straight to the pair builder (`sink`, one `add` per yield) and yields only `EpisodeReceipt`s, so trajectories never
pass through the driver; `stream_episodes(specs)` (evaluation) yields the records themselves. A worker that dies
loses exactly the episodes it had not yielded, which the fleet re-runs elsewhere under the same deterministic
trajectory ids (and the same per-turn sampling seeds); the pair builder drops a record it already holds.

Two kinds of worker serve the same episode methods (`EpisodeServer`): `RolloutWorker` calls engine actors through
a router, and `ColocatedWorker` (`rollout.colocate_engine`) hosts its own engine (`EngineHost`) and is the run's
engine as well. Colocation keeps every generation request inside one process: on a small CPU machine a separate
engine process competes with the worker for the same cores while the two hand each turn back and forth
(docs/throughput.md).

Metrics (`ray.util.metrics`, exported with a `ray_` prefix; counters get `_total`): episodes, tokens, tool
calls, refusals, safety checks, harmful actions and episode latency, tagged by category.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import ray

from mosaic_ray.config import EngineConfig, MosaicConfig
from mosaic_ray.models.source import resolve_model
from mosaic_ray.rollout import (
    EpisodeReceipt,
    EpisodeSpec,
    PolicyFactory,
    TurnRequest,
    load_tokenizer,
    run_episode,
    scripted_factory,
)
from mosaic_ray.schema import TrajectoryRecord

from .engines.actor import EngineHost, engine_actor_options, start_engine_actors
from .engines.base import Completion, GenerationRequest, SamplingParams
from .engines.router import EngineNotServingError, EngineRouter
from .pair_builder import acall_pair_builder

__all__ = ["LATENCY_BOUNDARIES_S", "ColocatedWorker", "EnginePolicy", "EpisodeMetrics", "EpisodeServer", "RolloutWorker",
           "deliver", "rollout_engine_options", "start_colocated_workers", "start_rollout_engines"]

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class EnginePolicy:
    """The runner's policy callable over an `EngineRouter`: `TurnRequest` → engine `Completion`.
    `ignore_eos` (benchmarks only, see `SamplingParams.ignore_eos`): every turn generates `max_new_tokens`."""

    def __init__(self, router: EngineRouter, engine_cfg: EngineConfig, *, ignore_eos: bool = False):
        self.router = router
        self.temperature = engine_cfg.temperature
        self.top_p = engine_cfg.top_p
        self.ignore_eos = ignore_eos

    async def __call__(self, request: TurnRequest) -> Completion:
        temperature = self.temperature if request.temperature is None else request.temperature
        sampling = SamplingParams(temperature=temperature, top_p=self.top_p, max_new_tokens=request.max_new_tokens,
                                  seed=request.seed, ignore_eos=self.ignore_eos)
        return await self.router.generate(GenerationRequest(list(request.prompt_ids), sampling,
                                                            request.request_id, request.session_id))


class EpisodeMetrics:
    """The per-episode counters and latency histogram (one set per worker process)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        tags = ("category",)
        self.episodes = Counter("mosaic_episodes", "Episodes finished (tagged by terminal).", ("category", "terminal"))
        self.tokens = Counter("mosaic_tokens", "Policy-generated tokens.", tags)
        self.tool_calls = Counter("mosaic_tool_calls", "Tool calls executed in sandboxes.", tags)
        self.refusals = Counter("mosaic_refusals", "Episodes that ended with a refuse call.", tags)
        self.safety_checks = Counter("mosaic_safety_checks", "Turns with a <safety_thoughts> check.", tags)
        self.harmful = Counter("mosaic_harmful_actions", "Episodes where a harmful call executed.", tags)
        self.errors = Counter("mosaic_episode_errors", "Episodes failed by an engine or sandbox error.", tags)
        self.latency = Histogram("mosaic_episode_latency_s", "Episode wall time (s).", LATENCY_BOUNDARIES_S, tags)

    def record(self, rec: TrajectoryRecord) -> None:
        tags = {"category": rec.category}
        out = rec.outcome
        self.episodes.inc(1, tags={**tags, "terminal": out.terminal})
        generated = sum(rec.loss_mask)
        if generated:
            self.tokens.inc(generated, tags=tags)
        calls = sum(1 for s in rec.steps if s.action_kind == "tool_call")
        if calls:
            self.tool_calls.inc(calls, tags=tags)
        if out.refused_at_step is not None:
            self.refusals.inc(1, tags=tags)
        if out.safety_checks:
            self.safety_checks.inc(out.safety_checks, tags=tags)
        if out.harmful_action_step is not None:
            self.harmful.inc(1, tags=tags)
        if rec.error is not None:
            self.errors.inc(1, tags=tags)
        self.latency.observe(rec.timings.total_s, tags=tags)


SINK_ATTEMPTS = 3
"""Tries of one delivery to the pair builder when its process dies (it restarts from its manifests)."""


async def deliver(sink: Any, records: list[TrajectoryRecord]) -> None:
    """`sink.add(records)`, awaited (the fleet counts an episode only once the pair builder holds it), and tried
    again on the restarted pair builder; what a crash lost from its buffer the driver re-sends."""
    await acall_pair_builder(sink, "add", records, attempts=SINK_ATTEMPTS)


YIELD_WINDOW_S = 0.01
"""How long a stream holds a finished episode for others to share its yield: each yield is a Ray object (and, in
training, a pair-builder call); the fleet's refill never waits on it, as a worker holds spare episodes."""


class EpisodeServer:
    """The data plane every rollout worker serves (plain Python): episodes through `policy_for`, up to
    `rollout.episodes_per_worker` at once across calls, their metrics and counters."""

    def __init__(self, worker_id: str, cfg: MosaicConfig, tokenizer: Any, policy_for: PolicyFactory):
        self.worker_id = worker_id
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._policy_for = policy_for
        self._gate = asyncio.Semaphore(cfg.rollout.episodes_per_worker)
        self.metrics = EpisodeMetrics()
        self.running = 0
        self.finished = 0

    # ------------------------------------------------------------------------------------ data plane

    async def run_episode(self, spec: EpisodeSpec) -> TrajectoryRecord:
        async with self._gate:
            self.running += 1
            try:
                rec = await run_episode(spec, self._policy_for(spec), self.tokenizer, protocol_cfg=self.cfg.protocol,
                                        family=self.cfg.model.family, worker_id=self.worker_id)
            finally:
                self.running -= 1
        self.finished += 1
        self.metrics.record(rec)
        return rec

    async def stream_episodes(self, specs: list[EpisodeSpec], sink: Any = None) -> AsyncIterator[list[Any]]:
        """Every spec's episode, concurrently (within `episodes_per_worker` across calls), yielded as they end:
        the records of the episodes that ended since the last yield, or with `sink` (the pair builder) their
        receipts, once one `sink.add(records)` holds them. A Ray streaming generator: the fleet frees an
        episode's slot as soon as it ends, not when the call's slowest episode does."""
        pending = {asyncio.ensure_future(self.run_episode(spec)) for spec in specs}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if pending:   # the episodes that end within the window ride along (one object, one `add`)
                    more, pending = await asyncio.wait(pending, timeout=YIELD_WINDOW_S)
                    done |= more
                records = [task.result() for task in done]
                if sink is None:
                    yield records
                else:
                    await deliver(sink, records)
                    yield [EpisodeReceipt.of(rec) for rec in records]
        finally:   # an error, or the caller dropped the stream: nothing runs on for nobody
            for task in pending:
                task.cancel()

    # --------------------------------------------------------------------------------- control plane

    async def ready(self) -> dict[str, Any]:
        """Called by the fleet after start: where this worker runs."""
        return {"worker_id": self.worker_id, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "running": self.running, "finished": self.finished}

    def ping(self) -> str:
        return "pong"


@ray.remote(max_restarts=0)
class RolloutWorker(EpisodeServer):
    """Serves `stream_episodes(specs[, sink])`, yielding episodes as they end; see the module docstring.

    Exactly one policy source: `router` (an `EngineRouter` over engine actor handles) or `scripted` (a name
    from `mosaic_ray.policies.scripted.SCRIPTED`, with `scripted_delay_s` of simulated latency per turn).
    """

    def __init__(self, worker_id: str, cfg: MosaicConfig, model_dir: str, *, router: EngineRouter | None = None,
                 scripted: str | None = None, scripted_delay_s: float = 0.0):
        from mosaic_ray.hygiene import set_torch_threads

        set_torch_threads(1)
        if (router is None) == (scripted is None):
            raise ValueError("RolloutWorker: pass exactly one of router= (engine actors) or scripted= (a name)")
        # a model source, resolved on this worker's node (`mosaic_ray.models.source`)
        tokenizer = load_tokenizer(resolve_model(model_dir, cfg.model.cache_dir), cfg.model.chat_template)
        if router is not None:
            policy = EnginePolicy(router, cfg.engine)
            policy_for: PolicyFactory = lambda spec: policy
        else:
            policy_for = scripted_factory(scripted, tokenizer, family=cfg.model.family, delay_s=scripted_delay_s)
        super().__init__(worker_id, cfg, tokenizer, policy_for)

    def set_router(self, router: EngineRouter) -> None:
        """Serve new episodes through `router` (engines added or removed); running episodes keep theirs."""
        policy = EnginePolicy(router, self.cfg.engine)
        self._policy_for = lambda spec: policy


@ray.remote
class ColocatedWorker(EngineHost, EpisodeServer):
    """A rollout worker that hosts its own engine (`rollout.colocate_engine`): its episodes await the engine in
    this process, so no generation request crosses Ray, and the driver treats it as an engine actor (weight sync,
    the engine supervisor's health checks, hung kills and reloads, restarts in place). After a restart it holds the
    base model: `ready()` answers, and episodes run, only once the supervisor has loaded the current weights."""

    def __init__(self, worker_id: str, cfg: MosaicConfig, model_source: str):
        EngineHost.__init__(self, cfg.engine, model_source, cfg.model.dtype, cfg.model.cache_dir)
        tokenizer = load_tokenizer(self.model_path, cfg.model.chat_template)
        policy = EnginePolicy(EngineRouter([self.engine]), cfg.engine)
        EpisodeServer.__init__(self, worker_id, cfg, tokenizer, lambda spec: policy)

    async def stream_episodes(self, specs: list[EpisodeSpec], sink: Any = None) -> AsyncIterator[list[Any]]:
        if not self._serving:
            raise EngineNotServingError(f"{self.worker_id}: restarted, waits for the current weights")
        async for batch in EpisodeServer.stream_episodes(self, specs, sink):
            yield batch

    async def ready(self) -> dict[str, Any]:
        """Once the engine serves the current policy (at once, unless this worker restarted)."""
        while not self._serving:
            await asyncio.sleep(READY_POLL_S)
        return await EpisodeServer.ready(self)


READY_POLL_S = 0.2


def colocated_options(cfg: MosaicConfig) -> dict[str, Any]:
    """Ray options of one colocated worker: an engine actor's (GPUs, the engine node resource, restarts, a high
    max_concurrency) with the rollout worker's CPUs added."""
    options = engine_actor_options(cfg.engine)
    return {**options, "num_cpus": options["num_cpus"] + cfg.rollout.num_cpus_per_worker}


def start_colocated_workers(cfg: MosaicConfig, model_source: str, *, num: int | None = None,
                            placement_group: Any = None) -> list:
    """Start `num` (default `engine.num_engines`) colocated workers and return once all answer; with
    `placement_group`, worker i sits in its bundle i."""
    from .resources import in_bundle

    options = colocated_options(cfg)
    handles = [ColocatedWorker.options(**options, **(in_bundle(placement_group, i) if placement_group else {}))
               .remote(f"rollout-{i}", cfg, model_source)
               for i in range(cfg.engine.num_engines if num is None else num)]
    ray.get([h.ping.remote() for h in handles])
    return handles


def start_rollout_engines(cfg: MosaicConfig, model_source: str, *, placement_group: Any = None) -> list:
    """The run's engines as `rollout.colocate_engine` says: colocated workers, or engine actors for rollout
    workers to call."""
    if cfg.rollout.colocate_engine:
        return start_colocated_workers(cfg, model_source, placement_group=placement_group)
    return start_engine_actors(cfg.engine, model_source, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
                               placement_group=placement_group)


def rollout_engine_options(cfg: MosaicConfig) -> dict[str, Any]:
    """Ray options of one of the run's engines (`start_rollout_engines`), for its placement group."""
    return colocated_options(cfg) if cfg.rollout.colocate_engine else engine_actor_options(cfg.engine)
