"""Canonical custom resource names and the Ray actor options derived from the typed config.

Why custom resources: on a cluster the autoscaler decides *which node type* to add from the shape of the
pending demand. CPU/GPU counts alone cannot tell a rollout worker (wants a cheap CPU node) from a learner
(wants the big 8-GPU node) or an engine (wants an inference GPU node). Every worker node type in
`clusters/` advertises one of the names below (1 unit per node), and each actor asks for a small fraction
of it, so the name acts as a node-type selector while CPUs/GPUs still bound how many actors fit a node
(1 / RESOURCE_FRACTION = 100 actors per node is far above any node's CPU or GPU count).

Placement: the learner ranks of a run, and its engines, each sit in a Ray placement group with one bundle per
actor (`reserve`, PACK by default: `learner.placement_strategy`, `engine.placement_strategy`). Before asking Ray,
`reserve` checks the bundles against the live nodes and the autoscaler's node types, and a request that can never
be met fails at start-up naming the missing resource; one that could be met but is not within
`*.placement_timeout_s` fails too, with what is free. Nothing waits forever.

Local runs are unaffected: the custom resource is only requested when the cluster advertises it
(`cluster_has_resource`): on a live node, in the autoscaler's node types as reported to the GCS, or declared
by the cluster config in the environment variable MOSAIC_RAY_CLUSTER_RESOURCES (comma-separated). The
declaration is needed because a node type with `min_workers: 0` has no live node before the first demand,
and Ray 2.60's autoscaler does not publish its node types to drivers; every config in `clusters/` sets it
for the driver. A laptop or CI Ray has none of the three, so actors ask for plain CPUs/GPUs and schedule
as before. The names are checked against every cluster config by `tests/test_clusters.py`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any, Literal

from mosaic_ray.config import ConfigError, MosaicConfig
from mosaic_ray.errors import UserError

ROLLOUT_RESOURCE = "mosaic_rollout"
"""Advertised by CPU rollout-worker nodes."""
ENGINE_RESOURCE = "mosaic_engine"
"""Advertised by GPU inference nodes (vLLM engines)."""
LEARNER_RESOURCE = "mosaic_learner"
"""Advertised by GPU learner nodes (FSDP2 / DDP ranks)."""

ActorKind = Literal["rollout", "engine", "learner"]
RESOURCE_BY_KIND: dict[str, str] = {"rollout": ROLLOUT_RESOURCE, "engine": ENGINE_RESOURCE,
                                    "learner": LEARNER_RESOURCE}
CLUSTER_RESOURCES_ENV = "MOSAIC_RAY_CLUSTER_RESOURCES"
"""Comma-separated custom resource names the cluster's node types advertise (set by `clusters/` configs)."""
NODE_RESOURCE_AMOUNT = 1
"""Units of its custom resource that each worker node type advertises."""
RESOURCE_FRACTION = 0.01
"""Units one actor requests: a selector, not a limit (CPUs/GPUs are the real limit)."""


def cluster_has_resource(name: str, advertised: Collection[str]) -> bool:
    """Whether `name` is among the resource names the cluster advertises (see `advertised_resources`)."""
    return name in advertised


def declared_resources(environ: Mapping[str, str] = os.environ) -> set[str]:
    """Names declared in MOSAIC_RAY_CLUSTER_RESOURCES (empty when unset)."""
    return {name.strip() for name in environ.get(CLUSTER_RESOURCES_ENV, "").split(",") if name.strip()}


def advertised_resources() -> set[str]:
    """Resource names the connected cluster offers now or can add: live nodes, the node types the autoscaler
    reported to the GCS (when it does), and `declared_resources()`.

    Without a Ray connection (plain local runs) only the declaration counts, which local runs don't set.
    Ray is imported lazily here and below (calls made by the driver, fleet and learner group, never at import).
    """
    import ray

    names = declared_resources()
    if not ray.is_initialized():
        return names
    names.update(ray.cluster_resources())
    try:  # private API (Ray 2.60); an older/newer Ray without it just falls back to live nodes
        from ray._private.state import state

        config = state.get_cluster_config()
    except (ImportError, AttributeError):
        config = None
    if config is not None:
        for group in config.node_group_configs:
            names.update(group.resources.keys())
    return names


