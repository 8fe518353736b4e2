"""Losses of the learner, one readable file each, registered by name.

Every loss is a pure function with one signature (verl's `register_policy_loss` shape):

    loss_fn(logp, old_logp, adv, mask, cfg, *, ref_logp=None, entropy=None, norm=None) -> (loss, metrics)

`logp`, `old_logp`, `ref_logp`, `entropy`, `mask` are (B, T) over target tokens; `adv` is (B,) (one advantage
per trajectory). `norm` is the GLOBAL denominator of the whole update (all micro-batches, all ranks); the
learner passes it so that gradient accumulation and 2 ranks give exactly the gradient of one big batch.
`metrics` are floats already averaged over this micro-batch's own tokens (the learner re-weights them).
"""

from __future__ import annotations

from collections.abc import Callable

from mosaic_ray.algorithms import dpo, mosaic_grpo, sft  # noqa: F401 - importing a loss module registers its loss
from mosaic_ray.algorithms.registry import LOSSES, register_loss


def get_loss(name: str) -> Callable:
    """The registered loss `name`; the error lists the known names."""
    if name not in LOSSES:
        raise KeyError(f"unknown algorithm {name!r}; registered losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_norm(name: str, mask, cfg) -> float:
    """The denominator loss `name` divides by, counted on `mask` (B, T); sum it over micro-batches and ranks."""
    from mosaic_ray.algorithms.aggregation import local_norm

    if name == "sft":
        return local_norm(mask, "token")
    if name == "dpo":
        return float(mask.shape[0] // 2)           # pairs
    return local_norm(mask, cfg.loss_agg)


__all__ = ["LOSSES", "get_loss", "loss_norm", "register_loss"]
