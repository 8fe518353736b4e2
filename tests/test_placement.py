"""Placement: learners and engines sit in placement groups (one bundle per actor); a request the cluster can never
meet fails at start-up naming the missing resource, one it cannot meet in time fails after its timeout."""

from __future__ import annotations

import pytest
from mosaic_ray.actors.resources import PlacementError, reserve, unmet

from mosaic_ray.config import LearnerConfig

GPU_NODE = {"CPU": 16.0, "GPU": 8.0, "mosaic_learner": 1.0}
CPU_NODE = {"CPU": 4.0}


def test_unmet_names_the_resource_no_node_offers():
    assert unmet({"CPU": 1.0, "GPU": 1.0}, 2, "PACK", [CPU_NODE], []) == "no node offers GPU 1 (largest node: 0)"
    assert unmet({"CPU": 1.0, "GPU": 1.0}, 8, "PACK", [CPU_NODE, GPU_NODE], []) is None
    assert "9 needed" not in (unmet({"CPU": 1.0, "GPU": 1.0}, 8, "PACK", [GPU_NODE], []) or "")
    assert unmet({"CPU": 1.0, "GPU": 1.0}, 9, "PACK", [GPU_NODE], []).startswith(
        "the cluster's nodes hold 8 such bundle(s) in total, 9 needed")


def test_unmet_knows_the_strategies_and_the_autoscaler():
    bundle = {"CPU": 2.0, "GPU": 1.0}
    assert "STRICT_PACK needs" in unmet(bundle, 9, "STRICT_PACK", [GPU_NODE], [GPU_NODE])
    assert unmet(bundle, 8, "STRICT_PACK", [GPU_NODE], []) is None
    assert unmet(bundle, 2, "STRICT_SPREAD", [GPU_NODE], []) == (
        "STRICT_SPREAD needs 2 nodes that fit one bundle, the cluster has 1")
    assert unmet(bundle, 2, "STRICT_SPREAD", [GPU_NODE], [GPU_NODE]) is None   # the autoscaler adds a node
    assert unmet(bundle, 100, "PACK", [CPU_NODE], [GPU_NODE]) is None
    assert unmet({"CPU": 1.0, "mosaic_engine": 0.01}, 1, "PACK", [GPU_NODE], []).startswith(
        "no node offers mosaic_engine 0.01")


@pytest.mark.ray
def test_a_learner_group_that_can_never_be_placed_fails_at_once_naming_the_gpu(ray_session, tiny_model_dir):
    import time

    from mosaic_ray.learners import LearnerGroup

    t0 = time.perf_counter()
    with pytest.raises(PlacementError, match=r"2 learner\(s\) of CPU: 1, GPU: 1 each \(PACK\) can never be placed: "
                                             r"no node offers GPU 1"):
        LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=2, backend="nccl", num_cpus=1, num_gpus=1))
    with pytest.raises(PlacementError, match="in total, 2 needed"):
        LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=2, num_cpus=3))   # 4-CPU test node
    assert time.perf_counter() - t0 < 10


@pytest.mark.ray
def test_a_placement_the_cluster_could_hold_but_does_not_fails_after_its_timeout(ray_session):
    import time

    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    free = ray.available_resources().get("CPU", 0.0)
    hog = placement_group([{"CPU": free - 0.25}])   # everything but a quarter CPU is taken
    ray.get(hog.ready(), timeout=30)
    try:
        with pytest.raises(PlacementError, match=r"not placed within 1 s \(learner.placement_timeout_s\); free now"):
            reserve("learner", {"num_cpus": 0.5, "num_gpus": 0.0}, 2, timeout_s=1.0)
    finally:
        remove_placement_group(hog)
    pg = reserve("engine", {"num_cpus": 0.5, "num_gpus": 0.0}, 2, strategy="PACK", timeout_s=30)
    table = placement_group_table(pg)
    assert table["state"] == "CREATED" and table["strategy"] == "PACK"
    assert list(table["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.5}]
    remove_placement_group(pg)
    # removal is asynchronous: wait until both groups' CPUs are back, so no later test of the session sees them held
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < free and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0.0) == free


def test_a_run_that_a_fixed_cluster_can_never_hold_is_named_before_any_actor_starts():
    from mosaic_ray.actors.resources import run_demand, run_shortfall

    from mosaic_ray.config import load_config

    laptop = [{"CPU": 2.0, "memory": 8e9}]
    assert run_shortfall(run_demand(load_config("tiny-cpu")), laptop, []) is None
    assert run_shortfall(run_demand(load_config("tiny-cpu", ["judge.kind=llm"])), laptop, []) is None
    # the case that once waited without a word: colocated workers of 0.75 CPU leave no room for the LLM judge
    cfg = load_config("tiny-cpu", ["judge.kind=llm", "engine.num_cpus=0.5", "rollout.num_cpus_per_worker=0.25"])
    demand = {what: (b, n) for what, b, n in run_demand(cfg)}
    assert demand["colocated rollout worker (engine.num_cpus + rollout.num_cpus_per_worker)"] == ({"CPU": 0.75}, 2)
    assert demand["judge replica (judge.replica_num_cpus)"] == ({"CPU": 0.5}, 1)
    why = run_shortfall(run_demand(cfg), laptop, [])
    assert why is not None and why.startswith("the run's actors need CPU 2.75 at once and the cluster has CPU 2 (")
    assert "1 judge replica (judge.replica_num_cpus) × CPU: 0.5" in why
    assert run_shortfall(run_demand(cfg), laptop, [{"CPU": 8.0}]) is None    # the autoscaler can add a node
    gpu = load_config("tiny-cpu", ["learner.num_learners=2", "learner.num_gpus=1", "learner.backend=nccl"])
    assert "need GPU 2 at once and the cluster has GPU 0" in run_shortfall(run_demand(gpu), laptop, [])


@pytest.mark.ray
def test_the_trainer_refuses_a_run_the_local_cluster_can_never_hold(ray_session, tmp_path):
    import ray

    from mosaic_ray.config import load_config
    from mosaic_ray.driver.train import Trainer

    cpus = ray.cluster_resources()["CPU"]
    cfg = load_config("tiny-cpu", [f"judge.num_cpus={cpus}"])   # the pair builder alone takes every CPU
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
    with pytest.raises(PlacementError, match=rf"need CPU [0-9.]+ at once and the cluster has CPU {cpus:g} \("):
        trainer.setup()
    assert ray.available_resources().get("CPU") == cpus   # nothing was started
