"""HF engine: logprob parity with a teacher-forced forward pass, greedy/seeded determinism, dynamic batching,
weight updates, pause/abort, request validation. In-process (no Ray); the tiny Qwen3 model in fp32."""

from __future__ import annotations

import asyncio

import pytest
import torch
from mosaic_ray.actors.engines import GenerationRequest, PauseMode, SamplingParams, StaleWeightsError, make_engine
from mosaic_ray.actors.engines.hf import HFEngine

from mosaic_ray.config import EngineConfig

TEXTS = ["Pay my landlord 900 to AC123.", "Send a threatening email to Bob.", "hi", "<think>plan</think>",
         "Please summarise the last three emails in my inbox and forward them to Alice.", "ok then"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=20)


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(t) for t in TEXTS]


def teacher_forced(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[t] | prompt + completion[:t]) from one full forward pass, no cache."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    target = torch.tensor(completion)[:, None]
    return logits.gather(-1, target).squeeze(-1) - logits.logsumexp(-1)


def run(coro):
    return asyncio.run(coro)


def test_logprobs_match_teacher_forcing_batched_and_unbatched(engine, prompts):
    samplings = [SamplingParams(max_new_tokens=24, seed=i, temperature=[1.0, 0.7, 1.3][i % 3],
                                top_p=[1.0, 0.9][i % 2]) for i in range(len(prompts))]
    reqs = [GenerationRequest(p, s, request_id=str(i)) for i, (p, s) in enumerate(zip(prompts, samplings))]
    batched = run(engine.generate(reqs))
    unbatched = [run(engine.generate([r]))[0] for r in reqs]
    for out in batched + unbatched:
        assert out.token_ids and len(out.logprobs) == len(out.token_ids)
        ref = teacher_forced(engine.model, prompts[int(out.request_id)], out.token_ids)
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4), (out.request_id, out.logprobs, ref)
    # same seed → same tokens, whether the request shared its batch with five others or ran alone
    assert [b.token_ids for b in batched] == [u.token_ids for u in unbatched]
    assert [b.request_id for b in batched] == [r.request_id for r in reqs]


def test_greedy_is_argmax_and_deterministic(engine, prompts):
    reqs = [GenerationRequest(p, SamplingParams(temperature=0, max_new_tokens=16)) for p in prompts[:3]]
    first, second = run(engine.generate(reqs)), run(engine.generate(reqs[::-1]))[::-1]
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    for p, out in zip(prompts, first):
        ids = torch.tensor([p + out.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == out.token_ids


def test_seeded_sampling_independent_of_batch_composition(engine, prompts):
    target = GenerationRequest(prompts[0], SamplingParams(max_new_tokens=20, seed=1234))
    alone = run(engine.generate([target]))[0]
    others = [GenerationRequest(p, SamplingParams(max_new_tokens=5 + 7 * i, seed=None)) for i, p in enumerate(prompts)]
    crowded = run(engine.generate(others[:3] + [target] + others[3:]))[3]
    assert crowded.token_ids == alone.token_ids
    other_seed = run(engine.generate([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=20, seed=99))]))[0]
    assert other_seed.token_ids != alone.token_ids  # the seed matters (20 tokens from a near-uniform model)


def test_concurrent_calls_are_batched(engine, prompts):
    before = engine.health()

    async def many():
        calls = [engine.generate([GenerationRequest(prompts[i % len(prompts)], SamplingParams(max_new_tokens=8),
                                                    request_id=f"c{i}")]) for i in range(12)]
        return await asyncio.gather(*calls)

    outs = run(many())
    after = engine.health()
    assert [o[0].request_id for o in outs] == [f"c{i}" for i in range(12)]
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12  # several calls shared a batch
    assert after["max_batch_rows"] > 1


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "no-merge-fallback"])
def test_staggered_arrivals_join_the_running_batch_exactly(tiny_model_dir, prompts, continuous):
    """Requests arriving while others decode join the running batch (continuous batching), and each completion
    equals the same seeded request run alone: tokens identical, log-probs within 1e-5. The fallback for caches
    that cannot be merged (sliding-window layers) makes newcomers wait for the running batch instead."""
    engine = HFEngine(tiny_model_dir, max_batch_size=8, max_wait_ms=0)
    assert engine.continuous  # the tiny Qwen3 has full-attention DynamicLayers only
    engine.continuous = continuous
    samplings = [SamplingParams(max_new_tokens=[40, 12, 30, 25, 8, 33][i], seed=100 + i, temperature=[1.0, 0.8][i % 2],
                                top_p=[1.0, 0.9, 1.0][i % 3], stop_token_ids=(7,) if i == 3 else ())
                 for i in range(len(prompts))]
    reqs = [GenerationRequest(p, s, request_id=str(i)) for i, (p, s) in enumerate(zip(prompts, samplings))]
    alone = [run(engine.generate([r]))[0] for r in reqs]

    async def staggered():
        async def late(i, delay):
            await asyncio.sleep(delay)
            return (await engine.generate([reqs[i]]))[0]

        first = asyncio.ensure_future(late(0, 0))
        while engine.health()["running"] == 0:  # request 0 is decoding before anyone else arrives
            await asyncio.sleep(0.001)
        return [await first] + list(await asyncio.gather(*(late(i, 0.004 * i) for i in range(1, len(reqs)))))

    before = engine.health()
    together = run(staggered())
    after = engine.health()
    joined = after["joined_running"] - before["joined_running"]
    assert joined >= 1 if continuous else joined == 0  # someone joined a batch mid-decode (or, fallback, no one)
    assert after["max_batch_rows"] > 1
    for a, b in zip(alone, together):
        assert b.request_id == a.request_id and b.finish_reason == a.finish_reason
        assert b.token_ids == a.token_ids, b.request_id
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0), b.request_id
        ref = teacher_forced(engine.model, prompts[int(b.request_id)], b.token_ids)
        assert torch.allclose(torch.tensor(b.logprobs), ref, atol=1e-4)