def actor_options(kind: ActorKind, cfg: MosaicConfig, advertised: Collection[str] | None = None) -> dict[str, Any]:
    """Ray actor options (`num_cpus`, `num_gpus`, `resources`) for one rollout worker, engine or learner.

    `advertised`: resource names the cluster offers; None asks the connected cluster
    (`advertised_resources()`). The custom resource for `kind` is added only if it is advertised.
    """
    if kind == "rollout":
        num_cpus, num_gpus = cfg.rollout.num_cpus_per_worker, 0.0
    elif kind == "engine":
        num_cpus, num_gpus = cfg.engine.num_cpus, cfg.engine.num_gpus
        tp = cfg.engine.tensor_parallel_size
        if 0 < num_gpus < tp:
            raise ConfigError(
                f"engine.num_gpus: {num_gpus} is less than engine.tensor_parallel_size={tp}; one engine actor "
                f"holds every GPU of its tensor-parallel group, so set engine.num_gpus={tp}")
    elif kind == "learner":
        num_cpus, num_gpus = cfg.learner.num_cpus, cfg.learner.num_gpus
    else:
        raise ValueError(f"actor_options: unknown actor kind {kind!r} (known: {', '.join(RESOURCE_BY_KIND)})")
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    name = RESOURCE_BY_KIND[kind]
    if cluster_has_resource(name, advertised_resources() if advertised is None else advertised):
        options["resources"] = {name: RESOURCE_FRACTION}
    return options


class PlacementError(UserError):
    """The actors of one kind can never be placed on this cluster, or were not placed in time; the message names
    the resource that is missing."""


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


def node_capacities() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(total resources of each live node, resources of each node type the autoscaler may still add)."""
    import ray

    live = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    addable: list[dict[str, float]] = []
    try:  # private API (Ray 2.60), as in `advertised_resources`
        from ray._private.state import state

        config = state.get_cluster_config()
    except (ImportError, AttributeError):
        config = None
    if config is not None:
        addable = [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]
    return live, addable


def unmet(bundle: dict[str, float], count: int, strategy: PlacementStrategy, live: list[dict[str, float]],
          addable: list[dict[str, float]]) -> str | None:
    """Why `count` bundles can never be placed with `strategy` on these nodes (None when they can): some resource
    no node offers, a STRICT_PACK larger than any node, or (when the autoscaler can add no node type) more bundles
    than the live nodes hold in total."""
    def fits(cap: dict[str, float], need: dict[str, float]) -> bool:
        return all(cap.get(k, 0.0) >= v - 1e-9 for k, v in need.items())

    nodes = live + addable
    if not any(fits(cap, bundle) for cap in nodes):
        short = [f"{k} {v:g} (largest node: {max((c.get(k, 0.0) for c in nodes), default=0.0):g})"
                 for k, v in bundle.items() if all(c.get(k, 0.0) < v - 1e-9 for c in nodes)]
        return "no node offers " + ", ".join(short or [f"all of {bundle} at once"])
    if strategy == "STRICT_PACK":
        total = {k: v * count for k, v in bundle.items()}
        if not any(fits(cap, total) for cap in nodes):
            return f"STRICT_PACK needs {total} on one node, and no node is that large"
    if addable:   # the autoscaler can add nodes: each bundle fitting some node type is enough
        return None
    if strategy == "STRICT_SPREAD":
        room = sum(fits(cap, bundle) for cap in live)
        return None if room >= count else f"STRICT_SPREAD needs {count} nodes that fit one bundle, the cluster has {room}"
    room = sum(int(min(cap.get(k, 0.0) / v for k, v in bundle.items() if v > 0) + 1e-9) for cap in live)
    return None if room >= count else (f"the cluster's nodes hold {room} such bundle(s) in total, {count} needed "
                                       f"(cluster resources: {_short(ray_total(live))})")


def run_demand(cfg: MosaicConfig) -> list[tuple[str, dict[str, float], int]]:
    """What one training run holds for its whole life, as (what, bundle, count): the learner ranks, the engines
    (or colocated rollout workers), the rollout workers the fleet starts with, the pair builder and the LLM
    judge's fewest replicas. CPUs and GPUs only (custom resources only select a node type)."""
    def bundle(cpus: float, gpus: float = 0.0) -> dict[str, float]:
        return {k: v for k, v in (("CPU", float(cpus)), ("GPU", float(gpus))) if v > 0}

    rc, ec, jc = cfg.rollout, cfg.engine, cfg.judge
    demand = []
    if cfg.learner.num_learners:
        demand.append(("learner", bundle(cfg.learner.num_cpus, cfg.learner.num_gpus), cfg.learner.num_learners))
    if rc.colocate_engine:
        demand.append(("colocated rollout worker (engine.num_cpus + rollout.num_cpus_per_worker)",
                       bundle(ec.num_cpus + rc.num_cpus_per_worker, ec.num_gpus), ec.num_engines))
    else:
        demand.append(("engine", bundle(ec.num_cpus, ec.num_gpus), ec.num_engines))
        demand.append(("rollout worker", bundle(rc.num_cpus_per_worker), max(rc.min_workers, 1)))
    demand.append(("pair builder (judge.num_cpus)", bundle(jc.num_cpus), 1))
    if jc.kind == "llm" and jc.endpoint is None and jc.min_replicas:
        demand.append(("judge replica (judge.replica_num_cpus)", bundle(jc.replica_num_cpus, jc.replica_num_gpus),
                       jc.min_replicas))
    return [d for d in demand if d[2] > 0]


