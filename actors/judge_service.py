"""The `mosaic-judge` Ray Serve application: the LLM judge's model, served on the cluster for the pair builder.

Each replica loads the judge model with a project engine (HF on CPU, vLLM on GPU: `engine.kind`) and answers
`chat(conversations, max_tokens)` — a batch of chat conversations, greedy, one reply text each — through
`mosaic_ray.actors.engines.chat.EngineChat`. The pair builder reaches it with `ServeChat` (a deployment handle, no HTTP:
the app has no route, and Serve is started without an HTTP proxy when this run is the one starting it). Serve
balances requests over the replicas and autoscales between `judge.min_replicas` and `judge.max_replicas` on
queued requests; each replica reserves `judge.replica_num_cpus` / `judge.replica_num_gpus`.

The driver starts the app before the first iteration (`start_judge_service`) and deletes it at the end of the run
(`stop_judge_service`); with `judge.endpoint` set, no app is started and the judge asks that server instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mosaic_ray.config import EngineConfig, JudgeConfig

JUDGE_APP = "mosaic-judge"

log = logging.getLogger(__name__)

__all__ = ["JUDGE_APP", "JudgeReplica", "start_judge_service", "stop_judge_service"]


class JudgeReplica:
    """One replica of the judge model (wrapped with `serve.deployment` in `start_judge_service`)."""

    def __init__(self, source: str, model_name: str, engine_cfg: EngineConfig, dtype: str,
                 cache_dir: str | None) -> None:
        """`source`: the judge model's source, resolved on this replica's node (`mosaic_ray.models.source`)."""
        from mosaic_ray.actors.engines.chat import EngineChat

        self.backend = EngineChat.load(source, model_name, engine_cfg, dtype, cache_dir)

    async def chat(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
        return await self.backend.chat(conversations, max_tokens)


def _deployment_options(cfg: JudgeConfig) -> dict[str, Any]:
    actor = {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus}
    if cfg.min_replicas == cfg.max_replicas:
        return {"num_replicas": cfg.max_replicas, "ray_actor_options": actor}
    return {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": 2},
            "ray_actor_options": actor}


def start_judge_service(cfg: JudgeConfig, engine_cfg: EngineConfig, source: str, model_name: str,
                        dtype: str = "float32", timeout_s: float = 600.0, cache_dir: str | None = None) -> bool:
    """Deploy `mosaic-judge` (replacing an app of that name) and wait until it is RUNNING; returns whether this
    call started Serve on the cluster (then `stop_judge_service` shuts it down again when no other app is left).

    Ray must be initialised. The judge's replies are greedy whatever the policy's sampling temperature."""
    from dataclasses import replace

    from ray import serve
    from ray.serve.config import ProxyLocation

    started = not _serve_running()
    if started:
        serve.start(proxy_location=ProxyLocation.Disabled)
    deployment = serve.deployment(JudgeReplica, name="judge", **_deployment_options(cfg))
    t0 = time.perf_counter()
    serve.run(deployment.bind(source, model_name, replace(engine_cfg, num_engines=1), dtype, cache_dir),
              name=JUDGE_APP, route_prefix=None, blocking=False)
    while True:
        status = serve.status().applications.get(JUDGE_APP)
        state = getattr(status, "status", None)
        if state == "RUNNING":
            break
        if state == "DEPLOY_FAILED" or time.perf_counter() - t0 > timeout_s:
            message = getattr(status, "message", "") or "no message"
            raise RuntimeError(f"judge service {JUDGE_APP!r} ({model_name}) did not start: {state}: {message}")
        time.sleep(0.5)
    log.info("judge service %s up: %s, replicas %d-%d, %.1f s", JUDGE_APP, model_name, cfg.min_replicas,
             cfg.max_replicas, time.perf_counter() - t0)
    return started


def stop_judge_service(shutdown_serve: bool) -> None:
    """Delete the `mosaic-judge` app; with `shutdown_serve` (this run started Serve), also shut Serve down when
    no other application runs on it, so a shared cluster keeps no controller the run left behind."""
    from ray import serve

    if not _serve_running():
        return
    if JUDGE_APP in serve.status().applications:
        serve.delete(JUDGE_APP)
    if shutdown_serve and not serve.status().applications:
        serve.shutdown()


def _serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster (it is a named actor in Serve's namespace)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True
