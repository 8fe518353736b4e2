"""Scalar-reward GRPO, the ablation the paper argues against: same surrogate, advantages from scalar rewards.

The only difference from preference-GRPO is where the advantage comes from: the grader's scalar score of
each trajectory, normalised within its group (Shao et al. 2024), instead of pairwise wins. The judge writes
those advantages into the reward rows in `judge.reward_mode: scalar`; `group_advantages` is the same
normalisation for callers that only have scalar rewards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mosaic_ray.algorithms import register_loss
from mosaic_ray.algorithms.mosaic_grpo import ppo_clip_loss


def group_advantages(rewards: Sequence[float], group_ids: Sequence[str], *, normalize_std: bool = True,
                     eps: float = 1e-6) -> list[float]:
    """A_i = (r_i − mean_group) / (std_group + eps); a group with one distinct reward gets all zeros."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if len(r) != len(group_ids):
        raise ValueError(f"group_advantages: {len(r)} rewards but {len(group_ids)} group ids")
    adv = torch.zeros_like(r)
    for gid in dict.fromkeys(group_ids):
        idx = torch.tensor([i for i, g in enumerate(group_ids) if g == gid])
        centred = r[idx] - r[idx].mean()
        if normalize_std and len(idx) > 1:
            centred = centred / (r[idx].std(unbiased=False) + eps)
        adv[idx] = centred
    return adv.tolist()


@register_loss("scalar_grpo")
def scalar_grpo_loss(logp, old_logp, adv, mask, cfg, *, ref_logp=None, entropy=None, norm=None):
    """Scalar-GRPO: the clipped surrogate with scalar-reward group advantages."""
    return ppo_clip_loss(logp, old_logp, adv, mask, cfg, ref_logp=ref_logp, entropy=entropy, norm=norm)