def run_shortfall(demand: list[tuple[str, dict[str, float], int]], live: list[dict[str, float]],
                  addable: list[dict[str, float]]) -> str | None:
    """Why the run's actors (`run_demand`) can never all hold their resources at once on these nodes, or None.
    Only a cluster that cannot grow is judged: Ray would queue the last actors forever, and the run would wait
    without a word."""
    if addable:
        return None
    total = ray_total(live)
    need: dict[str, float] = {}
    for _, b, n in demand:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v * n
    short = [k for k, v in need.items() if v > total.get(k, 0.0) + 1e-9]
    if not short:
        return None
    parts = ", ".join(f"{n} {what} × {_short(b)}" for what, b, n in demand)
    return (f"the run's actors need {', '.join(f'{k} {need[k]:g}' for k in short)} at once and the cluster has "
            f"{', '.join(f'{k} {total.get(k, 0.0):g}' for k in short)} ({parts}); Ray would queue the last of them "
            f"forever. Lower their num_cpus / num_gpus or counts, or start Ray with more")


def check_run_fits(cfg: MosaicConfig) -> None:
    """Raise PlacementError when the connected cluster (which the autoscaler cannot grow) can never hold every
    actor of the run at once (`run_shortfall`)."""
    if declared_resources():   # a cluster config declares node types the autoscaler starts on demand
        return
    live, addable = node_capacities()
    why = run_shortfall(run_demand(cfg), live, addable)
    if why is not None:
        raise PlacementError(why)


def ray_total(nodes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for cap in nodes:
        for k, v in cap.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _short(resources: Mapping[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "accelerator_type:"))
            and k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items()))


def reserve(kind: ActorKind, options: dict[str, Any], count: int, *, strategy: PlacementStrategy = "PACK",
            timeout_s: float = 600.0) -> Any:
    """A ready placement group of `count` bundles shaped like `options` (from `actor_options`), one per actor.

    Fails at once (PlacementError) when the cluster can never hold them, naming the missing resource, and after
    `timeout_s` when it could but did not (other actors hold the resources, or the autoscaler cannot add nodes):
    a run never hangs waiting for resources. The caller removes the group when its actors are done
    (`ray.util.remove_placement_group`)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = as_bundle(options) or {"CPU": 0.001}   # Ray refuses an empty bundle
    live, addable = node_capacities()
    known = {k for cap in live + addable for k in cap}
    # a resource only declared by name belongs to nodes the autoscaler has not started yet: only the timeout tells
    why = None if set(bundle) & (declared_resources() - known) else unmet(bundle, count, strategy, live, addable)
    if why is not None:
        raise PlacementError(f"{count} {kind}(s) of {_short(bundle)} each ({strategy}) can never be placed: {why}. "
                             f"Lower {kind}'s num_cpus / num_gpus or count, or add nodes that offer it")
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(f"{count} {kind}(s) of {_short(bundle)} each ({strategy}) were not placed within "
                             f"{timeout_s:g} s ({kind}.placement_timeout_s); free now: "
                             f"{_short(ray.available_resources())}") from None
    return pg


def in_bundle(pg: Any, index: int) -> dict[str, Any]:
    """Actor options that put an actor into bundle `index` of placement group `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def as_bundle(options: dict[str, Any]) -> dict[str, float]:
    """The resource bundle of `actor_options(...)`, e.g. for `ray.autoscaler.sdk.request_resources`."""
    bundle = {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"]),
              **options.get("resources", {})}
    return {k: v for k, v in bundle.items() if v > 0}