def test_weight_update_drains_running_rows_before_loading(tiny_model_dir, prompts):
    """A weight update requested mid-decode waits for the running completion (old version, old weights
    throughout); requests queued meanwhile run on the new weights and are stamped with the new version."""
    from transformers import AutoModelForCausalLM

    engine = HFEngine(tiny_model_dir, max_batch_size=8, max_wait_ms=0)
    norm = engine.model.model.norm.weight.detach().clone()
    ref_new = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref_new.model.norm.weight.mul_(3)

    async def scenario():
        running = asyncio.ensure_future(engine.generate([GenerationRequest(prompts[0], SamplingParams(
            max_new_tokens=300, ignore_eos=True, seed=1))]))
        while engine.health()["running"] == 0:
            await asyncio.sleep(0.001)
        update = asyncio.ensure_future(asyncio.to_thread(engine.update_weights, {"model.norm.weight": norm * 3}, 1))
        await asyncio.sleep(0.02)
        later = asyncio.ensure_future(engine.generate([GenerationRequest(prompts[1], SamplingParams(
            max_new_tokens=6, seed=2))]))
        await asyncio.sleep(0.02)
        assert not later.done()  # admission is stopped while the update waits for the drain
        return (await running)[0], await update, (await later)[0]

    old, _, new = run(scenario())
    assert old.policy_version == 0 and len(old.token_ids) == 300 and new.policy_version == 1
    old_ref = teacher_forced(engine_ref_model(tiny_model_dir), prompts[0], old.token_ids)
    assert torch.allclose(torch.tensor(old.logprobs), old_ref, atol=1e-4)  # old weights to the last token
    assert torch.allclose(torch.tensor(new.logprobs), teacher_forced(ref_new, prompts[1], new.token_ids), atol=1e-4)


def test_stop_tokens_length_and_eos(engine, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    free = run(engine.generate([GenerationRequest(prompts[1], greedy)]))[0]
    assert free.finish_reason in ("length", "stop") and len(free.token_ids) <= 12
    stop_at = free.token_ids[3]
    cut = run(engine.generate([GenerationRequest(prompts[1], SamplingParams(temperature=0, max_new_tokens=12,
                                                                               stop_token_ids=(stop_at,)))]))[0]
    k = free.token_ids.index(stop_at)
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:k + 1]  # stop token included
    short = run(engine.generate([GenerationRequest(prompts[1], SamplingParams(max_new_tokens=3, seed=0))]))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_bad_requests_fail_alone(engine, prompts):
    with pytest.raises(ValueError, match="prompt_ids: empty prompt"):
        run(engine.generate([GenerationRequest([], request_id="x")]))
    with pytest.raises(ValueError, match="out of the vocabulary"):
        run(engine.generate([GenerationRequest([engine.vocab_size + 5])]))
    with pytest.raises(ValueError, match="leave no room"):
        run(engine.generate([GenerationRequest([1] * engine.max_model_len)]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    ok = run(engine.generate([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=2))]))
    assert len(ok[0].token_ids) == 2  # the engine still serves


