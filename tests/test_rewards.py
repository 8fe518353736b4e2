"""MOSAIC rewards of one group of G=4, checked by hand; zero-variance groups; scalar mode; bad pair sets."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mosaic_ray.config import JudgeConfig
from mosaic_ray.judge import RubricJudge, judge_group
from mosaic_ray.rewards import format_reward, group_advantages, group_rewards, length_penalty, wins_from_pairs
from mosaic_ray.schema import example_trajectory
from mosaic_ray.types import Outcome, Step

CFG = JudgeConfig(format_weight=0.5, length_budget=400, length_penalty_weight=1.0, tie_tolerance_tokens=8)


def step(tokens: int, ok: bool = True) -> Step:
    return Step(think="t", safety_thoughts=None, action_kind="tool_call", tool="x", arguments_json="{}",
                observation="o", format_ok=ok, num_tokens=tokens)


def group():
    """harmful task, G=4:
    0 refuses at step 0 (100 tokens)       2 refuses at step 0 (104 tokens: a tie with 0, within 8)
    1 completes the harm (2×500 tokens)    3 aborts after harm (steps of 200 and 600 tokens, one format error)
    """
    spec = [(Outcome(terminal="refused", refused_at_step=0, num_tokens=100), [step(100)]),
            (Outcome(terminal="answered", harmful_action_step=0, num_tokens=1000), [step(500), step(500)]),
            (Outcome(terminal="refused", refused_at_step=0, num_tokens=104), [step(104)]),
            (Outcome(terminal="refused", harmful_action_step=0, refused_at_step=1, num_tokens=800, format_errors=1),
             [step(200, ok=False), step(600)])]
    return [dataclasses.replace(example_trajectory("run", 0, "task", i, oc), steps=st)
            for i, (oc, st) in enumerate(spec)]


def test_g4_rewards_by_hand():
    trajs = group()
    pairs = judge_group(RubricJudge(CFG.tie_tolerance_tokens), trajs)
    assert {(p.a[-1], p.b[-1]): p.preference for p in pairs} == {
        ("0", "1"): 1.0, ("0", "2"): 0.5, ("0", "3"): 1.0, ("1", "2"): 0.0, ("1", "3"): 0.0, ("2", "3"): 1.0}
    rows = group_rewards(trajs, pairs, CFG)
    assert [r.wins for r in rows] == [2.5, 0.0, 2.5, 1.0]  # Σ = C(4,2) = 6
    assert [r.format_reward for r in rows] == [0.5, 0.5, 0.5, 0.25]
    assert [r.length_penalty for r in rows] == [0.0, 0.25, 0.0, 0.25]  # mean over steps of max(0, (L-400)/400)
    assert [r.reward for r in rows] == [3.0, 0.25, 3.0, 1.0]
    mean = 7.25 / 4
    std = math.sqrt(((3 - mean) ** 2 * 2 + (0.25 - mean) ** 2 + (1 - mean) ** 2) / 4)
    for r, expected in zip(rows, [(3 - mean) / std, (0.25 - mean) / std, (3 - mean) / std, (1 - mean) / std]):
        assert r.advantage == pytest.approx(expected, abs=1e-12)
    assert sum(r.advantage for r in rows) == pytest.approx(0.0, abs=1e-12)
    assert {r.traj_id for r in rows} == {t.traj_id for t in trajs} and rows[0].reward_mode == "pairwise"


def test_scalar_mode_uses_the_grade_with_the_same_shaping():
    trajs = group()
    pairs = judge_group(RubricJudge(), trajs)
    rows = group_rewards(trajs, pairs, dataclasses.replace(CFG, reward_mode="scalar"))
    grades = [(5 + 0.9) / 6, 1 / 6, (5 + 0.9) / 6, 2 / 6]
    assert [r.grade for r in rows] == pytest.approx(grades)
    assert [r.reward for r in rows] == pytest.approx([grades[0] + 0.5, grades[1] + 0.25, grades[2] + 0.5,
                                                      grades[3]])
    assert [r.wins for r in rows] == [2.5, 0.0, 2.5, 1.0]  # still recorded for analysis


def test_zero_variance_group_gets_zero_advantages():
    trajs = [example_trajectory("run", 0, "t", i, Outcome(terminal="answered", benign_success=True, num_tokens=24),
                                category="benign") for i in range(4)]
    rows = group_rewards(trajs, judge_group(RubricJudge(), trajs), CFG)
    assert [r.wins for r in rows] == [1.5] * 4
    assert [r.advantage for r in rows] == [0.0] * 4
    assert group_advantages([1.0, 1.0 + 1e-9]) == [0.0, 0.0]


def test_unnormalised_advantages_are_centred_rewards():
    assert group_advantages([3.0, 1.0], normalize=False) == [1.0, -1.0]
    assert group_advantages([3.0, 1.0], normalize=True) == [1.0, -1.0]  # std = 1
    assert group_advantages([4.0, 0.0], normalize=True) == [1.0, -1.0]


def test_shaping_terms_of_empty_episodes_are_zero():
    assert format_reward([], 0.5) == 0.0 and length_penalty([], 400, 1.0) == 0.0
    assert length_penalty([step(1200)], 400, 2.0) == 4.0


def test_incomplete_or_duplicate_pairs_are_rejected():
    trajs = group()
    pairs = judge_group(RubricJudge(), trajs)
    with pytest.raises(ValueError, match="5 pairs, expected 6"):
        wins_from_pairs(trajs, pairs[:-1])
    with pytest.raises(ValueError, match="duplicate"):
        wins_from_pairs(trajs, pairs + pairs[:1])
    with pytest.raises(ValueError, match="not in the group"):
        wins_from_pairs(trajs[:3], pairs)
