"""Colocated engines (`rollout.colocate_engine`) on the session Ray cluster: each rollout worker hosts its own HF
engine and is the run's engine too, so the engine supervisor loads its weights, and a worker killed mid-stream
restarts in place, loses and duplicates no episode, and takes episodes again only with the current weights."""

from __future__ import annotations

import os
import signal
import time

import pyarrow as pa
import pytest
import torch

from mosaic_ray.config import ConfigError, load_config
from mosaic_ray.schema import from_arrow

COLOCATED = ["rollout.colocate_engine=true", "rollout.autoscale=false", "rollout.num_cpus_per_worker=0.25",
             "rollout.episodes_per_worker=8", "rollout.control_interval_s=0.2", "engine.num_engines=2",
             "engine.num_cpus=0.25", "engine.max_batch_size=8", "engine.device=cpu", "engine.health_interval_s=0.5",
             "engine.hung_after_s=30", "protocol.max_new_tokens=16", "protocol.max_steps=2"]


@pytest.mark.parametrize(("sets", "says"), [
    (["rollout.colocate_engine=true", "rollout.autoscale=false", "engine.kind=vllm"], "only HF engines"),
    (["rollout.colocate_engine=true", "rollout.autoscale=true"], "set rollout.autoscale=false"),
])
def test_a_colocation_that_cannot_run_fails_when_the_config_loads(sets, says):
    with pytest.raises(ConfigError, match="rollout.colocate_engine") as err:
        load_config("tiny-cpu", sets)
    assert says in str(err.value)


@pytest.mark.ray
@pytest.mark.slow
def test_colocated_workers_take_weights_and_survive_a_kill_exactly_once(ray_session, tiny_model_dir):
    import ray
    from mosaic_ray.actors.engines.supervisor import EngineSupervisor
    from mosaic_ray.actors.fleet import RolloutFleet
    from mosaic_ray.actors.rollout_worker import start_rollout_engines

    from mosaic_ray.scenarios import load_tasks

    cfg = load_config("tiny-cpu", COLOCATED)
    workers = start_rollout_engines(cfg, tiny_model_dir)
    pushes: list[tuple[int, int]] = []
    norm = torch.full((128,), 0.5)

    def push(targets, version):
        ray.get([w.update_weights.remote({"model.norm.weight": norm}, version) for w in targets])
        pushes.append((len(targets), version))
        return {}

    sup = EngineSupervisor(workers, cfg.engine, push)
    tasks = load_tasks("train", size=24)
    try:
        sup.push(2)
        with RolloutFleet(cfg, model_dir=tiny_model_dir, engine_handles=workers, run_id="co") as fleet:
            assert fleet.wait_for_workers(2) == 2
            with pytest.raises(ValueError, match="colocate_engine"):
                fleet.scale_to(3)  # the fleet is the engines: a fixed set
            pid = ray.get(workers[1].health.remote())["pid"]
            batches, killed = [], False
            for batch in fleet.stream(tasks, group_size=4, iteration=0, policy_version=2):
                batches.append(batch)
                if not killed:  # mid-stream: the worker's in-flight episodes go back to the queue
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            records = from_arrow(pa.Table.from_batches(batches))
            ids = [r.traj_id for r in records]
            assert len(ids) == 96 and len(set(ids)) == 96
            assert all(r.error is None for r in records)
            stats = fleet.stats()
            assert stats["worker_deaths"] >= 1 and stats["duplicates_dropped"] == 0
            # back in place (same handle, new process) with the current weights, then in dispatch again
            deadline = time.monotonic() + 120
            while fleet.num_workers < 2:
                assert time.monotonic() < deadline, f"the killed worker never came back: {fleet.workers()}"
                time.sleep(0.2)
            health = ray.get(workers[1].health.remote())
            assert health["pid"] != pid and health["serving"] and health["version"] == 2
            assert (1, 2) in pushes  # the supervisor reloaded the restarted worker alone
            again = from_arrow(pa.Table.from_batches(list(fleet.stream(tasks[:8], group_size=4, iteration=1))))
            assert {r.worker_id for r in again} == {"rollout-0", "rollout-1"}
            assert all(r.error is None for r in again)
    finally:
        sup.stop()
        for w in workers:
            ray.kill(w, no_restart=True)
