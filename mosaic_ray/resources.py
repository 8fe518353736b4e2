"""Canonical custom resource names and the Ray actor options derived from the typed config.

Why custom resources: on a cluster the autoscaler decides *which node type* to add from the shape of the
pending demand. CPU/GPU counts alone cannot tell a rollout worker (wants a cheap CPU node) from a learner
(wants the big 8-GPU node) or an engine (wants an inference GPU node). Every worker node type in
`clusters/` advertises one of the names below (1 unit per node), and each actor asks for a small fraction
of it, so the name acts as a node-type selector while CPUs/GPUs still bound how many actors fit a node
(1 / RESOURCE_FRACTION = 100 actors per node is far above any node's CPU or GPU count).

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
    Ray is imported lazily: this is the module's only Ray call, made by the driver/fleet, never at import.
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


def as_bundle(options: dict[str, Any]) -> dict[str, float]:
    """The resource bundle of `actor_options(...)`, e.g. for `ray.autoscaler.sdk.request_resources`."""
    bundle = {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"]),
              **options.get("resources", {})}
    return {k: v for k, v in bundle.items() if v > 0}
