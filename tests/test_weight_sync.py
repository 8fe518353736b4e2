"""Weight sync in buckets: the HF engine's drain → load → resume, and a training run with broadcast sync whose
engines hold the learner's policy (same version, identical log-probs) after every sync."""

from __future__ import annotations

import asyncio

import pytest
import torch
from mosaic_ray.actors.engines.base import GenerationRequest, SamplingParams, StaleWeightsError

from mosaic_ray.config import load_config
from mosaic_ray.driver.train import Trainer


def test_an_hf_engine_never_samples_a_half_loaded_version(tiny_model_dir):
    """Requests sent between begin and finish wait, then run on the new version; bad updates are refused whole."""
    from mosaic_ray.actors.engines.hf import HFEngine

    engine = HFEngine(tiny_model_dir, max_batch_size=4, max_wait_ms=1)
    weights = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    bumped = {n: t + 0.01 for n, t in weights.items()}
    names = list(bumped)
    req = GenerationRequest([5, 6, 7, 8], SamplingParams(temperature=0, max_new_tokens=4))

    async def main():
        meta = [(n, tuple(t.shape), "float32") for n, t in bumped.items()]
        with pytest.raises(ValueError, match="no such parameter"):
            await engine.begin_weight_update(1, [("model.nope.weight", (2,), "float32")])
        await engine.begin_weight_update(1, meta)
        waiting = asyncio.ensure_future(engine.generate([req]))
        await engine.load_weight_bucket({n: bumped[n] for n in names[: len(names) // 2]})
        await asyncio.sleep(0.2)
        assert not waiting.done() and engine.health()["loading"] == 1   # held while half loaded
        with pytest.raises(ValueError, match="shape"):
            await engine.load_weight_bucket({names[-1]: torch.zeros(3)})
        await engine.load_weight_bucket({n: bumped[n] for n in names[len(names) // 2:]})
        with pytest.raises(RuntimeError, match="update in progress is to version 1"):
            await engine.finish_weight_update(2)
        await engine.finish_weight_update(1)
        (done,) = await waiting
        assert done.policy_version == 1 and engine.version == 1
        with pytest.raises(StaleWeightsError):
            await engine.begin_weight_update(1)
        await engine.close()

    asyncio.run(main())
    assert all(torch.equal(p, bumped[n]) for n, p in engine.model.named_parameters())


SMOKE = ["warmstart.steps=4", "warmstart.num_demos=40", "warmstart.first_turn_steps=0", "train.iterations=2",
         "train.eval_size=4", "rollout.tasks_per_iteration=4", "protocol.max_steps=2", "protocol.max_new_tokens=16",
         "scenarios.train_size=100", "scenarios.test_size=40", "engine.num_engines=2",
         "learner.weight_sync=broadcast", "learner.sync_bucket_mb=1"]


class CheckedTrainer(Trainer):
    """The real driver; after each weight push it asks every engine for its version and the log-probs of one
    greedy completion, and the learner for the same tokens' log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks: list[dict] = []

    def sync(self, version, m=None):
        super().sync(version, m)
        if version:
            self.check_engines()

    def check_engines(self):
        import ray

        from mosaic_ray.algorithms.batch import PolicySample

        prompt = self.tokenizer("Send the report to Bob.", add_special_tokens=False)["input_ids"]
        req = GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
        outs = [ray.get(e.generate.remote([req]))[0] for e in self.engines]
        ids = prompt + outs[0].token_ids
        learner = self.learner.compute_logprobs([PolicySample(ids, [0] * len(prompt) + [1] * len(outs[0].token_ids),
                                                              [0.0] * len(ids), 0.0)])[0][len(prompt):]
        self.checks.append({
            "version": self.state.policy_version, "engine_versions": ray.get([e.version.remote() for e in self.engines]),
            "completion_versions": [o.policy_version for o in outs], "tokens": [o.token_ids for o in outs],
            "logprobs": [o.logprobs for o in outs], "learner": learner})


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_with_broadcast_sync_keeps_every_engine_on_the_learners_policy(ray_session, tmp_path):
    cfg = load_config("smoke", SMOKE)
    trainer = CheckedTrainer(cfg, str(tmp_path / "run"), progress=False)
    trainer.run()
    assert "weight_sync: broadcast" in (tmp_path / "run" / "config.yaml").read_text()
    assert [c["version"] for c in trainer.checks] == [1, 2, 3]   # the warm start, then one per iteration
    for c in trainer.checks:
        assert c["engine_versions"] == [c["version"]] * 2 == c["completion_versions"]
        assert c["tokens"][0] == c["tokens"][1] and c["logprobs"][0] == c["logprobs"][1]   # identical engines
        assert max(abs(a - b) for a, b in zip(c["logprobs"][0], c["learner"])) < 1e-4   # == the learner's policy
    assert trainer.checks[0]["logprobs"][0] != trainer.checks[-1]["logprobs"][0]   # the policy did change


@pytest.mark.ray
def test_object_store_sync_streams_buckets_and_engines_match_the_learner(ray_session, tiny_model_dir):
    """The driver's object-store push (in-process learner → 2 HF engine actors, 1 MiB buckets, each a zero-copy
    flat buffer): every engine ends on the version with the learner's log-probs; a stale version is refused."""
    import ray
    from mosaic_ray.actors.engines.actor import start_engine_actors
    from mosaic_ray.learners import LearnerGroup
    from test_learner import random_batch

    from mosaic_ray.algorithms.batch import PolicySample
    from mosaic_ray.config import EngineConfig, LearnerConfig
    from mosaic_ray.driver.weight_sync import ObjectStoreSync

    lg = LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=0, lr=1e-2))
    lg.update(random_batch(4, seed=3))
    engines = start_engine_actors(EngineConfig(num_engines=2, num_cpus=0), tiny_model_dir)
    try:
        sync = ObjectStoreSync(lg, 1 << 20)
        out = sync.push(engines, 1)
        assert out["weight_sync/buckets"] > 2 and out["weight_sync/largest_bucket_bytes"] <= 1 << 20
        assert out["weight_sync/bytes"] == sum(t.numel() * t.element_size() for t in lg.get_weights().values())
        assert ray.get([e.version.remote() for e in engines]) == [1, 1]
        req = GenerationRequest([5, 6, 7, 8], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
        outs = [ray.get(e.generate.remote([req]))[0] for e in engines]
        ids = req.prompt_ids + outs[0].token_ids
        mine = lg.compute_logprobs([PolicySample(ids, [0] * 4 + [1] * 6, [0.0] * len(ids), 0.0)])[0][4:]
        assert outs[0].logprobs == outs[1].logprobs and outs[0].policy_version == 1
        assert max(abs(a - b) for a, b in zip(outs[0].logprobs, mine)) < 1e-4
        with pytest.raises(StaleWeightsError):
            ray.get(engines[0].begin_weight_update.remote(1))
    finally:
        for e in engines:
            ray.kill(e)
