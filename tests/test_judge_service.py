"""The `mosaic-judge` Ray Serve app on a real local Ray: deployed with the config's replica bounds and resources,
answers the judge's chat batches through `ServeChat` (a deployment handle, as the pair builder does), and is
deleted with the run, Serve shut down with it when the run had started it."""

from __future__ import annotations

import asyncio

import pytest
from mosaic_ray.actors.judge_service import (
    JUDGE_APP,
    _deployment_options,
    _serve_running,
    start_judge_service,
    stop_judge_service,
)

from mosaic_ray.config import load_config
from mosaic_ray.judge.llm import ServeChat
from mosaic_ray.models.base import shipped_base


def test_replica_bounds_map_to_fixed_replicas_or_autoscaling():
    fixed = _deployment_options(load_config("smoke", ["judge.kind=llm", "judge.max_replicas=2",
                                                      "judge.min_replicas=2"]).judge)
    assert fixed == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    auto = _deployment_options(load_config("smoke", ["judge.kind=llm", "judge.max_replicas=4",
                                                     "judge.replica_num_gpus=1"]).judge)
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}


@pytest.mark.slow
def test_the_judge_app_serves_chat_batches_and_leaves_nothing_behind(ray_session):
    from ray import serve

    cfg = load_config("smoke", ["judge.kind=llm"])
    assert not _serve_running()
    started = start_judge_service(cfg.judge, cfg.engine, str(shipped_base()), "tiny-base")
    try:
        assert started
        app = serve.status().applications[JUDGE_APP]
        assert str(app.status).endswith("RUNNING") and "judge" in app.deployments
        conv = [{"role": "system", "content": "You judge."}, {"role": "user", "content": "Attempt A or B?"}]
        replies = asyncio.run(ServeChat(JUDGE_APP, "tiny-base").chat([conv, conv, conv], 8))
        assert len(replies) == 3 and len(set(replies)) == 1  # greedy: the same question, the same reply
    finally:
        stop_judge_service(started)
    assert not _serve_running(), "Serve's controller outlived the run that started it"
