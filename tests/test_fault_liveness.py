"""[Fault tolerance] Liveness on the session Ray cluster: a hung engine (SIGSTOP: alive, never answers) costs a
request its deadline, not the run; dead and hung engines come back with the current weights; a lost learner
rank never leaves the others waiting in a collective, and the group re-forms from a checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from mosaic_ray.config import EngineConfig, LearnerConfig

pytestmark = pytest.mark.ray

ENGINE = EngineConfig(kind="hf", num_cpus=0.25, max_batch_size=16, max_wait_ms=5, request_deadline_s=3.0,
                      health_interval_s=0.5, hung_after_s=6.0)


def _pid(handle) -> int:
    import ray

    return ray.get(handle.health.remote(), timeout=60)["pid"]


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model_dir):
    import ray
    from mosaic_ray.actors.engines.actor import start_engine_actors

    handles = start_engine_actors(ENGINE, tiny_model_dir, num_engines=2)
    yield handles
    for h in handles:
        ray.kill(h, no_restart=True)


def _requests(n: int, max_new_tokens: int = 4):
    from mosaic_ray.actors.engines import GenerationRequest, SamplingParams

    return [GenerationRequest([5, 6, 7, 8 + i], SamplingParams(max_new_tokens=max_new_tokens, seed=i),
                              request_id=f"r{i}", session_id=f"s{i}") for i in range(n)]


def test_hung_engine_costs_a_deadline_not_the_run(engines):
    from mosaic_ray.actors.engines import EngineRouter

    router = EngineRouter(engines, request_deadline_s=ENGINE.request_deadline_s, retries=3)
    asyncio.run(router.generate_many(_requests(4)))  # both engines warm
    pid = _pid(engines[0])
    os.kill(pid, signal.SIGSTOP)  # alive, never answers
    try:
        t0 = time.monotonic()
        outs = asyncio.run(asyncio.wait_for(router.generate_many(_requests(8)), 60))
        took = time.monotonic() - t0
    finally:
        _resume(pid)
    assert [len(o.token_ids) for o in outs] == [4] * 8
    assert took < 3 * ENGINE.request_deadline_s, took  # one deadline, then the other engine answered
    assert router.stats["deadline_expired"] >= 1


@pytest.mark.slow
def test_dead_and_hung_engines_restart_with_the_current_weights(engines, tiny_model_dir):
    import ray
    from mosaic_ray.actors.engines import EngineRouter
    from mosaic_ray.actors.engines.supervisor import EngineSupervisor

    new_norm = torch.full((128,), 0.5)
    pushes: list[tuple[int, int]] = []

    def push(targets, version):
        ray.get([e.update_weights.remote({"model.norm.weight": new_norm}, version) for e in targets])
        pushes.append((len(targets), version))
        return {}

    sup = EngineSupervisor(engines, ENGINE, push)
    try:
        sup.push(3)
        assert ray.get([e.version.remote() for e in engines]) == [3, 3]
        router = EngineRouter(engines, request_deadline_s=ENGINE.request_deadline_s, retries=4)
        for how in ("kill", "hang"):
            pid = _pid(engines[1])
            os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            # requests meanwhile: served by the other engine, never by the base model of the restarted one
            outs = asyncio.run(asyncio.wait_for(router.generate_many(_requests(6)), 90))
            assert {o.policy_version for o in outs} == {3}
            deadline = time.monotonic() + 120
            while True:
                try:
                    health = ray.get(engines[1].health.remote(), timeout=5)
                    if health["pid"] != pid and health["serving"] and health["version"] == 3:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                assert time.monotonic() < deadline, f"engine not back with version 3 after {how}: {sup.counters}"
                time.sleep(0.5)
            _resume(pid)
        assert sup.counters["hung_engines_killed"] == 1 and sup.counters["engine_reloads"] >= 2
        assert (1, 3) in pushes  # the restarted engine alone was reloaded
        outs = asyncio.run(router.generate_many(_requests(6)))
        assert {o.policy_version for o in outs} == {3}
    finally:
        sup.stop()


@pytest.mark.slow
def test_a_push_stuck_on_a_hung_engine_never_blocks_its_kill_while_another_engine_waits_to_reload(engines):
    """Engine 0 dies and engine 1 hangs while a push is in flight: the push waits on the hung engine, engine 0's
    reload waits for the push, and only the health loop can break that by killing the hung engine."""
    import dataclasses
    import threading

    import ray
    from mosaic_ray.actors.engines.supervisor import EngineSupervisor

    cfg = dataclasses.replace(ENGINE, hung_after_s=20.0)  # engine 0 is back (and waiting to reload) well before
    new_norm = torch.full((128,), 0.25)

    def push(targets, version):
        ray.get([e.update_weights.remote({"model.norm.weight": new_norm}, version) for e in targets])
        return {}

    sup = EngineSupervisor(engines, cfg, push)
    sup.push(4)
    pids = [_pid(e) for e in engines]
    os.kill(pids[1], signal.SIGSTOP)
    try:
        pusher = threading.Thread(target=sup.push, args=(5,), daemon=True)
        pusher.start()  # engine 0 takes version 5 at once; the push then waits on engine 1
        deadline = time.monotonic() + 60
        while ray.get(engines[0].version.remote(), timeout=30) != 5:
            assert time.monotonic() < deadline, "engine 0 never took version 5"
            time.sleep(0.2)
        os.kill(pids[0], signal.SIGKILL)  # back in seconds, and its reload waits for the stuck push
        pusher.join(timeout=240)  # engine 1 stays stopped throughout: only its kill can end the push
        assert not pusher.is_alive(), f"the push never ended: {sup.counters}"
        assert sup.counters["hung_engines_killed"] == 1
        deadline = time.monotonic() + 120
        while True:
            try:
                healths = ray.get([e.health.remote() for e in engines], timeout=5)
                if all(h["serving"] and h["version"] == 5 for h in healths):
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, f"engines not back with version 5: {sup.counters}"
            time.sleep(0.5)
        assert [h["pid"] for h in healths] != pids
    finally:
        _resume(pids[1])
        sup.stop()

def _batch(n: int, seed: int):
    from mosaic_ray.algorithms.batch import PolicySample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 150, (12 + i % 3,), generator=g).tolist()
        mask = [0] * 6 + [1] * (len(ids) - 6)
        out.append(PolicySample(ids, mask, [-2.0 if m else 0.0 for m in mask], float(torch.randn((), generator=g)),
                                traj_id=f"t{i}"))
    return out


@pytest.mark.slow
def test_lost_learner_rank_fails_fast_and_the_group_reforms_from_a_checkpoint(tiny_model_dir, ray_session, tmp_path):
    import ray
    from mosaic_ray.learners.group import LearnerFailure, LearnerGroup

    cfg = LearnerConfig(num_learners=2, num_cpus=0.25, lr=1e-3, micro_batch_tokens=10_000)
    group = LearnerGroup(tiny_model_dir, cfg)
    try:
        group.update(_batch(4, 0))
        ckpt = str(tmp_path / "ckpt")
        group.save(ckpt)
        saved = group.get_weights()
        survivor = group._actors[0]
        # rank 1 dies in the middle of a step: rank 0 is left inside the gradient all-reduce
        os.kill(group.pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(LearnerFailure, match="rank 1 was lost during update"):
            group.update(_batch(4, 1))
        assert time.monotonic() - t0 < 60  # not the collective's 10-minute timeout
        with pytest.raises(ray.exceptions.RayActorError):  # the survivor was torn down too
            ray.get(survivor.address.remote(), timeout=30)
        group.reform(ckpt)
        assert group.reforms == 1
        restored = group.get_weights()
        assert all(torch.equal(restored[k], saved[k]) for k in saved)
        out = group.update(_batch(4, 1))  # the retried step runs on the new group
        assert torch.isfinite(torch.tensor(out["learner/loss"]))
        assert any(not torch.equal(group.get_weights()[k], saved[k]) for k in saved)
    finally:
        group.shutdown()