def test_update_weights_changes_outputs_and_rejects_stale(tiny_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    engine = HFEngine(tiny_model_dir, max_batch_size=8, max_wait_ms=1)
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=16, seed=7), request_id=str(i))
            for i, p in enumerate(prompts[:4])]
    old = run(engine.generate(reqs))
    assert {o.policy_version for o in old} == {0}

    new_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    weights = dict(new_model.state_dict())  # plain HF names, tied lm_head included
    engine.update_weights(weights, version=1)
    assert engine.version == 1
    new = run(engine.generate(reqs))
    assert {o.policy_version for o in new} == {1}
    assert any(a.token_ids != b.token_ids for a, b in zip(old, new))
    for i, out in enumerate(new):  # log-probs follow the new weights exactly, not the old ones
        assert torch.allclose(torch.tensor(out.logprobs), teacher_forced(new_model, prompts[i], out.token_ids),
                              atol=1e-4)
        stale_ref = teacher_forced(engine_ref_model(tiny_model_dir), prompts[i], out.token_ids)
        assert not torch.allclose(torch.tensor(out.logprobs), stale_ref, atol=1e-2)

    with pytest.raises(StaleWeightsError, match="not newer"):
        engine.update_weights(weights, version=1)
    with pytest.raises(StaleWeightsError):
        engine.update_weights(weights, version=0)
    before = engine.model.model.norm.weight.clone()
    with pytest.raises(ValueError, match="no such parameter"):
        engine.update_weights([("model.norm.weight", before + 1), ("not.a.param", before)], version=2)
    assert torch.equal(engine.model.model.norm.weight, before) and engine.version == 1  # nothing loaded
    engine.update_weights([("model.norm.weight", before * 2)], version=5)  # a subset is fine; versions may skip
    assert engine.version == 5 and torch.equal(engine.model.model.norm.weight, before * 2)


_REF = {}


def engine_ref_model(path):
    from transformers import AutoModelForCausalLM

    if path not in _REF:
        _REF[path] = AutoModelForCausalLM.from_pretrained(path)
    return _REF[path]


def test_pause_abort_and_resume(tiny_model_dir, prompts):
    engine = HFEngine(tiny_model_dir, max_batch_size=4, max_wait_ms=1)

    async def scenario():
        long = asyncio.ensure_future(engine.generate([GenerationRequest(prompts[0], SamplingParams(
            max_new_tokens=1500, seed=0))]))
        while engine.health()["running"] == 0:
            await asyncio.sleep(0.005)
        await engine.pause(PauseMode.ABORT)
        aborted = (await long)[0]
        queued = asyncio.ensure_future(engine.generate([GenerationRequest(prompts[1], SamplingParams(
            max_new_tokens=4, seed=0))]))
        await asyncio.sleep(0.1)
        assert not queued.done() and engine.health()["paused"]  # waits while paused
        await engine.resume()
        return aborted, (await queued)[0]

    aborted, later = run(scenario())
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 1500
    assert torch.allclose(torch.tensor(aborted.logprobs),
                          teacher_forced(engine.model, prompts[0], aborted.token_ids), atol=1e-4)
    assert later.finish_reason == "length" and len(later.token_ids) == 4


def test_make_engine_kinds(tiny_model_dir):
    assert isinstance(make_engine(EngineConfig(kind="hf", max_batch_size=4), tiny_model_dir), HFEngine)
    with pytest.raises(ValueError, match="engine.base_url"):
        make_engine(EngineConfig(kind="openai"), None)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'mosaic-ray\[vllm\]'"):
            make_engine(EngineConfig(kind="vllm"), tiny_model_dir)


def _next_prompts(engine: HFEngine, prompts: list[list[int]], results: list, tool_text: str) -> list[list[int]]:
    """Each session's next prompt: its last prompt + the model's output + a tool result."""
    tool = engine.tokenizer.encode(tool_text)
    return [p + out.token_ids + tool for p, out in zip(prompts, results)]


def test_prefix_reuse_across_turns_keeps_logprobs_of_a_full_recompute(tiny_model_dir, prompts):
    reusing = HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=20)
    full = HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=20, prefix_cache_mb=0)
    assert reusing.prefixes is not None and full.prefixes is None
    sessions = [f"ep-{i}" for i in range(len(prompts))]
    current = list(prompts)
    for turn in range(3):
        # sessions 0-3 go on; from the second turn on a fresh session (no cache) shares each batch with them
        active = list(range(4)) + ([4] if turn else [])
        reqs = [GenerationRequest(current[i], SamplingParams(max_new_tokens=12, seed=10 * turn + i),
                                  request_id=str(i), session_id=sessions[i] if i < 4 else f"new-{turn}")
                for i in active]
        if turn:
            reqs[-1] = GenerationRequest(prompts[5], reqs[-1].sampling, request_id="5", session_id=f"new-{turn}")
        hits_before = reusing.health()["prefix_hits"]
        got, ref = run(reusing.generate(reqs)), run(full.generate(reqs))
        for r, a, b in zip(reqs, got, ref):
            assert a.token_ids == b.token_ids, (turn, r.request_id)
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0), \
                (turn, r.request_id, a.logprobs, b.logprobs)
            tf = teacher_forced(reusing.model, r.prompt_ids, a.token_ids)
            assert torch.allclose(torch.tensor(a.logprobs), tf, atol=1e-5, rtol=0), (turn, r.request_id)
        if turn:  # every continuing session reused its previous turn; the fresh one could not
            assert reusing.health()["prefix_hits"] - hits_before == 4
        current[:4] = _next_prompts(reusing, current[:4], got[:4], f" tool: ok, {turn + 41} rows.")
    h, f = reusing.health(), full.health()
    assert h["prompt_tokens"] == f["prompt_tokens"] and f["reused_tokens"] == 0
    assert h["reused_tokens"] > 0 and h["prefill_tokens"] == h["prompt_tokens"] - h["reused_tokens"]
    assert h["prefill_tokens"] < f["prefill_tokens"]
    run(reusing.close())
    run(full.close())


