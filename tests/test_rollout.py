"""The Ray-free episode runner: token bookkeeping, limits and per-episode failures (mosaic_ray.rollout)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mosaic_ray import protocol
from mosaic_ray.config import ProtocolConfig
from mosaic_ray.policies.scripted import get_scripted, render
from mosaic_ray.rollout import (
    EpisodeSpec,
    ScriptedCompletion,
    episode_specs,
    failed_record,
    load_tokenizer,
    run_episode,
    run_episodes,
    scripted_factory,
)
from mosaic_ray.scenarios import load_tasks
from mosaic_ray.schema import from_arrow, to_arrow


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("train", size=24)


def segments(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of a 0/1 mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


@pytest.mark.parametrize("policy", ["naive", "safe", "random"])
def test_scripted_records_are_token_exact(tok, tasks, policy):
    specs = episode_specs(tasks, group_size=2, run_id="r", iteration=3, policy_version=7)
    recs = asyncio.run(run_episodes(specs, scripted_factory(policy, tok), tok, concurrency=8))
    assert [r.traj_id for r in recs] == [s.traj_id for s in specs] == [f"r/3/{s.task.task_id}/{s.sample_idx}"
                                                                          for s in specs]
    back = from_arrow(to_arrow(recs))  # validates ids, lengths, mask values, nulls
    assert [r.traj_id for r in back] == [r.traj_id for r in recs]
    plan = get_scripted(policy)
    for rec, spec in zip(recs, specs):
        assert rec.error is None and rec.outcome.terminal in ("answered", "refused", "max_steps")
        assert rec.policy_version == 7 and rec.prompt_ids[-3:] == tok.encode("<|im_start|>assistant\n",
                                                                              add_special_tokens=False)[-3:]
        texts = [render(t) for t in plan.plan(spec.task)] + [render(("end", None, None, None, "Done."))]
        runs = segments(rec.loss_mask)
        gen = [(s, e) for m, s, e in runs if m == 1]
        assert len(gen) == len(rec.steps) == rec.outcome.num_steps
        for i, (s, e) in enumerate(gen):
            ids = rec.completion_ids[s:e]
            if ids[-1] == tok.eos_token_id:  # whole turn: exactly the scripted text, then eos
                assert protocol.assistant_text(tok, ids) == texts[i]
            else:  # cut at max_new_tokens: a prefix of it
                assert e - s == ProtocolConfig().max_new_tokens and texts[i].startswith(
                    protocol.assistant_text(tok, ids))
        for m, s, e in runs:
            if m == 0:  # observation: [eos if the turn was cut] + the template's tool turn + next header
                step = rec.steps[sum(1 for _, ge in gen if ge <= s) - 1]
                cut = rec.completion_ids[s - 1] != tok.eos_token_id
                want = ([tok.eos_token_id] if cut else []) + protocol.observation_ids(
                    tok, [{"role": "tool", "name": step.tool if step.action_kind == "tool_call" else "format_error",
                          "content": step.observation}])
                assert rec.completion_ids[s:e] == want
                assert all(lp == 0.0 for lp in rec.behavior_logprobs[s:e])


def test_episode_token_budget_is_exact(tok, tasks):
    budget = 420
    cfg = ProtocolConfig(max_episode_tokens=budget, max_steps=50)
    benign = [t for t in tasks if t.category == "benign"]
    specs = episode_specs(benign, group_size=1, run_id="r", iteration=0)
    recs = asyncio.run(run_episodes(specs, scripted_factory("random", tok), tok, protocol_cfg=cfg))
    cut = [r for r in recs if r.outcome.terminal == "max_tokens"]
    assert cut, "expected some episodes to hit a 420-token budget"
    for r in recs:
        assert len(r.prompt_ids) + len(r.completion_ids) <= budget


def test_turn_cut_by_max_new_tokens_gets_masked_eos(tok, tasks):
    cfg = ProtocolConfig(max_new_tokens=8, max_steps=2)
    rec = asyncio.run(run_episode(EpisodeSpec(tasks[0], "r", 0, 0), scripted_factory("naive", tok)(
        EpisodeSpec(tasks[0], "r", 0, 0)), tok, protocol_cfg=cfg))
    assert rec.error is None and rec.outcome.terminal == "max_steps"
    first_obs = rec.loss_mask.index(0)
    assert first_obs == 8 and rec.completion_ids[first_obs] == tok.eos_token_id


def test_policy_and_sandbox_errors_fail_only_their_episode(tok, tasks):
    benign = next(t for t in tasks if t.category == "benign" and t.ground_truth())
    broken = dataclasses.replace(benign, task_id="broken-world", world=["not", "a", "dict"])
    good = scripted_factory("safe", tok)

    async def engine_down(request):
        raise ConnectionError("engine down")

    async def bad_lengths(request):
        return ScriptedCompletion([tok.eos_token_id], [], "stop", 0)

    def policy_for(spec):
        return {"engine": engine_down, "lengths": bad_lengths}.get(spec.run_id, good(spec))

    specs = [EpisodeSpec(benign, "engine", 0, 0), EpisodeSpec(benign, "lengths", 0, 0),
             EpisodeSpec(broken, "sandbox", 0, 0), EpisodeSpec(benign, "ok", 0, 0)]
    recs = asyncio.run(run_episodes(specs, policy_for, tok))
    errors = [r.error for r in recs]
    assert errors[0] == "ConnectionError: engine down"
    assert errors[1].startswith("ValueError: turn 0: policy returned 1 token ids but 0 logprobs")
    assert errors[2] is not None  # the world state is not a dict: building the sandbox fails
    assert errors[3] is None and recs[3].outcome.benign_success
    for r in recs[:3]:
        assert r.outcome.terminal == "error" and r.outcome.error == r.error
    to_arrow(recs)  # failed records are still valid records
    assert recs[2].steps == [] and recs[2].prompt_ids == []  # failed before rendering anything


def test_failed_record_is_valid(tasks):
    rec = failed_record(EpisodeSpec(tasks[0], "r", 1, 2), "gave up")
    assert rec.traj_id == f"r/1/{tasks[0].task_id}/2" and rec.outcome.terminal == "error"
    to_arrow([rec])
