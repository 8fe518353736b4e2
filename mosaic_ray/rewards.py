"""MOSAIC rewards and group-normalised advantages for one group of G trajectories of the same task.

    wins_i          = Σ_{j≠i} pref(i, j)                                   ∈ [0, G−1]   (the paper's reward)
    format_reward_i = format_weight · mean_t format_ok(step t)              (well-formed think / check / action)
    length_pen_i    = length_penalty_weight · mean_t max(0, (L_t − L0)/L0)  (L_t tokens of step t, L0 = budget)
    reward_i        = wins_i + format_reward_i − length_pen_i               (pairwise mode)
                    = grade_i + format_reward_i − length_pen_i              (scalar mode: rubric tier as a score)
    advantage_i     = (reward_i − mean) / std    (population std; a group with std ≤ ZERO_VAR_STD gets 0)

Scalar mode keeps the same shaping terms so the ablation differs only in the preference signal. The length
penalty is per step, not per episode, so long refusal / tool chains are not punished for having many turns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mosaic_ray.config import JudgeConfig
from mosaic_ray.judge.rubric import scalar_grade
from mosaic_ray.schema import PairRecord, RewardRecord, TrajectoryRecord
from mosaic_ray.types import Step

ZERO_VAR_STD = 1e-6
"""Groups whose reward std is at most this get zero advantages (no signal; avoids dividing float noise)."""

__all__ = [
    "ZERO_VAR_STD",
    "format_reward",
    "group_advantages",
    "group_rewards",
    "length_penalty",
    "wins_from_pairs",
]


def wins_from_pairs(trajs: Sequence[TrajectoryRecord], pairs: Sequence[PairRecord]) -> list[float]:
    """wins_i = Σ_j pref(i, j); pairs hold pref(a, b), and pref(b, a) = 1 − pref(a, b)."""
    index = {t.traj_id: i for i, t in enumerate(trajs)}
    wins = [0.0] * len(trajs)
    seen = set()
    for p in pairs:
        if p.a not in index or p.b not in index:
            raise ValueError(f"pair {p.pair_id!r}: {p.a!r} / {p.b!r} not in the group")
        key = frozenset((p.a, p.b))
        if key in seen or p.a == p.b:
            raise ValueError(f"pair {p.pair_id!r}: duplicate or self comparison")
        seen.add(key)
        wins[index[p.a]] += p.preference
        wins[index[p.b]] += 1.0 - p.preference
    expected = len(trajs) * (len(trajs) - 1) // 2
    if len(seen) != expected:
        raise ValueError(f"group {trajs[0].group_id!r}: {len(seen)} pairs, expected {expected} (every pair once)")
    return wins


def format_reward(steps: Sequence[Step], weight: float) -> float:
    """weight × mean per-turn format score (1 if the turn parsed cleanly, else 0); 0 for an empty episode."""
    if not steps:
        return 0.0
    return weight * sum(1.0 for s in steps if s.format_ok) / len(steps)


def length_penalty(steps: Sequence[Step], budget: int, weight: float) -> float:
    """weight × mean over steps of max(0, (L − L0) / L0): only tokens beyond the per-step budget cost."""
    if not steps:
        return 0.0
    return weight * sum(max(0.0, (s.num_tokens - budget) / budget) for s in steps) / len(steps)


def group_advantages(rewards: Sequence[float], normalize: bool = True) -> list[float]:
    """Centre rewards on the group mean; divide by the population std when `normalize`.

    Zero-variance groups (all equal within ZERO_VAR_STD) get advantage 0 in both modes.
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std <= ZERO_VAR_STD:
        return [0.0] * n
    scale = std if normalize else 1.0
    return [(r - mean) / scale for r in rewards]


def group_rewards(trajs: Sequence[TrajectoryRecord], pairs: Sequence[PairRecord], cfg: JudgeConfig) -> list[RewardRecord]:
    """Reward rows of one group (`trajs` in sample order, `pairs` = every pair once)."""
    wins = wins_from_pairs(trajs, pairs)
    rows = []
    for t, w in zip(trajs, wins):
        g = scalar_grade(t.category, t.outcome, t.error)
        fmt = format_reward(t.steps, cfg.format_weight)
        pen = length_penalty(t.steps, cfg.length_budget, cfg.length_penalty_weight)
        base = w if cfg.reward_mode == "pairwise" else g
        rows.append(RewardRecord(traj_id=t.traj_id, group_id=t.group_id, iteration=t.iteration, wins=w, grade=g,
                                 format_reward=fmt, length_penalty=pen, reward=base + fmt - pen, advantage=0.0,
                                 reward_mode=cfg.reward_mode))
    for row, adv in zip(rows, group_advantages([r.reward for r in rows], cfg.normalize_advantages)):
        row.advantage = adv
    return rows