def test_a_weight_update_drops_every_cached_prefix(tiny_model_dir, prompts):
    engine = HFEngine(tiny_model_dir, max_batch_size=4, max_wait_ms=5)
    req = GenerationRequest(prompts[4], SamplingParams(max_new_tokens=8, seed=1), session_id="ep")
    first = run(engine.generate([req]))[0]
    assert engine.health()["prefix_cache_sessions"] == 1
    norm = engine.model.model.norm.weight.detach().clone()
    engine.update_weights({"model.norm.weight": norm * 2}, 1)
    assert engine.health()["prefix_cache_sessions"] == 0
    nxt = GenerationRequest(prompts[4] + first.token_ids + [7, 8], SamplingParams(max_new_tokens=8, seed=2),
                            session_id="ep")
    out = run(engine.generate([nxt]))[0]
    assert engine.health()["prefix_hits"] == 0 and out.policy_version == 1
    assert torch.allclose(torch.tensor(out.logprobs), teacher_forced(engine.model, nxt.prompt_ids, out.token_ids),
                          atol=1e-5, rtol=0)
    run(engine.close())


def test_prefix_cache_finds_the_longest_common_prefix_across_sessions_within_its_byte_budget():
    from mosaic_ray.actors.engines.hf import PrefixCache, _Prefix

    def entry(tokens, version=0):
        kv = [torch.zeros(2, len(tokens), 4)]  # 2 heads × len × 4 floats, keys and values: 64 bytes per token
        return _Prefix(list(tokens), kv, [t.clone() for t in kv], version)

    system = list(range(100, 140))  # a 40-token "system prompt": two whole index blocks and a bit
    cache = PrefixCache(budget_bytes=64 * 100)
    cache.put("session:a", entry(system + [1, 2, 3]))
    got, n = cache.lookup("session:a", system + [1, 2, 9, 9], version=0)
    assert n == 42 and got.tokens[:3] == system[:3]
    assert cache.lookup("session:a", system + [1, 2, 3], version=0)[1] == 42  # the last prompt token is fed
    # another session, same system prompt: found through the block index
    assert cache.lookup("session:b", system + [7], version=0)[1] == 40
    assert cache.lookup("session:b", [5] + system, version=0) == (None, 0)
    # stale weights: never reused, and dropped
    assert cache.lookup("session:a", system + [1], version=1) == (None, 0) and len(cache) == 0
    cache.put("session:a", entry(system))
    cache.put("session:b", entry(list(range(40))))
    cache.put("session:c", entry(list(range(200, 240))))  # over budget (120 tokens > 100): the oldest goes
    assert len(cache) == 2 and cache.nbytes == 64 * 80 and cache.lookup("session:x", system + [1], 0) == (None, 0)
    cache.put("session:big", entry(range(101)))  # larger than the budget: not kept, nothing evicted for it
    assert len(cache) == 2
    cache.put("session:b", entry(list(range(10))))  # a session's new turn replaces its old entry
    assert len(cache) == 2 and cache.lookup("session:y", list(range(40)), 0)[1] == 0


def test_a_burst_sharing_its_prompt_start_prefills_it_once_with_full_recompute_logprobs(tiny_model_dir, prompts):
    sharing = HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=20)
    full = HFEngine(tiny_model_dir, max_batch_size=16, max_wait_ms=20, prefix_cache_mb=0)
    system = prompts[4] * 3  # a long common start, as a system prompt is
    starts = [system + p for p in prompts[:3]] * 2 + [prompts[5]]  # a task's samples, other tasks, a stranger
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=10, seed=i), request_id=str(i), session_id=f"s{i}")
            for i, p in enumerate(starts)]
    got, ref = run(sharing.generate(reqs)), run(full.generate(reqs))
    for r, a, b in zip(reqs, got, ref):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(a.logprobs), teacher_forced(sharing.model, r.prompt_ids, a.token_ids),
                              atol=1e-5, rtol=0)
    h = sharing.health()
    assert h["prefix_hits"] == 6 and h["reused_tokens"] >= 6 * len(system)  # all but the stranger
    assert h["prefill_tokens"] < full.health()["prefill_tokens"]
    run(sharing.close())
    run(full.close())
