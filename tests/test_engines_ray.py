"""Engine actors behind the router on the session Ray cluster: 64 concurrent episodes, sticky sessions,
weight updates by ObjectRef and by broadcast, add/remove and a dead engine while serving."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest
import torch
from mosaic_ray.actors.engines import EngineRouter, GenerationRequest, SamplingParams, StaleWeightsError

from mosaic_ray.config import EngineConfig

pytestmark = pytest.mark.ray

CFG = EngineConfig(kind="hf", num_cpus=0.5, max_batch_size=32, max_wait_ms=10)


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model_dir):
    import ray
    from mosaic_ray.actors.engines.actor import start_engine_actors

    handles = start_engine_actors(CFG, tiny_model_dir, num_engines=2)
    yield handles
    for h in handles:
        ray.kill(h)


def _episode_requests(tok, n_episodes: int) -> list[list[int]]:
    return [tok.encode(f"Episode {i}: pay my landlord {100 + i} to AC123.") for i in range(n_episodes)]


def test_router_serves_64_concurrent_episodes(engines, tiny_model_dir):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    router = EngineRouter(engines)
    starts = _episode_requests(tok, 64)
    seen_engine: dict[str, set] = {}

    async def episode(i: int):
        prompt, outs = list(starts[i]), []
        for turn in range(3):  # a multi-turn episode: each turn's prompt extends the last
            sid = f"ep{i}"
            seen_engine.setdefault(sid, set()).add(router.pick(sid))
            out = await router.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=6, seed=i * 10 + turn),
                                                          request_id=f"{i}/{turn}", session_id=sid))
            outs.append((list(prompt), out))
            prompt = prompt + out.token_ids + tok.encode(" ok.")
        return outs

    async def main():
        return await asyncio.gather(*(episode(i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(len(r) == 3 for r in results)
    assert all(len(engs) == 1 for engs in seen_engine.values())  # sticky: an episode stays on one engine
    assert {e for engs in seen_engine.values() for e in engs} == set(engines)  # both engines served
    healths = ray.get([h.health.remote() for h in engines])
    assert sum(h["requests"] for h in healths) >= 64 * 3
    assert max(h["max_batch_rows"] for h in healths) > 1  # concurrent episodes were batched
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for prompt, out in [results[0][2], results[37][1]]:  # spot-check log-probs from the actors
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]
        ref = logits.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1) - logits.logsumexp(-1)
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4)
    clone = pickle.loads(pickle.dumps(router))  # picklable: handles survive, live state is fresh
    assert clone.engines == router.engines and clone.outstanding() == [0, 0]


def test_weight_update_by_object_ref_and_stale_rejected(engines, tiny_model_dir):
    import ray
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    base = ray.get(engines[0].version.remote())
    ref = ray.put({"model.norm.weight": model.model.norm.weight.detach().clone()})
    assert ray.get([h.update_weights.remote(ref, base + 1) for h in engines]) == [base + 1] * 2
    with pytest.raises(StaleWeightsError):
        ray.get(engines[1].update_weights.remote(ref, base + 1))
    router = EngineRouter(engines)
    prompt = [5, 6, 7, 8]
    out = asyncio.run(router.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=5, seed=3))))
    assert out.policy_version == base + 1
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expect = logits.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1) - logits.logsumexp(-1)
    assert torch.allclose(torch.tensor(out.logprobs), expect, atol=1e-4)


def test_weight_broadcast_group(engines, tiny_model_dir):
    import ray

    from mosaic_ray.hygiene import free_port
    from mosaic_ray.weight_transfer import WeightGroup, send_weights

    port = free_port()
    world = 1 + len(engines)
    joins = [h.init_weight_group.remote("127.0.0.1", port, world, rank) for rank, h in enumerate(engines, start=1)]
    sender = WeightGroup.create("127.0.0.1", port, 0, world)
    ray.get(joins)
    version = max(ray.get([h.version.remote() for h in engines])) + 1
    new_norm = torch.full((128,), 0.5)
    receives = [h.receive_weights.remote(version) for h in engines]
    sent = threading.Thread(target=send_weights, args=(sender, {"model.norm.weight": new_norm}))
    sent.start()
    assert ray.get(receives) == [version] * len(engines)
    sent.join()
    prompt = [5, 6, 7, 8]
    outs = asyncio.run(EngineRouter(engines).generate_many(
        [GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=4))] * 2))
    assert {o.policy_version for o in outs} == {version}


def test_add_and_remove_engines_while_serving(engines, tiny_model_dir):
    """Runs last: it kills engines[1] at the end to check the dead-engine path."""
    import ray
    from mosaic_ray.actors.engines.hf import HFEngine

    local = HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=5)  # an in-process engine joins the router too
    router = EngineRouter(engines[:1])
    removed = engines[0]

    async def main():
        first_wave = [asyncio.ensure_future(router.generate(GenerationRequest(
            [5, 6, 7, i + 10], SamplingParams(max_new_tokens=40, seed=i), session_id=f"s{i}"))) for i in range(16)]
        await asyncio.sleep(0.05)
        assert router.outstanding()[0] > 0  # requests are in flight on the engine we remove next
        router.add_engine(engines[1])
        router.add_engine(local)
        router.remove_engine(removed)
        assert removed not in router.engines
        second_wave = [router.generate(GenerationRequest([5, 6, 7, i + 10], SamplingParams(max_new_tokens=4, seed=i),
                                                         session_id=f"s{i}")) for i in range(16)]
        picks = {router.pick(f"s{i}") for i in range(16)}
        return await asyncio.gather(*first_wave), await asyncio.gather(*second_wave), picks

    before = ray.get(removed.health.remote())["requests"]
    first, second, picks = asyncio.run(main())
    assert all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in first)  # in-flight ones finished
    assert all(len(o.token_ids) == 4 for o in second)
    assert removed not in picks and picks == {engines[1], local}  # its sessions moved elsewhere
    assert ray.get(removed.health.remote())["requests"] - before == 16  # only the first wave reached it
    assert local.health()["requests"] > 0

    # Requests to an engine actor that died are retried on another engine; the dead one cools down (engine actors
    # restart in place, so the router keeps the handle).
    ray.kill(engines[1])
    outs = asyncio.run(router.generate_many([GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=3, seed=i))
                                             for i in range(4)]))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert router.stats["engine_failures"] >= 1 and router.stats["retried"] >= 1
    assert {router.pick() for _ in range(4)} == {local}  # cooling down: nothing goes to it for now
